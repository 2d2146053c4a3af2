"""Pruning methods: how weights are scored (and, for some methods, updated) before masking.

A method is pluggable: subclass :class:`PruningMethod` and :func:`register_method` it. Methods
that need calibration data set ``needs_calibration`` and receive per-layer statistics gathered
by :mod:`sparseprune.prune.calibrate`; Wanda and SparseGPT register themselves from their modules,
which the package imports.
"""

from __future__ import annotations

import torch

from .masks import make_mask
from .patterns import Pattern


class PruningMethod:
    name = "base"
    needs_calibration = False

    def scores(self, weight: torch.Tensor, stats=None) -> torch.Tensor:
        """Importance of each weight (higher = keep), same shape as ``weight``."""
        raise NotImplementedError

    def prune_layer(self, weight: torch.Tensor, pattern: Pattern, sparsity: float | None, *,
                    stats=None, block_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mask, new weight). The default masks by score and keeps surviving values."""
        mask = make_mask(self.scores(weight, stats), pattern, sparsity, block_keep)
        return mask, weight * mask


class Magnitude(PruningMethod):
    """|W|: no calibration. Fast, and the baseline calibrated methods are measured against."""

    name = "magnitude"

    def scores(self, weight, stats=None):
        return weight.detach().abs().float()


METHODS: dict[str, PruningMethod] = {}


def register_method(method: PruningMethod) -> None:
    METHODS[method.name] = method


def get_method(method: str | PruningMethod) -> PruningMethod:
    if isinstance(method, PruningMethod):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]


register_method(Magnitude())
