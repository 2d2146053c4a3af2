"""One pruning budget across layers (``global_budget=True``)."""

from __future__ import annotations

import torch

from ..formats.conv import gemm_weight
from .masks import block_scores, keep_top


def global_keep(plans, method, stats_by_name):
    """One budget across layers: rank every block (or weight) of every layer together.

    Scores are divided by each layer's mean score first, so a layer whose weights are simply
    smaller in scale is not emptied by the global ranking.
    """
    per_layer = []
    for p in plans:
        sc = method.scores(gemm_weight(p.module), stats_by_name.get(p.name))
        sc = sc / sc.mean().clamp_min(1e-30)
        per_layer.append(block_scores(sc, p.pattern.block_size) if p.pattern.kind != "unstructured" else sc)
    flat = torch.cat([s.reshape(-1) for s in per_layer])
    keep = keep_top(flat, plans[0].sparsity)
    out, i = {}, 0
    for p, s in zip(plans, per_layer):
        out[p.name] = keep[i:i + s.numel()].reshape(s.shape)
        i += s.numel()
    return out
