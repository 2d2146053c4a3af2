"""Backend registry: who can run which packed format on which device.

A backend turns a :class:`~sparseprune.modules.SparseLinear` and an input into an output by calling
one of the ``torch.ops.sparseprune.*`` ops. Built-in: ``cpu`` (C++ kernels). Optional backends
(``triton``, ``cuda``) live in their own modules and register themselves when imported; they are
imported lazily so a CPU-only install never touches GPU tooling.
"""

from __future__ import annotations

import importlib

import torch

from .formats import PackedWeight
from .ops import bsr_linear as _bsr_op
from .ops import hybrid_linear as _hybrid_op
from .ops import semi24_linear as _semi24_op


class Backend:
    """Base class. Subclasses set ``name`` and implement ``forward``; the rest has defaults."""

    name = "base"
    kinds: tuple[str, ...] = ()  # packed formats served
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this backend can run on ``device``; otherwise why not."""
        return None

    def unsupported_reason(self, weight: PackedWeight, device: torch.device) -> str | None:
        """None when this backend can run ``weight`` on ``device``; otherwise why not."""
        why = self.unavailable_reason(device)
        if why:
            return why
        if weight.kind not in self.kinds:
            return f"backend '{self.name}' has no kernel for the {weight.kind} format"
        if weight.dtype not in self.dtypes:
            return f"backend '{self.name}' does not support dtype {weight.dtype} (supports {list(self.dtypes)})"
        return None

    def prepare(self, module) -> None:
        """Hook to re-pack the module's tensors into a backend-specific layout (buffers on the module)."""

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class CpuBackend(Backend):
    name = "cpu"
    kinds = ("semi24", "bsr", "hybrid")

    def unavailable_reason(self, device):
        return None if torch.device(device).type == "cpu" else f"backend 'cpu' runs on CPU tensors, not {device}"

    def forward(self, module, x):
        kind = module.kind
        if kind == "semi24":
            return _semi24_op(x, module.values, module.meta, module.bias)
        if kind == "bsr":
            return _bsr_op(x, module.values, module.crow, module.col, module.in_features, module.bias)
        return _hybrid_op(x, module.values, module.meta, module.crow, module.col, module.in_features, module.bias)


class DenseBackend(Backend):
    """Plain ``F.linear`` on a dense copy of the weight, on any device.

    It is the baseline that backend="auto" measures the sparse kernels against: a layer (or batch
    bucket) where no sparse kernel beats it runs dense. The copy is a non-persistent buffer
    (``dense_weight``, in the packed input order), so checkpoints never hold it; it costs the full
    dense size on top of the packed tensors, and only layers that use it pay for it.
    """

    name = "dense"
    kinds = ("semi24", "bsr", "hybrid")

    def prepare(self, module) -> None:
        w = module.packed_weight().to_dense()
        module.register_buffer("dense_weight", w, persistent=False)

    def release(self, module) -> None:
        """Drops the dense copy (when no bucket of the layer runs dense any more)."""
        if "dense_weight" in module._buffers:
            del module._buffers["dense_weight"]

    def forward(self, module, x):
        return torch.nn.functional.linear(x, module.dense_weight, module.bias)


_BACKENDS: dict[str, Backend] = {}
# Optional backends: name -> module that calls register_backend() on import.
_OPTIONAL: dict[str, str] = {"triton": "sparseprune.triton", "cuda": "sparseprune.cuda"}
# Sparse backends "auto" binds first, in order; sparseprune.autotune then measures them against
# "dense" per batch bucket and may route some buckets to dense (see autotune.py).
AUTO_ORDER: dict[str, list[str]] = {"cpu": ["cpu"], "cuda": ["cuda", "triton"]}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS and name in _OPTIONAL:
        try:
            importlib.import_module(_OPTIONAL[name])
        except Exception as e:  # noqa: BLE001 - a broken optional backend must not take "cpu"/"auto" down with it
            raise ValueError(f"backend '{name}' is not available: {type(e).__name__}: {e}") from e
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend '{name}'; known: {sorted(set(_BACKENDS) | set(_OPTIONAL))}")
    return _BACKENDS[name]


def available_backends(device) -> list[str]:
    """Backends that can run on ``device`` in this process."""
    out = []
    for name in list(_BACKENDS) + [n for n in _OPTIONAL if n not in _BACKENDS]:
        try:
            b = get_backend(name)
        except ValueError:
            continue
        if b.unavailable_reason(torch.device(device)) is None:
            out.append(name)
    return out


def choose_backend(weight: PackedWeight, device, requested: str = "auto") -> tuple[str | None, str]:
    """(backend name, note). Name is None when nothing can run ``weight`` on ``device``."""
    device = torch.device(device)
    if requested != "auto":
        why = get_backend(requested).unsupported_reason(weight, device)
        return (None, why) if why else (requested, "requested")
    reasons = []
    for name in AUTO_ORDER.get(device.type, []):
        try:
            why = get_backend(name).unsupported_reason(weight, device)
        except ValueError as e:
            why = str(e)
        if why is None:
            return name, "auto"
        reasons.append(why)
    return None, "; ".join(reasons) or f"no backend runs on {device.type}"


register_backend(CpuBackend())
register_backend(DenseBackend())

