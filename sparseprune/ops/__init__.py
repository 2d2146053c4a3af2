"""Typed wrappers over ``torch.ops.sparseprune.*``, each beside its fake kernel and reference."""

from .bsr import bsr_linear
from .hybrid import hybrid_linear
from .semi24 import semi24_linear

__all__ = ["semi24_linear", "bsr_linear", "hybrid_linear"]
