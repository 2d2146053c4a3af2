# The two commands the README promises (both set everything up first):
#   make bench   - the main job: `sparseprune bench` on this machine, fp32 then bf16, hot and cold
#                  weights, then whole models (`--models`: Llama-shaped decoder, ResNet-50) in fp32;
#                  results in benchmarks/results/<machine label>/ (e.g. cpu-epyc-zen3-2core)
#   make test    - the test suite (what CI runs via .ci/run)
# OUT=<dir> writes the results there instead of the machine's folder.
PYTHON ?= python3
OUT ?=
OUT_ARG = $(if $(OUT),--out $(OUT),)

.PHONY: setup emu test bench bench-quick bench-accuracy

setup:
	PYTHON=$(PYTHON) bash tools/setup.sh

# the CPU emulator of the CUDA kernels (test-only, build/cuda_emu; csrc/cuda/emu/README.md)
emu:
	$(PYTHON) -m tests.cuda_emu

test: setup emu
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PYTHON) -m sparseprune bench --dtype fp32 $(OUT_ARG)
	$(PYTHON) -m sparseprune bench --dtype bf16 $(OUT_ARG)
	$(PYTHON) -m sparseprune bench --models --dtype fp32 $(OUT_ARG)

bench-quick: setup
	$(PYTHON) -m sparseprune bench --quick $(OUT_ARG)

bench-accuracy: setup
	$(PYTHON) -m sparseprune bench --accuracy $(OUT_ARG)
