"""sparseprune: prune PyTorch models to 2:4, block-sparse or hybrid patterns and run them fast."""

from ._native import build_info
from .formats import BlockSparseWeight, FormatError, HybridWeight, PackedWeight, Semi24Weight

__version__ = "0.1.0"

__all__ = ["build_info", "BlockSparseWeight", "FormatError", "HybridWeight", "PackedWeight", "Semi24Weight"]

# The op wrappers register the fake kernels torch.compile needs; import them up front so a model
# compiled before its first eager call still traces.
from . import ops  # noqa: E402,F401
from .convert import convert, pack  # noqa: E402
from .modules import SparseLinear  # noqa: E402
from .prune import prune  # noqa: E402

from .checkpoint import load, save  # noqa: E402

__all__ += ["convert", "pack", "prune", "SparseLinear", "save", "load"]
