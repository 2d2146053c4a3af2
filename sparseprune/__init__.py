"""sparseprune: prune PyTorch models to 2:4, block-sparse or hybrid patterns and run them fast."""

from . import ops  # noqa: F401  (registers the fake kernels torch.compile needs, before any first call)
from ._native import build_info
from ._version import __version__
from .checkpoint import load, save, save_pretrained
from .conv import SparseConv2d
from .convert import convert, pack
from .formats import BlockSparseWeight, FormatError, HybridWeight, PackedWeight, Semi24Weight
from .modules import SparseLinear
from .prune import prune

__all__ = ["__version__", "build_info", "convert", "pack", "prune", "save", "save_pretrained", "load", "SparseLinear",
           "SparseConv2d",
           "BlockSparseWeight", "FormatError", "HybridWeight", "PackedWeight", "Semi24Weight"]
