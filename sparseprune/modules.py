"""``SparseLinear``: a drop-in ``nn.Linear`` replacement holding a packed weight, and ``PackedModule``,
what it shares with :class:`sparseprune.conv.SparseConv2d`."""

from __future__ import annotations

import torch
from torch import nn

from . import autotune
from . import backends as _backends
from .formats import FORMATS, PackedWeight


def _may_measure(x: torch.Tensor) -> bool:
    """Measuring syncs and allocates: never while torch.compile traces or a CUDA graph captures."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


class PackedModule(nn.Module):
    """What SparseLinear and SparseConv2d share: a packed GEMM weight W [out_features, in_features]
    (Semi24, BlockSparse or Hybrid) as buffers, a frozen bias, and the backend that runs
    ``y = x @ W^T + b`` on rows of x.

    The packed tensors are buffers (they follow ``.to()``, ``state_dict`` and ``model.half()``);
    the bias is a frozen parameter so the module reads like its dense counterpart. ``backend`` is
    ``"auto"`` or a registered backend name; "auto" resolves per device on first use, and
    :mod:`sparseprune.autotune` then picks a backend per batch bucket (dense included).
    Subclasses implement ``forward`` and may override the autotune hooks at the end.
    """

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None, backend: str = "auto",
                 in_perm: torch.Tensor | None = None):
        super().__init__()
        weight.validate()
        self.kind = weight.kind
        self.out_features, self.in_features = weight.shape
        self._names = type(weight).tensor_names()
        for name, t in weight.tensors().items():
            self.register_buffer(name, t)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Input-channel permutation (2:4 channel permutation that could not be folded into the
        # previous layer): the packed weight is W[:, in_perm], so the input is gathered to match.
        if in_perm is not None:
            in_perm = torch.as_tensor(in_perm, dtype=torch.int64, device=weight.device)
            if in_perm.shape != (self.in_features,) or not torch.equal(
                    in_perm.sort().values, torch.arange(self.in_features, device=in_perm.device)):
                raise ValueError(f"in_perm must be a permutation of range({self.in_features})")
        self.register_buffer("in_perm", in_perm)
        self.backend_request = backend
        self._bound: tuple[str, _backends.Backend] | None = None  # (device type, backend) in use
        # backend="auto" after measurement (sparseprune.autotune): one backend per batch bucket,
        # and their names for reports. None = not measured yet (every batch uses the bound backend).
        self._plan: tuple[_backends.Backend, ...] | None = None
        self._plan_dtype: torch.dtype | None = None  # dtype the plan was measured for
        self.auto_plan: dict[str, str] | None = None
        self.backend = None if backend == "auto" else backend
        self._bind(weight.device)

    def packed_weight(self) -> PackedWeight:
        return FORMATS[self.kind](shape=(self.out_features, self.in_features), **{n: getattr(self, n) for n in self._names})

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight [out, in] in the module's input order (permutation undone)."""
        w = self.packed_weight().to_dense()
        if self.in_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.in_perm, w)
        return w

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    # --- backend binding ----------------------------------------------------------------------------
    def _bind(self, device) -> None:
        device = torch.device(device)
        name, why = _backends.choose_backend(self.packed_weight(), device, self.backend_request)
        if name is None:
            raise RuntimeError(f"{type(self).__name__}({self.kind}, {self.out_features}x{self.in_features}, {self.dtype}) "
                               f"cannot run on {device}: {why}")
        backend = _backends.get_backend(name)
        backend.prepare(self)
        self.backend = name
        self._bound = (device.type, backend)
        self._set_plan(None)  # measurements were for the previous device/backend

    def _set_plan(self, plan) -> None:
        """Installs per-bucket backends (or None); keeps a dense copy only if some bucket uses it."""
        dense = _backends.get_backend("dense")
        uses_dense = plan is not None and any(b is dense for b in plan)
        if uses_dense and "dense_weight" not in self._buffers:
            dense.prepare(self)
        elif not uses_dense and self.backend != "dense":
            dense.release(self)
        self._plan = None if plan is None else tuple(plan)

    def set_backend(self, backend: str) -> "SparseLinear":
        self.backend_request = backend
        self._bind(self.values.device)
        return self

    # --- forward plumbing shared by the subclasses ----------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        # This runs once per layer per token when decoding, so the checks read each attribute once.
        values = self.values
        if x.dtype is not values.dtype or x.device != values.device:
            if x.device != values.device:
                raise RuntimeError(f"{type(self).__name__}: input is on {x.device} but the weight is on {values.device}")
            raise RuntimeError(f"{type(self).__name__}: input dtype {x.dtype} does not match weight dtype {values.dtype}")

    def _backend_for(self, x: torch.Tensor, rows: int) -> _backends.Backend:
        """The backend that runs ``rows`` GEMM rows of input like ``x`` (binds and measures lazily)."""
        bound = self._bound
        if bound is None or bound[0] != x.device.type:
            self._bind(x.device)  # moved to another device type since the last call
            bound = self._bound
        backend = bound[1]
        if self.backend_request == "auto":
            if (self._plan is None or self._plan_dtype != x.dtype) and _may_measure(x):
                # once per device and dtype (model.half() re-measures); cached per shape (see autotune.py)
                autotune.tune_module(self)
            if self._plan is not None:
                # A Python branch on the row count: torch.compile guards on the bucket, not the size.
                backend = self._plan[autotune.bucket_of(rows)]
        return backend

    def _packed_repr(self) -> str:
        w = self.packed_weight()
        extra = f", block_size={w.block_size}" if hasattr(w, "block_size") else ""
        return (f"format={self.kind}{extra}, bias={self.bias is not None}, backend={self.backend}, "
                + (f"auto_plan={self.auto_plan}, " if self.auto_plan else "") +
                f"bytes={w.nbytes / w.dense_nbytes:.3f} of dense")

    # --- autotune hooks (sparseprune.autotune.measure) ------------------------------------------------
    def autotune_input(self, rows: int) -> torch.Tensor:
        """A random input of ``rows`` GEMM rows, as forward() takes it."""
        return torch.randn(rows, self.in_features, device=self.values.device).to(self.dtype)

    def autotune_call(self, backend: _backends.Backend, x: torch.Tensor) -> torch.Tensor:
        """forward() of ``x`` through ``backend`` (no checks, no plan)."""
        return backend.forward(self, x)

    def autotune_key(self) -> str:
        """What besides the packed weight changes timings (part of the autotune cache key)."""
        return ""


class SparseLinear(PackedModule):
    """y = x @ W^T + b with W stored packed (Semi24, BlockSparse or Hybrid): a drop-in ``nn.Linear``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: PackedWeight, backend: str = "auto") -> "SparseLinear":
        return cls(weight, linear.bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise RuntimeError(f"SparseLinear: input of shape {tuple(x.shape)} has {x.shape[-1] if x.dim() else 0} "
                               f"features in its last dimension, the weight expects {self.in_features}")
        backend = self._backend_for(x, x.numel() // self.in_features)
        if self.in_perm is not None:
            x = x.index_select(-1, self.in_perm)
        return backend.forward(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._packed_repr()}"


def tune_model(model: nn.Module, **kw) -> dict[str, dict[str, str]]:
    """Measures now (eagerly, outside any compile) every SparseLinear / SparseConv2d of ``model``
    whose backend request is "auto"; returns {module name: {bucket label: backend}}."""
    return {name: autotune.tune_module(mod, **kw) for name, mod in model.named_modules()
            if isinstance(mod, PackedModule) and mod.backend_request == "auto"}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` where the submodule called ``name`` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
