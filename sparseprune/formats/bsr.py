"""BlockSparse: block compressed sparse rows (BSR) with int32 indices.

  values [nnzb, bh, bw]   the stored blocks, block rows in order, columns ascending within a row
  crow   [N/bh + 1] i32   block row r owns values[crow[r]:crow[r+1]]
  col    [nnzb] i32       block column of each stored block, in [0, K/bw), strictly increasing per row
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FormatError, PackedWeight, _require


def block_grid(shape, block_size) -> tuple[int, int, int, int]:
    (N, K), (bh, bw) = shape, block_size
    if bh <= 0 or bw <= 0 or N % bh or K % bw:
        raise FormatError(f"weight shape {tuple(shape)} is not divisible into {bh}x{bw} blocks")
    return N // bh, K // bw, bh, bw


def blocks_of(w: torch.Tensor, block_size) -> torch.Tensor:
    """[N, K] -> [N/bh, K/bw, bh, bw] view-copy of the blocks."""
    nbr, nbc, bh, bw = block_grid(w.shape, block_size)
    return w.reshape(nbr, bh, nbc, bw).permute(0, 2, 1, 3)


def structure_from_block_mask(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [nbr, nbc] -> (crow, col) int32."""
    counts = block_mask.sum(dim=1)
    crow = torch.zeros(block_mask.shape[0] + 1, dtype=torch.int64, device=block_mask.device)
    crow[1:] = counts.cumsum(0)
    col = block_mask.nonzero()[:, 1]
    return crow.to(torch.int32), col.to(torch.int32).contiguous()


def check_structure(crow: torch.Tensor, col: torch.Tensor, nbr: int, nbc: int, nnzb: int, name: str) -> None:
    for t, tn in ((crow, "crow"), (col, "col")):
        _require(isinstance(t, torch.Tensor) and t.dtype == torch.int32,
                 f"{name}.{tn} must be int32, got {getattr(t, 'dtype', type(t))}")
        _require(t.dim() == 1, f"{name}.{tn} must be 1-D, got shape {tuple(t.shape)}")
    _require(crow.numel() == nbr + 1, f"{name}.crow has {crow.numel()} entries, expected {nbr + 1}")
    _require(col.numel() == nnzb, f"{name}.col has {col.numel()} entries, expected one per stored block ({nnzb})")
    c = crow.to(torch.int64).cpu()
    _require(c[0].item() == 0 and c[-1].item() == nnzb, f"{name}.crow must run from 0 to nnzb={nnzb}, got {c[0].item()}..{c[-1].item()}")
    _require(bool((c[1:] >= c[:-1]).all()), f"{name}.crow must be non-decreasing")
    k = col.to(torch.int64).cpu()
    if nnzb:
        bad = (k < 0) | (k >= nbc)
        if bad.any():
            i = bad.nonzero()[0].item()
            raise FormatError(f"{name}.col[{i}] = {k[i].item()} is out of range [0, {nbc})")
        # strictly increasing within each block row: a drop is only allowed at a row start
        row_start = torch.zeros(nnzb, dtype=torch.bool)
        starts = c[:-1][c[:-1] < nnzb]
        row_start[starts] = True
        inc = torch.ones(nnzb, dtype=torch.bool)
        inc[1:] = k[1:] > k[:-1]
        bad = ~(inc | row_start)
        if bad.any():
            i = bad.nonzero()[0].item()
            raise FormatError(f"{name}.col must be strictly increasing within a block row (duplicate or unsorted at {i})")


def block_rows_of(crow: torch.Tensor) -> torch.Tensor:
    """Block row index of each stored block."""
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def scatter_blocks(blocks: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """Dense [N, K] from stored blocks [nnzb, bh, bw]."""
    N, K = shape
    bh, bw = blocks.shape[1], blocks.shape[2]
    grid = torch.zeros(N // bh, K // bw, bh, bw, dtype=dtype or blocks.dtype, device=blocks.device)
    grid[block_rows_of(crow), col.to(torch.int64)] = blocks.to(grid.dtype)
    return grid.permute(0, 2, 1, 3).reshape(N, K)


@dataclass
class BlockSparseWeight(PackedWeight):
    kind = "bsr"
    values: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor

    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_dense(cls, w: torch.Tensor, block_size=(32, 32), block_mask: torch.Tensor | None = None) -> "BlockSparseWeight":
        """Stores the blocks of ``w`` that have a nonzero (or that ``block_mask`` [N/bh, K/bw] keeps)."""
        _require(w.dim() == 2, f"expected a 2-D weight, got shape {tuple(w.shape)}")
        w = w.detach()
        blocks = blocks_of(w, block_size)
        if block_mask is None:
            block_mask = blocks.ne(0).any(dim=(2, 3))
        _require(tuple(block_mask.shape) == tuple(blocks.shape[:2]),
                 f"block_mask has shape {tuple(block_mask.shape)}, expected {tuple(blocks.shape[:2])}")
        block_mask = block_mask.to(torch.bool)
        crow, col = structure_from_block_mask(block_mask)
        values = blocks[block_mask].contiguous()
        return cls(shape=tuple(w.shape), values=values, crow=crow, col=col)

    def to_dense(self) -> torch.Tensor:
        return scatter_blocks(self.values, self.crow, self.col, self.shape)

    def validate(self, *, name: str = "weight") -> None:
        _require(isinstance(self.values, torch.Tensor) and self.values.is_floating_point() and self.values.dim() == 3,
                 f"{name}.values must be a floating-point [nnzb, bh, bw] tensor")
        nbr, nbc, _, _ = block_grid(self.shape, self.block_size)
        check_structure(self.crow, self.col, nbr, nbc, self.nnzb, name)
        _require(self.crow.device == self.values.device == self.col.device, f"{name}: tensors are on different devices")
