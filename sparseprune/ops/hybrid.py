"""``torch.ops.sparseprune.hybrid_linear``: y = x @ W^T + bias with W as BSR of 2:4 blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseprune import _native  # noqa: F401
from sparseprune.formats.bsr import scatter_blocks
from sparseprune.formats.semi24 import unpack_rows


def hybrid_linear(x, values, meta, crow, col, in_features: int, bias=None) -> torch.Tensor:
    """x [..., K] -> [..., N]; ``values`` [nnzb, bh, bw/2], ``meta`` [nnzb, bh, bw/8]."""
    return torch.ops.sparseprune.hybrid_linear.default(x, values, meta, crow, col, in_features, bias)


@torch.library.register_fake("sparseprune::hybrid_linear")
def _(x, values, meta, crow, col, in_features, bias):
    torch._check(values.dim() == 3, lambda: "values must be [nnzb, bh, bw/2]")
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, weight expects {in_features}")
    torch._check(x.dtype == values.dtype, lambda: "x and values must share a dtype")
    return x.new_empty((*x.shape[:-1], (crow.shape[0] - 1) * values.shape[1]))


def _reference(x, values, meta, crow, col, in_features, bias=None):
    nnzb, bh, half = values.shape
    bw = half * 2
    blocks = unpack_rows(values.reshape(-1, half), meta.reshape(-1, bw // 8), bw).reshape(nnzb, bh, bw)
    w = scatter_blocks(blocks, crow, col, ((crow.shape[0] - 1) * bh, in_features), dtype=torch.float32)
    return F.linear(x.float(), w, None if bias is None else bias.float())
