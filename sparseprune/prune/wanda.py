"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

No weight update: the score alone decides. The input norms come from calibration activations
(``stats.col_norm()``, see :class:`sparseprune.prune.stats.LayerStats`). Comparison groups:
each row for unstructured sparsity, each group of M inputs of a row for N:M, and for block
patterns the blocks are ranked by the L2 norm of the Wanda scores inside them.
"""

from __future__ import annotations

import torch

from .masks import make_mask
from .methods import PruningMethod, register_method
from .patterns import Pattern


def row_keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest ``1 - sparsity`` of every row (Wanda's per-output comparison group)."""
    rows, cols = scores.shape
    n_prune = int(round(sparsity * cols))
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        idx = scores.float().topk(n_prune, dim=1, largest=False).indices
        keep.scatter_(1, idx, False)
    return keep


def _need_stats(stats, name: str):
    if stats is None or getattr(stats, "n", 0) == 0:
        raise ValueError(f"method '{name}' needs calibration statistics: pass calibration=... (inputs or a "
                         f"forward_loop) to prune()/convert()")


class Wanda(PruningMethod):
    name = "wanda"
    needs_calibration = True
    needs_hessian = False

    def scores(self, weight: torch.Tensor, stats=None) -> torch.Tensor:
        _need_stats(stats, self.name)
        norm = stats.col_norm().to(weight.device)
        return weight.detach().abs().float() * norm[None, :]

    def prune_layer(self, weight: torch.Tensor, pattern: Pattern, sparsity: float | None, *,
                    stats=None, block_keep: torch.Tensor | None = None):
        sc = self.scores(weight, stats)
        s = pattern.sparsity if sparsity is None else sparsity
        if pattern.kind == "unstructured" and block_keep is None:
            if s is None:
                raise ValueError("unstructured pruning needs a sparsity")
            mask = row_keep_top(sc, s)
        else:
            mask = make_mask(sc, pattern, sparsity, block_keep)
        return mask, weight * mask


register_method(Wanda())
