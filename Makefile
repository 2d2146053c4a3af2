# The two commands the README promises (both set everything up first):
#   make bench   - the main job: `sparseprune bench` on this machine, results in benchmarks/results/local/
#   make test    - the test suite (what CI runs via .ci/run)
PYTHON ?= python3
OUT ?= benchmarks/results/local

.PHONY: setup test bench bench-quick bench-accuracy

setup:
	PYTHON=$(PYTHON) bash tools/setup.sh

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PYTHON) -m sparseprune bench --out $(OUT)

bench-quick: setup
	$(PYTHON) -m sparseprune bench --quick --out $(OUT)

bench-accuracy: setup
	$(PYTHON) -m sparseprune bench --accuracy --out $(OUT)
