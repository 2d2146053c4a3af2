"""Loads the compiled extension (``sparseprune._C``), which registers the C++ ops."""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from sparseprune import _C  # type: ignore[attr-defined]
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sparseprune's native extension is missing or was built against another torch. "
        "Rebuild it with `pip install --no-build-isolation -e .` (see README)."
    ) from e


def build_info() -> dict:
    """Backends, CUDA archs and CPU ISA levels compiled into this build, plus the ISA in use
    (``cpu_isa_active``) and why AMX tiles are or are not used here (``cpu_amx``)."""
    info = dict(_C.build_info())
    info["backends"] = [b for b in info["backends"].split(",") if b]
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    info["cpu_isas"] = info["cpu_isas"].split(",")
    info["cpu_isa_active"] = _C.cpu_isa()
    info["cpu_amx"] = _C.cpu_amx()
    return info
