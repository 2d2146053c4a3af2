"""Hybrid: BSR whose stored blocks are themselves 2:4 (Semi24 rows inside each block).

  values [nnzb, bh, bw/2]  kept values of each block row segment
  meta   [nnzb, bh, bw/8]  2-bit positions as in Semi24 (bw % 8 == 0)
  crow, col                as in BlockSparse
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import semi24
from .base import PackedWeight, _require
from .bsr import block_grid, blocks_of, check_structure, scatter_blocks, structure_from_block_mask


@dataclass
class HybridWeight(PackedWeight):
    kind = "hybrid"
    values: torch.Tensor
    meta: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor

    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2]) * 2

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_dense(cls, w: torch.Tensor, block_size=(32, 32), block_mask: torch.Tensor | None = None) -> "HybridWeight":
        """Stores the nonzero blocks (or those ``block_mask`` keeps); each must be 2:4 inside."""
        _require(w.dim() == 2, f"expected a 2-D weight, got shape {tuple(w.shape)}")
        bh, bw = block_size
        _require(bw % 8 == 0, f"hybrid blocks need a width that is a multiple of 8, got {bw}")
        w = w.detach()
        blocks = blocks_of(w, block_size)
        if block_mask is None:
            block_mask = blocks.ne(0).any(dim=(2, 3))
        block_mask = block_mask.to(torch.bool)
        crow, col = structure_from_block_mask(block_mask)
        kept = blocks[block_mask]  # [nnzb, bh, bw]
        nnzb = kept.shape[0]
        values, meta = semi24.pack_rows(kept.reshape(nnzb * bh, bw))
        return cls(shape=tuple(w.shape), values=values.reshape(nnzb, bh, bw // 2),
                   meta=meta.reshape(nnzb, bh, bw // 8), crow=crow, col=col)

    def to_dense(self) -> torch.Tensor:
        bh, bw = self.block_size
        blocks = semi24.unpack_rows(self.values.reshape(-1, bw // 2), self.meta.reshape(-1, bw // 8), bw)
        return scatter_blocks(blocks.reshape(self.nnzb, bh, bw), self.crow, self.col, self.shape)

    def validate(self, *, name: str = "weight") -> None:
        _require(isinstance(self.values, torch.Tensor) and self.values.is_floating_point() and self.values.dim() == 3,
                 f"{name}.values must be a floating-point [nnzb, bh, bw/2] tensor")
        bh, bw = self.block_size
        _require(bw % 8 == 0, f"{name}: hybrid block width {bw} must be a multiple of 8")
        nbr, nbc, _, _ = block_grid(self.shape, (bh, bw))
        _require(isinstance(self.meta, torch.Tensor) and self.meta.dtype == torch.uint8,
                 f"{name}.meta must be uint8, got {getattr(self.meta, 'dtype', type(self.meta))}")
        _require(tuple(self.meta.shape) == (self.nnzb, bh, bw // 8),
                 f"{name}.meta has shape {tuple(self.meta.shape)}, expected {(self.nnzb, bh, bw // 8)}")
        check_structure(self.crow, self.col, nbr, nbc, self.nnzb, name)
        _require(self.crow.device == self.values.device == self.col.device == self.meta.device,
                 f"{name}: tensors are on different devices")
        semi24.check_meta(self.meta, bw, f"{name}.meta")
