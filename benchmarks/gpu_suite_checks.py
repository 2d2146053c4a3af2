"""Gate checks of benchmarks/gpu_suite.sh (a suite that "passes" without having measured anything is worse than
one that fails).

  python benchmarks/gpu_suite_checks.py backend          exit 1 unless the CUDA backend was built and a GPU is seen
  python benchmarks/gpu_suite_checks.py no-skips XML     exit 1 if the junit XML holds no test, or any skipped
                                                          test of the CUDA backend (tests/test_cuda_*)
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def check_backend() -> str | None:
    import torch

    import sparseprune

    info = sparseprune.build_info()
    print(info, torch.__version__)
    if "cuda" not in info["backends"]:
        return f"the CUDA backend was not built ({info}); rebuild with SPARSEPRUNE_CUDA=on on a machine with nvcc"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def check_no_skips(path: str) -> str | None:
    cases = list(ET.parse(path).getroot().iter("testcase"))
    skipped = [c for c in cases if c.find("skipped") is not None]
    for c in skipped:
        print(f"skipped: {c.get('classname')}::{c.get('name')}: {c.find('skipped').get('message')}")
    if not cases:
        return "no GPU tests ran"
    cuda = [c for c in skipped if "test_cuda" in (c.get("classname") or "")]
    if cuda:
        return f"{len(cuda)} CUDA-backend tests skipped on a GPU machine"
    return None


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    why = check_backend() if what == "backend" else check_no_skips(sys.argv[2]) if what == "no-skips" else "usage"
    if why:
        print(f"FAIL: {why}")
        sys.exit(1)
