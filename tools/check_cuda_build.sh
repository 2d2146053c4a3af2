#!/usr/bin/env bash
# Builds the extension WITH its CUDA backend on a machine without a GPU, against a CUDA build of
# torch in a throwaway venv, then checks that the CUDA ops registered. It catches CMake/CUDA build
# breakage before a GPU session has to. Not part of `make test`: the venv is ~5.5 GB.
#   usage: [TORCH=2.14.1] tools/check_cuda_build.sh [archs, default 8.0]
#   (needs nvcc; CUDA_HOME defaults to nvcc's root; TORCH=2.11.0 ARCHS 9.0a = the H100 machine's stack)
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=${1:-8.0}
TORCH=${TORCH:-2.14.1}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
NVCC=$(readlink -f "$(command -v nvcc)")
# The nvcc on PATH may be a wrapper script that execs the real one (see shared/toolchain.md).
REAL_NVCC=$(grep -o '/[^ "]*/bin/nvcc' "$NVCC" 2>/dev/null | head -1 || true)
REAL_NVCC=${REAL_NVCC:-$NVCC}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$REAL_NVCC")")} CUDACXX=$REAL_NVCC
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "torch==$TORCH" scikit-build-core pybind11 ninja numpy "cmake>=3.25"
git clone -q . "$WORK/src"
cp CMakeLists.txt "$WORK/src/"  # test the working copy's build file, committed or not
(cd "$WORK/src" && SPARSEPRUNE_CUDA=on SPARSEPRUNE_CUDA_ARCHS="$ARCHS" \
  "$WORK/venv/bin/pip" install -q --no-build-isolation --no-deps -e .)
cd "$WORK" && "$WORK/venv/bin/python" - <<'PY'
import torch, sparseprune
info = sparseprune.build_info()
print("check_cuda_build:", info)
assert "cuda" in info["backends"], info
for op in ("cuda_semi24_linear", "cuda_bsr_linear", "cuda_hybrid_linear", "pack_semi24_sm80"):
    getattr(torch.ops.sparseprune, op)
print("check_cuda_build: ok")
PY
