"""CUDA backend: hand-written tensor-core kernels (csrc/cuda), registered as backend ``"cuda"``.

* Semi24: ``mma.sp`` m16n8k32 on sparse tensor cores, weight re-packed into fragment order by
  ``pack_semi24_sm80`` (layout: :mod:`sparseprune.cuda_layout`).
* BlockSparse: dense ``mma.sync`` over the stored blocks (needs bh % 16 == 0, bw % 32 == 0).
* Hybrid (BSR of 2:4 blocks): ``mma.sp`` over the stored blocks only, each block re-packed into the same
  fragment order as Semi24 (:func:`pack_hybrid_sm80`; needs bh % 16 == 0, bw % 32 == 0).

fp16 and bf16 only, compute capability 8.0+. Importing this module registers the backend.
"""

from __future__ import annotations

import torch

from . import _native  # noqa: F401  (op schemas and, in CUDA builds, the CUDA kernels)
from .backends import Backend, register_backend
from .formats import PackedWeight
from .formats.semi24 import unpack_rows

_OPS = torch.ops.sparseprune


# --- ops: wrappers and fakes ------------------------------------------------------------------------
def pack_semi24_sm80(dense_masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense fp16/bf16 W [N, K] -> (values [ceil(N/16), ceil(K/32), 32, 8], meta [.., .., 16] int32)."""
    return _OPS.pack_semi24_sm80.default(dense_masked)


@torch.library.register_fake("sparseprune::pack_semi24_sm80")
def _(dense_masked):
    torch._check(dense_masked.dim() == 2, lambda: "dense_masked must be [N, K]")
    n, k = dense_masked.shape
    mt, ks = (n + 15) // 16, (k + 31) // 32
    return dense_masked.new_empty((mt, ks, 32, 8)), dense_masked.new_empty((mt, ks, 16), dtype=torch.int32)


def cuda_semi24_linear(x, values, meta, in_features: int, out_features: int, bias=None) -> torch.Tensor:
    """x [..., K] -> [..., N] with the N x K weight packed by :func:`pack_semi24_sm80`."""
    return _OPS.cuda_semi24_linear.default(x, values, meta, in_features, out_features, bias)


@torch.library.register_fake("sparseprune::cuda_semi24_linear")
def _(x, values, meta, in_features, out_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, weight expects {in_features}")
    torch._check(values.dim() == 4 and values.shape[1] == (in_features + 31) // 32,
                 lambda: "values must be pack_semi24_sm80 output for this in_features")
    torch._check(x.dtype == values.dtype, lambda: "x and values must share a dtype")
    return x.new_empty((*x.shape[:-1], out_features))


def cuda_bsr_linear(x, values, crow, col, in_features: int, bias=None) -> torch.Tensor:
    """x [..., K] -> [..., N], W in the canonical BSR layout."""
    return _OPS.cuda_bsr_linear.default(x, values, crow, col, in_features, bias)


@torch.library.register_fake("sparseprune::cuda_bsr_linear")
def _(x, values, crow, col, in_features, bias):
    torch._check(values.dim() == 3, lambda: "values must be [nnzb, bh, bw]")
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, weight expects {in_features}")
    torch._check(x.dtype == values.dtype, lambda: "x and values must share a dtype")
    return x.new_empty((*x.shape[:-1], (crow.shape[0] - 1) * values.shape[1]))


def pack_hybrid_sm80(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """HybridWeight (or anything with its ``values``/``meta``/``block_size``) -> (values [nnzb, bh/16, bw/32, 32, 8],
    meta [nnzb, bh/16, bw/32, 16] int32) in mma.sp fragment order.

    The stored blocks are stacked into one [nnzb * bh, bw] 2:4 matrix and packed by ``pack_semi24_sm80``
    (CPU or GPU packer, the same per-lane routine): with bh % 16 == 0 and bw % 32 == 0 no tile straddles two
    blocks and nothing is padded."""
    values, meta = weight.values, weight.meta
    nnzb, bh, half_bw = values.shape
    bw = 2 * half_bw
    if bh % 16 or bw % 32:
        raise ValueError(f"hybrid sm80 packing needs bh % 16 == 0 and bw % 32 == 0, got {bh}x{bw} blocks")
    dense = unpack_rows(values.reshape(nnzb * bh, half_bw), meta.reshape(nnzb * bh, bw // 8), bw)
    v, m = pack_semi24_sm80(dense)
    return v.reshape(nnzb, bh // 16, bw // 32, 32, 8), m.reshape(nnzb, bh // 16, bw // 32, 16)


def cuda_hybrid_linear(x, values, meta, crow, col, in_features: int, bias=None) -> torch.Tensor:
    """x [..., K] -> [..., N], W stored as BSR of 2:4 blocks packed by :func:`pack_hybrid_sm80`."""
    return _OPS.cuda_hybrid_linear.default(x, values, meta, crow, col, in_features, bias)


@torch.library.register_fake("sparseprune::cuda_hybrid_linear")
def _(x, values, meta, crow, col, in_features, bias):
    torch._check(values.dim() == 5 and values.shape[3] == 32 and values.shape[4] == 8,
                 lambda: "values must be pack_hybrid_sm80 output [nnzb, bh/16, bw/32, 32, 8]")
    torch._check(meta.dim() == 4 and meta.dtype == torch.int32, lambda: "meta must be int32 [nnzb, bh/16, bw/32, 16]")
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, weight expects {in_features}")
    torch._check(x.dtype == values.dtype, lambda: "x and values must share a dtype")
    return x.new_empty((*x.shape[:-1], (crow.shape[0] - 1) * values.shape[1] * 16))


# --- backend ---------------------------------------------------------------------------------------
def _built_with_cuda() -> bool:
    return "cuda" in _native.build_info()["backends"]


class CudaBackend(Backend):
    name = "cuda"
    kinds = ("semi24", "bsr", "hybrid")
    dtypes = (torch.float16, torch.bfloat16)

    def unavailable_reason(self, device) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, not {device}"
        if not _built_with_cuda():
            return ("backend 'cuda': this sparseprune build has no CUDA kernels (built against a CPU-only torch "
                    "or without nvcc; rebuild with SPARSEPRUNE_CUDA=on)")
        if not torch.cuda.is_available():
            return "backend 'cuda': no CUDA device is available"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"backend 'cuda' needs compute capability >= 8.0 (mma.sp, cp.async); "
                    f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}")
        return None

    def unsupported_reason(self, weight: PackedWeight, device) -> str | None:
        why = super().unsupported_reason(weight, device)
        if why:
            return why
        if weight.kind == "semi24" and weight.shape[1] % 4:
            return f"backend 'cuda': 2:4 needs in_features % 4 == 0, got {weight.shape[1]}"
        if weight.kind in ("bsr", "hybrid"):
            bh, bw = weight.block_size
            if bh % 16 or bw % 32:
                what = "BSR" if weight.kind == "bsr" else "hybrid (mma.sp m16n8k32 tiles)"
                return f"backend 'cuda': {what} blocks must have bh % 16 == 0 and bw % 32 == 0, got {bh}x{bw}"
        return None

    def prepare(self, module) -> None:
        if module.kind == "semi24":
            dense = unpack_rows(module.values, module.meta, module.in_features)
            v, m = pack_semi24_sm80(dense)
        elif module.kind == "hybrid":
            v, m = pack_hybrid_sm80(module)
        else:
            return
        # extra buffers: follow .to()/.cuda(); non-persistent so state_dict keeps the canonical format
        module.register_buffer("cuda_values", v, persistent=False)
        module.register_buffer("cuda_meta", m, persistent=False)

    def forward(self, module, x):
        if module.kind == "semi24":
            if getattr(module, "cuda_values", None) is None or module.cuda_values.device != x.device:
                self.prepare(module)
            return cuda_semi24_linear(x, module.cuda_values, module.cuda_meta, module.in_features, module.out_features,
                                      module.bias)
        if module.kind == "bsr":
            return cuda_bsr_linear(x, module.values, module.crow, module.col, module.in_features, module.bias)
        if module.kind == "hybrid":
            if getattr(module, "cuda_values", None) is None or module.cuda_values.device != x.device:
                self.prepare(module)
            return cuda_hybrid_linear(x, module.cuda_values, module.cuda_meta, module.crow, module.col,
                                      module.in_features, module.bias)
        raise RuntimeError(f"backend 'cuda' has no kernel for the {module.kind} format")


register_backend(CudaBackend())
