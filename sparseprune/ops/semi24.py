"""``torch.ops.sparseprune.semi24_linear``: y = x @ W^T + bias with W in Semi24 (2:4) form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseprune import _native  # noqa: F401  (registers the op schema and C++ backends)
from sparseprune.formats.semi24 import unpack_rows


def semi24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N]. ``values`` [N, K/2] and ``meta`` [N, ceil(K/8)] as in Semi24Weight."""
    return torch.ops.sparseprune.semi24_linear.default(x, values, meta, bias)


@torch.library.register_fake("sparseprune::semi24_linear")
def _(x, values, meta, bias):
    torch._check(values.dim() == 2, lambda: "values must be [N, K/2]")
    torch._check(x.shape[-1] == values.shape[1] * 2, lambda: f"x has {x.shape[-1]} features, weight expects {values.shape[1] * 2}")
    torch._check(x.dtype == values.dtype, lambda: "x and values must share a dtype")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _reference(x, values, meta, bias=None):
    """Plain torch: unpack to dense and call F.linear in fp32 (result in fp32)."""
    w = unpack_rows(values, meta, values.shape[1] * 2)
    return F.linear(x.float(), w.float(), None if bias is None else bias.float())
