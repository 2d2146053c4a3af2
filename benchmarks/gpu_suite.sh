#!/usr/bin/env bash
# GPU suite for a CUDA machine without network (H100: ~10 minutes).
#   1. install the package (editable, against the torch already installed)
#   2. GPU tests: `pytest -m gpu` plus the Triton tests on CUDA (no interpreter)
#   3. benchmarks/bench_gpu.py -> bench_gpu.csv, benchmarks/bench_cuda.py -> bench_cuda.csv
#   4. benchmarks/plot_gpu.py -> 2 PNGs; SparseGPT memory on the GPU (4096x4096, 128 x 2048 tokens)
# Everything lands in $OUT if set, else benchmarks/results/local/ (CSV, gpu_suite.log, PNGs).
# The stage timeouts add up to more than one 10-minute device call: split it with
#   STAGES=tests bash benchmarks/gpu_suite.sh    then    STAGES=bench bash benchmarks/gpu_suite.sh
# (each call installs first; the log is appended to).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/local}"
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
unset TRITON_INTERPRET  # the GPU run must use compiled kernels
exec > >(tee -a "$LOG") 2>&1
echo "== gpu_suite $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
status=0

echo "== install"
# Build only for the card at hand (all four default archs would eat minutes of the 10-minute budget).
export SPARSEPRUNE_CUDA_ARCHS="${SPARSEPRUNE_CUDA_ARCHS:-$(python -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}" + ("a" if c[0] == 9 else ""))')}"
export SPARSEPRUNE_CUDA=on CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
echo "building for SPARSEPRUNE_CUDA_ARCHS=$SPARSEPRUNE_CUDA_ARCHS"
pip install --no-build-isolation --no-deps -e . || { echo "install failed"; exit 1; }
python -c "import sparseprune, torch, triton; print(sparseprune.build_info(), torch.__version__, triton.__version__)"

STAGES="${STAGES:-tests bench}"
if [[ " $STAGES " == *" tests "* ]]; then
echo "== tests (gpu)"
timeout 240 python -m pytest -q -m gpu tests -p no:cacheprovider || status=1
echo "== tests (triton on cuda)"
timeout 120 python -m pytest -q tests/test_triton.py -p no:cacheprovider || status=1
fi

if [[ " $STAGES " == *" bench "* ]]; then

echo "== bench"
timeout 330 python benchmarks/bench_gpu.py --out "$OUT" || status=1

echo "== bench (cuda backend vs cuSPARSELt at large batch)"
timeout 60 python benchmarks/bench_cuda.py --csv "$OUT/bench_cuda.csv" || status=1

echo "== plot"
python benchmarks/plot_gpu.py --out "$OUT" || status=1

echo "== sparsegpt memory (4096x4096, 128 x 2048 streamed tokens; must stay within 2 GiB beyond the model)"
timeout 90 python benchmarks/bench_sparsegpt_memory.py --device cuda || status=1
fi
echo "== done (status $status); results in $OUT"
exit $status
