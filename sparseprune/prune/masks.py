"""Mask makers: turn per-weight scores into masks of a given pattern (higher score = keep)."""

from __future__ import annotations

import torch

from .patterns import Pattern


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"in_features={cols} is not a multiple of {m}")
    g = scores.reshape(rows, cols // m, m)
    idx = g.topk(n, dim=-1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


def block_scores(scores: torch.Tensor, block_size) -> torch.Tensor:
    """L2 norm of the scores in each block: [N/bh, K/bw]."""
    bh, bw = block_size
    n, k = scores.shape
    return scores.float().reshape(n // bh, bh, k // bw, bw).pow(2).sum(dim=(1, 3)).sqrt()


def keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the highest ``1 - sparsity`` fraction of ``scores`` (any shape).

    Below sparsity 1 at least one entry survives: rounding would otherwise prune all 4 blocks of a
    64x64 layer at 90% (32x32 blocks; ResNet-50's first 1x1 convs), silently zeroing the layer."""
    total = scores.numel()
    n_prune = int(round(sparsity * total))
    if sparsity < 1:
        n_prune = min(n_prune, total - 1)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        idx = scores.reshape(-1).topk(n_prune, largest=False).indices
        keep.view(-1)[idx] = False
    return keep


def expand_block_mask(block_keep: torch.Tensor, block_size) -> torch.Tensor:
    bh, bw = block_size
    return block_keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def make_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float | None = None,
              block_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of ``pattern`` from ``scores`` [out, in].

    ``block_keep`` overrides the per-layer ranking (a global budget decided across layers): a
    [N/bh, K/bw] block mask for block/hybrid, the full weight mask for unstructured.
    """
    s = pattern.sparsity if sparsity is None else sparsity
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "unstructured":
        if block_keep is not None:
            return block_keep
        if s is None:
            raise ValueError("unstructured pruning needs a sparsity")
        return keep_top(scores.float(), s)
    if block_keep is None:
        if s is None:
            raise ValueError(f"{pattern.kind} pruning needs a sparsity (fraction of blocks to prune)")
        block_keep = keep_top(block_scores(scores, pattern.block_size), s)
    mask = expand_block_mask(block_keep, pattern.block_size)
    if pattern.kind == "hybrid":
        mask &= nm_mask(scores, 2, 4)
    return mask
