"""Packed weight formats: Semi24 (2:4), BlockSparse (BSR) and Hybrid (BSR of 2:4 blocks)."""

from .base import FormatError, PackedWeight
from .bsr import BlockSparseWeight
from .hybrid import HybridWeight
from .semi24 import Semi24Weight

FORMATS: dict[str, type[PackedWeight]] = {
    Semi24Weight.kind: Semi24Weight,
    BlockSparseWeight.kind: BlockSparseWeight,
    HybridWeight.kind: HybridWeight,
}

__all__ = ["FormatError", "PackedWeight", "Semi24Weight", "BlockSparseWeight", "HybridWeight", "FORMATS"]
