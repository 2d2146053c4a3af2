"""Which nn.Linear and nn.Conv2d layers a pattern applies to, and why the others are left dense.

A Conv2d is pruned as its GEMM weight [O, kh*kw*C] in the channels-last reduction order
(:mod:`sparseprune.formats.conv`): an N:M group is M consecutive input channels at one kernel
position, so 2:4 needs in_channels % 4 == 0. Grouped and depthwise convs (groups > 1) are left
dense: their weight is many small GEMMs, none worth a sparse kernel.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from ..formats.conv import gemm_shape
from .patterns import Pattern


@dataclass
class LayerPlan:
    name: str
    module: nn.Module  # nn.Linear or nn.Conv2d (groups=1)
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


def conv_problem(conv: nn.Conv2d, pattern: Pattern) -> str | None:
    """None if ``conv`` can take ``pattern`` as a GEMM weight, else why not."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return f"{kind} conv (groups={conv.groups}) is left dense: only groups=1 convs are one GEMM"
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} overrides Conv2d.forward (its computation is not known)"
    if pattern.kind in ("nm", "hybrid") and conv.in_channels % pattern.m:
        return (f"in_channels={conv.in_channels} is not a multiple of {pattern.m} (an N:M group is {pattern.m} "
                f"input channels at one kernel position)")
    return pattern.shape_problem(gemm_shape(conv))


def select_layers(model: nn.Module, pattern: Pattern, *, sparsity=None, include=None, exclude=None,
                  dtypes=(torch.float32, torch.bfloat16, torch.float16), extra_check=None):
    """(plans, skipped) where skipped is [(name, shape, reason)] for layers left dense (shapes are
    GEMM shapes: [out, kh*kw*in] for a conv).

    ``include``/``exclude`` are fnmatch globs over module names (``"model.layers.*.mlp.*"``,
    ``"lm_head"``). ``extra_check(name, module) -> reason | None`` adds a caller's own rules.
    """
    tied = tied_parameter_names(model)
    plans, skipped = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        if isinstance(mod, nn.Conv2d):
            shape = gemm_shape(mod)
            reason = conv_problem(mod, pattern)
        else:
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
