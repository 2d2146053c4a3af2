"""Which nn.Linear layers a pattern applies to, and why the others are left dense."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .patterns import Pattern


@dataclass
class LayerPlan:
    name: str
    module: nn.Linear
    pattern: Pattern
    sparsity: float | None


def _matches(name: str, globs) -> bool:
    if globs is None:
        return False
    if isinstance(globs, str):
        globs = [globs]
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def layer_sparsity(name: str, sparsity) -> float | None:
    """``sparsity`` is a float for every layer, or {glob: float} (first matching glob wins)."""
    if isinstance(sparsity, dict):
        for g, s in sparsity.items():
            if fnmatch.fnmatchcase(name, g):
                return s
        return None
    return sparsity


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters shared by more than one module (e.g. lm_head tied to embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def select_layers(model: nn.Module, pattern: Pattern, *, sparsity=None, include=None, exclude=None,
                  dtypes=(torch.float32, torch.bfloat16, torch.float16), extra_check=None):
    """(plans, skipped) where skipped is [(name, shape, reason)] for Linear layers left dense.

    ``include``/``exclude`` are fnmatch globs over module names (``"model.layers.*.mlp.*"``,
    ``"lm_head"``). ``extra_check(name, module) -> reason | None`` adds a caller's own rules.
    """
    tied = tied_parameter_names(model)
    plans, skipped = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        shape = tuple(mod.weight.shape)
        reason = pattern.shape_problem(shape)
        if reason is None and mod.weight.dtype not in dtypes:
            reason = f"dtype {mod.weight.dtype} is not supported (use one of {[str(d) for d in dtypes]})"
        if reason is None and f"{name}.weight" in tied:
            reason = "weight is tied to another module's parameter"
        s = layer_sparsity(name, sparsity)
        if reason is None and pattern.kind != "nm" and s is None and isinstance(sparsity, dict):
            reason = "no sparsity given for this layer"
        if reason is None and extra_check is not None:
            reason = extra_check(name, mod)
        if reason:
            skipped.append((name, shape, reason))
        else:
            plans.append(LayerPlan(name, mod, pattern, s))
    return plans, skipped
