"""Tensor-parallel slicing of packed weights, without unpacking them.

Column parallelism gives each rank a range of output rows, row parallelism a range of input
columns. A packed weight can only be cut where its format has a boundary:

  format   rows (output) cut at      columns (input) cut at
  semi24   any row                   a 2:4 group (multiple of 4); the 2-bit codes are re-packed
                                     when the cut falls inside a metadata byte (2 groups per byte)
  bsr      a block row (bh)          a block column (bw)
  hybrid   a block row (bh)          a block column (bw; blocks are whole 2:4 rows, bw % 8 == 0)

A cut anywhere else raises; nothing is padded. Every function returns a new packed weight of the
same format over contiguous tensors, valid for ``validate()``.
"""

from __future__ import annotations

import torch

from ..formats import FORMATS, PackedWeight
from ..formats.base import FormatError
from ..formats.bsr import block_rows_of

def alignment(kind: str, block_size, axis: str) -> int:
    """The granularity at which a ``kind`` weight can be cut along ``axis`` ("rows" or "cols")."""
    if kind not in FORMATS:
        raise ValueError(f"unknown packed format {kind!r}")
    if kind == "semi24":
        return 1 if axis == "rows" else 4
    bh, bw = block_size
    return bh if axis == "rows" else bw


def describe(kind: str, block_size) -> str:
    """Human-readable format name for error messages: 'semi24 (2:4)', 'bsr 32x32 blocks', ..."""
    if kind == "semi24":
        return "semi24 (2:4)"
    return f"{kind} {block_size[0]}x{block_size[1]} blocks"


def _check_range(w: PackedWeight, axis: str, start: int, stop: int) -> None:
    size = w.shape[0] if axis == "rows" else w.shape[1]
    align = alignment(w.kind, getattr(w, "block_size", None), axis)
    if not (0 <= start <= stop <= size) or start % align or (stop % align and stop != size):
        raise FormatError(f"cannot cut a {describe(w.kind, getattr(w, 'block_size', None))} weight of shape "
                          f"{tuple(w.shape)} at {axis} [{start}, {stop}): cuts must fall on multiples of {align}")


def _block_tensors(w: PackedWeight) -> dict[str, torch.Tensor]:
    """The tensors of a block format indexed by stored block (all but crow and col)."""
    return {n: t for n, t in w.tensors().items() if n not in ("crow", "col")}


def take_rows(w: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Output rows [start, stop) of ``w``."""
    _check_range(w, "rows", start, stop)
    fmt = type(w)
    shape = (stop - start, w.shape[1])
    if w.kind == "semi24":
        return fmt(shape=shape, values=w.values[start:stop].contiguous(), meta=w.meta[start:stop].contiguous())
    bh = w.block_size[0]
    r0, r1 = start // bh, stop // bh
    lo, hi = int(w.crow[r0]), int(w.crow[r1])
    parts = {n: t[lo:hi].contiguous() for n, t in _block_tensors(w).items()}
    return fmt(shape=shape, crow=(w.crow[r0:r1 + 1] - lo).contiguous(), col=w.col[lo:hi].contiguous(), **parts)


def take_cols(w: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Input columns [start, stop) of ``w``."""
    _check_range(w, "cols", start, stop)
    fmt = type(w)
    n, k = w.shape
    shape = (n, stop - start)
    if w.kind == "semi24":
        # One nibble per group of 4 inputs, two per byte (low nibble first): unpack the codes, cut
        # at the group, re-pack (the cut may fall inside a byte when start % 8 == 4).
        nib = torch.stack([w.meta & 0xF, w.meta >> 4], dim=-1).reshape(n, -1)[:, start // 4: stop // 4]
        if nib.shape[1] % 2:
            nib = torch.cat([nib, torch.zeros(n, 1, dtype=torch.uint8, device=nib.device)], dim=1)
        meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
        return fmt(shape=shape, values=w.values[:, start // 2: stop // 2].contiguous(), meta=meta)
    bw = w.block_size[1]
    c0, c1 = start // bw, stop // bw
    col = w.col.to(torch.int64)
    keep = (col >= c0) & (col < c1)
    nbr = w.crow.numel() - 1
    counts = torch.bincount(block_rows_of(w.crow)[keep], minlength=nbr)
    crow = torch.zeros(nbr + 1, dtype=torch.int64, device=w.crow.device)
    crow[1:] = counts.cumsum(0)
    parts = {name: t[keep].contiguous() for name, t in _block_tensors(w).items()}
    return fmt(shape=shape, crow=crow.to(torch.int32), col=(col[keep] - c0).to(torch.int32).contiguous(), **parts)


def cat_rows(weights: list[PackedWeight]) -> PackedWeight:
    """Stacks weights of one format, dtype, input size (and block size) along the output rows."""
    first = weights[0]
    if len(weights) == 1:
        return first
    for w in weights[1:]:
        if (w.kind, w.dtype, w.shape[1], getattr(w, "block_size", None)) != \
                (first.kind, first.dtype, first.shape[1], getattr(first, "block_size", None)):
            raise FormatError("cat_rows needs weights of one format, dtype, input size and block size")
    fmt = type(first)
    shape = (sum(w.shape[0] for w in weights), first.shape[1])
    if first.kind == "semi24":
        return fmt(shape=shape, values=torch.cat([w.values for w in weights]), meta=torch.cat([w.meta for w in weights]))
    crows, offset = [first.crow[:1]], 0
    for w in weights:
        crows.append(w.crow[1:] + offset)
        offset += int(w.crow[-1])
    parts = {n: torch.cat([_block_tensors(w)[n] for w in weights]) for n in _block_tensors(first)}
    return fmt(shape=shape, crow=torch.cat(crows).to(torch.int32), col=torch.cat([w.col for w in weights]), **parts)


def can_split(kind: str, block_size, axis: str, total: int, parts: int) -> bool:
    """Whether ``total`` rows/cols split evenly into ``parts`` pieces cut on ``kind``'s boundaries."""
    return total % parts == 0 and (total // parts) % alignment(kind, block_size, axis) == 0


__all__ = ["alignment", "describe", "take_rows", "take_cols", "cat_rows", "can_split"]
