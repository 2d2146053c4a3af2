"""Sparsity patterns: what a mask must look like, parsed from user-facing strings."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """``kind`` is "nm", "block", "hybrid", "unstructured" or "channel".

    nm: ``n`` kept of every ``m`` consecutive inputs in a row (2:4, 1:4, 4:8, ...).
    block: whole ``block_size`` blocks pruned; ``sparsity`` = fraction of blocks pruned.
    hybrid: blocks pruned to ``sparsity``, then 2:4 inside the kept blocks (overall (1 + s) / 2).
    unstructured: individual weights, ``sparsity`` = fraction pruned (benchmarks compare with it).
    channel: whole channels / neurons / heads removed with everything that reads them, ``sparsity`` =
    fraction of each group's units (see :mod:`sparseprune.prune.channel`).
    """

    kind: str
    n: int = 2
    m: int = 4
    block_size: tuple[int, int] = (32, 32)
    sparsity: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return self.kind

    def overall_sparsity(self, sparsity: float | None = None) -> float | None:
        s = self.sparsity if sparsity is None else sparsity
        if self.kind == "nm":
            return 1 - self.n / self.m
        if self.kind == "hybrid":
            return None if s is None else (1 + s) / 2
        return s

    @property
    def packable(self) -> bool:
        """Whether a kernel format exists: N:4 with N <= 2 (packs as 2:4), block, hybrid."""
        return (self.kind == "nm" and self.m == 4 and self.n <= 2) or self.kind in ("block", "hybrid")

    def shape_problem(self, shape) -> str | None:
        """None if a weight of ``shape`` [out, in] can take this pattern, else why not."""
        n_out, n_in = shape
        if self.kind == "nm" and n_in % self.m:
            return f"in_features={n_in} is not a multiple of {self.m}"
        if self.kind in ("block", "hybrid"):
            bh, bw = self.block_size
            if n_out % bh or n_in % bw:
                return f"shape {n_out}x{n_in} is not divisible into {bh}x{bw} blocks"
            if self.kind == "hybrid" and bw % 8:
                return f"hybrid block width {bw} is not a multiple of 8"
        return None


def parse_pattern(pattern: str | Pattern, *, sparsity=None, block_size=(32, 32)) -> Pattern:
    if isinstance(pattern, Pattern):
        return pattern
    bs = tuple(int(b) for b in (block_size if isinstance(block_size, (tuple, list)) else (block_size, block_size)))
    if len(bs) != 2 or min(bs) <= 0:
        raise ValueError(f"block_size must be two positive ints, got {block_size}")
    if sparsity is not None and not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    p = str(pattern).strip().lower()
    mt = re.fullmatch(r"(\d+):(\d+)", p)
    if mt:
        n, m = int(mt.group(1)), int(mt.group(2))
        if not 0 < n < m:
            raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern}")
        return Pattern("nm", n=n, m=m)
    if p in ("block", "bsr"):
        return Pattern("block", block_size=bs, sparsity=sparsity)
    if p == "hybrid":
        return Pattern("hybrid", block_size=bs, sparsity=sparsity)
    if p == "unstructured":
        return Pattern("unstructured", sparsity=sparsity)
    if p == "channel":
        return Pattern("channel", sparsity=sparsity)
    raise ValueError(f"unknown pattern {pattern!r}: use 'N:M' (e.g. '2:4'), 'block', 'hybrid', 'unstructured' "
                     f"or 'channel'")


def satisfies(weight: torch.Tensor, pattern: Pattern, sparsity: float | None) -> bool:
    """Whether the zeros already in ``weight`` meet ``pattern`` (then it is packed as it is)."""
    w = weight.detach()
    if pattern.shape_problem(w.shape):
        return False
    if pattern.kind == "nm":
        return bool((w.reshape(w.shape[0], -1, pattern.m).ne(0).sum(-1) <= pattern.n).all())
    if pattern.kind == "unstructured":
        return sparsity is not None and (w == 0).float().mean().item() >= sparsity
    if pattern.kind == "channel":
        return False  # a property of a group of layers, not of one weight
    bh, bw = pattern.block_size
    blocks = w.reshape(w.shape[0] // bh, bh, w.shape[1] // bw, bw).ne(0).any(dim=(1, 3))
    frac_empty = 1 - blocks.float().mean().item()
    ok = frac_empty >= sparsity - 1e-9 if sparsity is not None else frac_empty > 0
    if ok and pattern.kind == "hybrid":
        ok = satisfies(w, Pattern("nm", 2, 4), None)
    return ok
