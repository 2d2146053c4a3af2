"""``torch.ops.sparseprune.bsr_linear``: y = x @ W^T + bias with W in block-sparse (BSR) form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseprune import _native  # noqa: F401
from sparseprune.formats.bsr import scatter_blocks


def bsr_linear(x, values, crow, col, in_features: int, bias=None) -> torch.Tensor:
    """x [..., K] -> [..., N] with N = (len(crow) - 1) * bh and K = in_features."""
    return torch.ops.sparseprune.bsr_linear.default(x, values, crow, col, in_features, bias)


@torch.library.register_fake("sparseprune::bsr_linear")
def _(x, values, crow, col, in_features, bias):
    torch._check(values.dim() == 3, lambda: "values must be [nnzb, bh, bw]")
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, weight expects {in_features}")
    torch._check(x.dtype == values.dtype, lambda: "x and values must share a dtype")
    return x.new_empty((*x.shape[:-1], (crow.shape[0] - 1) * values.shape[1]))


def _reference(x, values, crow, col, in_features, bias=None):
    n = (crow.shape[0] - 1) * values.shape[1]
    w = scatter_blocks(values, crow, col, (n, in_features), dtype=torch.float32)
    return F.linear(x.float(), w, None if bias is None else bias.float())
