"""Semi24: 2:4 semi-structured weights as kept values plus bit-packed 2-bit positions.

Layout (the canonical one; GPU backends re-pack it into their fragment order):
  values [N, K/2]            the two kept weights of each group of 4 inputs, in input order
  meta   [N, ceil(K/8)] u8   group g keeps positions p0 < p1, stored as nibble p0 | p1 << 2 in
                             byte g // 2 (low nibble for even g); a pad nibble (K/4 odd) is 0
fp16/bf16 take K + K/8 bytes per row (9/16 of dense), fp32 2K + K/8 (0.53 of dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FormatError, PackedWeight, _require

# The 6 legal nibbles: p0 < p1.
VALID_NIBBLES = sorted(p0 | (p1 << 2) for p0 in range(4) for p1 in range(4) if p0 < p1)
_VALID_LUT = torch.zeros(16, dtype=torch.bool)
_VALID_LUT[VALID_NIBBLES] = True


def pack_rows(w: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs rows of ``w`` [R, K] (K % 4 == 0) whose nonzeros (or ``mask``) are 2:4 into (values, meta)."""
    R, K = w.shape
    if K % 4:
        raise FormatError(f"2:4 packing needs the input dimension to be a multiple of 4, got {K}")
    keep = (w != 0) if mask is None else mask.to(torch.bool)
    G = K // 4
    keep = keep.reshape(R, G, 4)
    counts = keep.sum(-1)
    if (counts > 2).any():
        r, g = (counts > 2).nonzero()[0].tolist()
        raise FormatError(f"weight is not 2:4: row {r}, group {g} (inputs {4 * g}..{4 * g + 3}) keeps {counts[r, g].item()} of 4")
    # Choose exactly two positions per group: kept ones first, then the lowest unused ones.
    order_key = keep.to(torch.int16) * 8 + (3 - torch.arange(4, dtype=torch.int16, device=w.device))
    pos = order_key.topk(2, dim=-1).indices.sort(dim=-1).values  # [R, G, 2], ascending
    wv = torch.where(keep, w.reshape(R, G, 4), torch.zeros((), dtype=w.dtype, device=w.device))
    values = torch.gather(wv, 2, pos).reshape(R, K // 2).contiguous()
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # [R, G]
    if G % 2:
        nib = torch.cat([nib, torch.zeros(R, 1, dtype=torch.uint8, device=w.device)], dim=1)
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    return values, meta


def unpack_rows(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: dense [R, K] with zeros at the pruned positions."""
    R = values.shape[0]
    G = K // 4
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(R, 2 * meta.shape[-1])[:, :G].to(torch.int64)
    pos = torch.stack([nib & 3, nib >> 2], dim=-1)  # [R, G, 2]
    dense = torch.zeros(R, G, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, pos, values.reshape(R, G, 2))
    return dense.reshape(R, K)


def check_meta(meta: torch.Tensor, K: int, what: str) -> None:
    """Every real nibble must be one of the 6 legal codes; pad nibbles must be 0."""
    G = K // 4
    flat = meta.reshape(-1, meta.shape[-1])
    if flat.numel() == 0:
        return
    nib = torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(flat.shape[0], -1).to(torch.int64)
    real = nib[:, :G]
    bad = ~_VALID_LUT.to(real.device)[real]
    if bad.any():
        r, g = bad.nonzero()[0].tolist()
        code = real[r, g].item()
        raise FormatError(
            f"{what}: malformed 2:4 position code {code:#x} at row {r}, group {g} (positions must be p0 < p1 in 0..3)"
        )
    if nib.shape[1] > G and (nib[:, G:] != 0).any():
        raise FormatError(f"{what}: pad nibble after the last group must be 0")


@dataclass
class Semi24Weight(PackedWeight):
    kind = "semi24"
    values: torch.Tensor
    meta: torch.Tensor

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor | None = None) -> "Semi24Weight":
        """Packs a 2:4-sparse dense weight (or ``w`` under a 2:4 ``mask``). Raises if not 2:4."""
        _require(w.dim() == 2, f"expected a 2-D weight, got shape {tuple(w.shape)}")
        values, meta = pack_rows(w.detach(), mask)
        return cls(shape=tuple(w.shape), values=values, meta=meta)

    def to_dense(self) -> torch.Tensor:
        return unpack_rows(self.values, self.meta, self.shape[1])

    def validate(self, *, name: str = "weight") -> None:
        N, K = self.shape
        _require(N >= 0 and K > 0 and K % 4 == 0, f"{name}: 2:4 weight needs in_features % 4 == 0, got shape {self.shape}")
        _require(isinstance(self.values, torch.Tensor) and self.values.is_floating_point(),
                 f"{name}.values must be a floating-point tensor")
        _require(tuple(self.values.shape) == (N, K // 2),
                 f"{name}.values has shape {tuple(self.values.shape)}, expected {(N, K // 2)}")
        _require(isinstance(self.meta, torch.Tensor) and self.meta.dtype == torch.uint8,
                 f"{name}.meta must be uint8, got {getattr(self.meta, 'dtype', type(self.meta))}")
        _require(tuple(self.meta.shape) == (N, (K + 7) // 8),
                 f"{name}.meta has shape {tuple(self.meta.shape)}, expected {(N, (K + 7) // 8)}")
        _require(self.meta.device == self.values.device, f"{name}: values and meta are on different devices")
        check_meta(self.meta, K, f"{name}.meta")
