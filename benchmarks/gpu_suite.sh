#!/usr/bin/env bash
# GPU suite for a CUDA machine without network (H100: ~10 minutes).
#   1. install the package (editable, against the torch already installed); FAIL unless the CUDA backend was built
#      and torch sees a GPU
#   2. tests: `pytest -m gpu` plus the Triton tests on CUDA (no interpreter); FAIL if any CUDA-backend test skips
#   3. sanitize: compute-sanitizer memcheck and racecheck over a short run of every CUDA kernel family
#      (tests/test_cuda_gpu.py::test_sanitizer_run: each family with and without split-K, and the GPU packer)
#   4. bench: benchmarks/bench_gpu.py -> bench_gpu.csv, benchmarks/bench_cuda.py -> bench_cuda.csv, plots,
#      SparseGPT memory on the GPU (4096x4096, 128 x 2048 tokens)
# Everything lands in $OUT if set, else benchmarks/results/local/ (CSV, gpu_suite.log, junit XML, PNGs).
# The stage timeouts add up to more than one 10-minute device call: split it with
#   STAGES=tests bash benchmarks/gpu_suite.sh, then STAGES=sanitize, then STAGES=bench
# (each call installs first, unless SKIP_INSTALL=1; the log is appended to). Exit status 0 only if every stage
# passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/local}"
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
unset TRITON_INTERPRET  # the GPU run must use compiled kernels
exec > >(tee -a "$LOG") 2>&1
echo "== gpu_suite $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
status=0

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  echo "== install"
  # Build only for the card at hand (all four default archs would eat minutes of the 10-minute budget).
  export SPARSEPRUNE_CUDA_ARCHS="${SPARSEPRUNE_CUDA_ARCHS:-$(python -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}" + ("a" if c[0] == 9 else ""))')}"
  export SPARSEPRUNE_CUDA=on CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
  echo "building for SPARSEPRUNE_CUDA_ARCHS=$SPARSEPRUNE_CUDA_ARCHS"
  pip install --no-build-isolation --no-deps -e . || { echo "FAIL: install failed"; exit 1; }
fi
# A suite that "passes" without the CUDA backend, or without a GPU, has measured nothing: stop here.
python benchmarks/gpu_suite_checks.py backend || exit 1

STAGES="${STAGES:-tests sanitize bench}"
if [[ " $STAGES " == *" tests "* ]]; then
  echo "== tests (gpu)"
  # SPARSEPRUNE_REQUIRE_CUDA: tests/test_cuda_gpu.py fails instead of skipping when the backend is unusable
  SPARSEPRUNE_REQUIRE_CUDA=1 timeout 240 python -m pytest -q -m gpu tests -p no:cacheprovider -rs \
    --junitxml="$OUT/gpu_tests.xml" || status=1
  python benchmarks/gpu_suite_checks.py no-skips "$OUT/gpu_tests.xml" || status=1
  echo "== tests (triton on cuda)"
  timeout 120 python -m pytest -q tests/test_triton.py -p no:cacheprovider || status=1
fi

if [[ " $STAGES " == *" sanitize "* ]]; then
  echo "== sanitize (compute-sanitizer memcheck + racecheck over a short run of every CUDA kernel)"
  SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  if [[ -z "$SANITIZER" ]]; then
    echo "FAIL: compute-sanitizer not found (it ships with the CUDA toolkit)"
    status=1
  else
    for tool in memcheck racecheck; do
      echo "-- $tool"
      # no caching allocator: memcheck then sees each tensor's own bounds; only our kernels are instrumented
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 SPARSEPRUNE_REQUIRE_CUDA=1 timeout 240 \
        "$SANITIZER" --tool "$tool" --error-exitcode 97 --kernel-name kns=sparseprune \
        python -m pytest -q -p no:cacheprovider tests/test_cuda_gpu.py -k test_sanitizer_run ||
        { echo "FAIL: compute-sanitizer --tool $tool"; status=1; }
    done
  fi
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
