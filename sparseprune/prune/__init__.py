"""Pruning front end: patterns, scoring methods, mask makers and layer selection."""

from .api import prune, prune_model
from .masks import make_mask, nm_mask
from .methods import METHODS, Magnitude, PruningMethod, get_method, register_method
from .patterns import Pattern, parse_pattern, satisfies

__all__ = ["prune", "prune_model", "make_mask", "nm_mask", "METHODS", "Magnitude", "PruningMethod",
           "get_method", "register_method", "Pattern", "parse_pattern", "satisfies"]
