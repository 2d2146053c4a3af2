"""sparseprune: prune PyTorch models to 2:4, block-sparse or hybrid patterns and run them fast."""

from ._native import build_info
from .formats import BlockSparseWeight, FormatError, HybridWeight, PackedWeight, Semi24Weight

__version__ = "0.1.0"

__all__ = ["build_info", "BlockSparseWeight", "FormatError", "HybridWeight", "PackedWeight", "Semi24Weight"]
