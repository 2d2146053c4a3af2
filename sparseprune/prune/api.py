"""``prune()``: make masks for the selected layers and apply them to the dense weights in place."""

from __future__ import annotations

from torch import nn

from ..formats.conv import gemm_shape, gemm_weight
from ..report import LayerReport, Report
from .calibrate import prune_layers
from .channel import prune_channels
from .methods import get_method
from .patterns import parse_pattern, satisfies
from .permute import forget_permutation, weight_in_packing_order
from .select import select_layers


def prune_model(model: nn.Module, pattern="2:4", *, sparsity=None, block_size=(32, 32), method="magnitude",
                include=None, exclude=None, calibration=None, global_budget=False, strict=False,
                extra_check=None, progress=None, permute=False):
    """Core of prune() and convert(). Returns (report, {name: (plan, mask)})."""
    pat = parse_pattern(pattern, sparsity=sparsity if not isinstance(sparsity, dict) else None, block_size=block_size)
    if pat.kind == "channel":
        raise ValueError("pattern 'channel' is pruned by prune_channels(), not layer by layer")
    meth = get_method(method)
    plans, skipped = select_layers(model, pat, sparsity=sparsity, include=include, exclude=exclude,
                                   extra_check=extra_check)
    if strict and skipped:
        lines = "; ".join(f"{n}: {r}" for n, _, r in skipped)
        raise ValueError(f"strict=True and {len(skipped)} layer(s) cannot take pattern {pat.name}: {lines}")
    report = Report(pattern=pat.name, method=meth.name)
    for name, shape, reason in skipped:
        report.layers.append(LayerReport(name, shape, "skipped", pat.name, reason=reason))

    # A weight pruned earlier with permute=True has the pattern in its remembered input order.
    as_is = {p.name for p in plans if satisfies(weight_in_packing_order(p.module), p.pattern, p.sparsity)}
    todo = [p for p in plans if p.name not in as_is]
    for p in todo:
        forget_permutation(p.module)
    for p in todo:
        if p.pattern.kind != "nm" and p.sparsity is None and not global_budget:
            raise ValueError(f"layer {p.name}: pattern '{p.pattern.name}' needs sparsity= (its weight is not "
                             f"already {p.pattern.name}-sparse)")

    if global_budget and todo and pat.kind != "nm" and (sparsity is None or isinstance(sparsity, dict)):
        raise ValueError("global_budget=True needs one float sparsity for the whole model")
    masks = prune_layers(model, todo, meth, calibration, global_budget=global_budget, progress=progress,
                         permute=permute) if todo else {}
    results: dict[str, tuple] = {}
    for p in plans:
        if p.name in as_is:
            mask = gemm_weight(p.module) != 0
        else:
            mask = masks[p.name]
        results[p.name] = (p, mask)
        zero = 1.0 - mask.float().mean().item()
        conv = isinstance(p.module, nn.Conv2d)
        note = "inputs not permuted (permute=True is not implemented for Conv2d)" if conv and permute else ""
        report.layers.append(LayerReport(p.name, gemm_shape(p.module), "packed-as-is" if p.name in as_is else "pruned",
                                         pat.name, sparsity=zero, reason=note))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda lr: order.get(lr.name, 0))
    return report, results


def prune(model: nn.Module, pattern="2:4", *, sparsity=None, block_size=(32, 32), method="magnitude", include=None,
          exclude=None, calibration=None, global_budget=False, strict=False, progress=None,
          permute=False) -> Report:
    """Prune the model's nn.Linear and nn.Conv2d weights in place (they stay dense) and return a report.

    A Conv2d (groups=1) is pruned as its GEMM weight [O, kh*kw*C] in the channels-last reduction
    order (2:4 groups are 4 input channels at one kernel position; see sparseprune.formats.conv).

    ``pattern``: "N:M" (e.g. "2:4", "4:8"), "block", "hybrid", "unstructured" or "channel". ``sparsity``: a
    float, or {module-name glob: float}; for block and hybrid it is the fraction of blocks pruned.
    "channel" zeroes whole channels, neurons and heads (Linear and Conv layers, with everything
    that reads them; ``sparsity`` = fraction of each group's units; methods "magnitude", "wanda",
    "flap", "sparsegpt"); ``convert(model, "channel")`` then removes them (see
    :mod:`sparseprune.prune.channel`).
    ``global_budget=True`` ranks blocks (or weights) of all layers together under one sparsity.
    ``permute=True`` (N:4 and hybrid) searches an input-channel order per layer that keeps more
    score; the pruned weights stay in the model's order (same function as a masked model) and
    ``convert()`` later packs them in the remembered order. ``progress``: a bar of the layers
    pruned (True / False; default: when stderr is a terminal).
    """
    if parse_pattern(pattern).kind == "channel":
        if permute:
            raise ValueError("permute=True is for N:4 and hybrid patterns, not 'channel'")
        return prune_channels(model, sparsity=sparsity, method=method, include=include, exclude=exclude,
                              calibration=calibration, global_budget=global_budget, strict=strict, progress=progress)
    report, _ = prune_model(model, pattern, sparsity=sparsity, block_size=block_size, method=method,
                            include=include, exclude=exclude, calibration=calibration,
                            global_budget=global_budget, strict=strict, progress=progress, permute=permute)
    return report
