# The two commands the README promises (both set everything up first):
#   make bench   - the main job: `sparseprune bench` on this machine, results in benchmarks/results/local/
#   make test    - the test suite (what CI runs via .ci/run)
PYTHON ?= python3
OUT ?= benchmarks/results/local

.PHONY: setup emu test bench bench-quick bench-accuracy

setup:
	PYTHON=$(PYTHON) bash tools/setup.sh

# the CPU emulator of the CUDA kernels (test-only, build/cuda_emu; csrc/cuda/emu/README.md)
emu:
	$(PYTHON) -m tests.cuda_emu

test: setup emu
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PYTHON) -m sparseprune bench --out $(OUT)

bench-quick: setup
	$(PYTHON) -m sparseprune bench --quick --out $(OUT)

bench-accuracy: setup
	$(PYTHON) -m sparseprune bench --accuracy --out $(OUT)
