"""``convert()``: prune (if needed), pack and swap each eligible nn.Linear for a SparseLinear (and
each eligible nn.Conv2d for a SparseConv2d)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from . import autotune
from . import backends as _backends
from .conv import SparseConv2d
from .formats import BlockSparseWeight, HybridWeight, Semi24Weight
from .formats.conv import gemm_shape, gemm_weight
from .modules import SparseLinear, replace_module, tune_model
from .prune.api import prune_model
from .prune.channel import prune_channels
from .prune.patterns import parse_pattern
from .prune.permute import fold_permutations


def pack(weight: torch.Tensor, pattern, mask: torch.Tensor | None = None):
    """Packs a weight that already has ``pattern``'s zeros (or ``mask``) into its format."""
    w = weight.detach()
    if pattern.kind == "nm":
        return Semi24Weight.from_dense(w, mask)
    bh, bw = pattern.block_size
    keep = mask if mask is not None else w != 0
    block_keep = keep.reshape(w.shape[0] // bh, bh, w.shape[1] // bw, bw).any(dim=(1, 3))
    if pattern.kind == "block":
        return BlockSparseWeight.from_dense(w, pattern.block_size, block_keep)
    return HybridWeight.from_dense(w * keep if mask is not None else w, pattern.block_size, block_keep)


def convert(model: nn.Module, pattern: str = "2:4", *, sparsity=None, block_size=(32, 32), method="magnitude",
            include=None, exclude=None, backend: str = "auto", strict: bool = False, calibration=None,
            global_budget: bool = False, progress: bool | None = None, permute=False) -> nn.Module:
    """Replace each eligible ``nn.Linear`` of ``model`` (in place) with a :class:`SparseLinear`, and
    each eligible ``nn.Conv2d`` (groups=1) with a :class:`~sparseprune.conv.SparseConv2d`.

    A conv is pruned and packed as its GEMM weight [O, kh*kw*C] in the channels-last reduction
    order (2:4 groups: 4 input channels at one kernel position; needs in_channels % 4 == 0);
    grouped and depthwise convs stay dense. Calibrated methods see its unfolded input patches.

    pattern: "2:4" (or sparser N:4), "block", "hybrid" or "channel". Weights that already have the pattern
    are packed as they are; dense ones are pruned first with ``method`` ("magnitude", or a
    calibrated method given ``calibration``). ``sparsity`` is the fraction of blocks pruned for
    block/hybrid (a float, or {module-name glob: float}). ``include``/``exclude``: module-name
    globs. ``backend``: "auto" or a backend name ("cpu", "triton", "cuda"). Layers that cannot
    be served are left dense and listed in the report, or raise ``ValueError`` with strict=True.
    ``permute``: True (2:4 and hybrid) to search an input-channel order per layer that keeps more
    score; it is folded into the producing layer where the graph is known (gated MLPs, BERT
    FFNs, Linear->activation->Linear in nn.Sequential) or given as {consumer: [producers]},
    else applied as a gather of x inside the SparseLinear. ``progress``: a bar of the layers
    pruned (default: when stderr is a terminal).

    ``"channel"`` removes whole channels, neurons and heads (``sparsity`` = fraction of each group's
    units; None removes those an earlier ``prune(model, "channel", ...)`` zeroed), leaving smaller
    dense layers; ``method`` "magnitude", "wanda", "flap" or "sparsegpt"; ``backend`` does not apply
    (see :mod:`sparseprune.prune.channel`).

    Returns ``model``; the report is ``model.sparseprune_report`` (print it for a table).
    """
    pat = parse_pattern(pattern, sparsity=sparsity if not isinstance(sparsity, dict) else None, block_size=block_size)
    if pat.kind == "channel":
        if permute:
            raise ValueError("permute=True is for N:4 and hybrid patterns, not 'channel'")
        model.sparseprune_report = prune_channels(model, sparsity=sparsity, method=method, include=include,
                                                  exclude=exclude, calibration=calibration,
                                                  global_budget=global_budget, strict=strict, progress=progress,
                                                  shrink=True)
        return model
    if not pat.packable:
        raise ValueError(f"pattern {pat.name!r} has no kernels: convert() serves '2:4' (or N:4 with N <= 2), 'block' "
                         f"and 'hybrid'; use sparseprune.prune() to study other patterns")
    kind = {"nm": "semi24", "block": "bsr", "hybrid": "hybrid"}[pat.kind]

    def backend_check(name, mod):
        # What the backends' unsupported_reason() reads of a packed weight, before one is packed.
        spec = SimpleNamespace(kind=kind, dtype=mod.weight.dtype, shape=gemm_shape(mod),
                               block_size=None if kind == "semi24" else tuple(pat.block_size))
        chosen, why = _backends.choose_backend(spec, mod.weight.device, backend)
        return None if chosen else f"no backend can run it: {why}"

    report, results = prune_model(model, pat, sparsity=sparsity, block_size=block_size, method=method,
                                  include=include, exclude=exclude, calibration=calibration,
                                  global_budget=global_budget, strict=strict, extra_check=backend_check,
                                  progress=progress, permute=bool(permute))
    perms = fold_permutations(model, results, permute if isinstance(permute, dict) else None)
    for name, (plan, mask) in results.items():
        lin = plan.module
        in_perm, note = perms.get(name, (None, ""))
        w = gemm_weight(lin) if in_perm is None else lin.weight[:, in_perm]
        packed = pack(w, pat, mask if in_perm is None else mask[:, in_perm])
        if isinstance(lin, nn.Conv2d):
            sparse = SparseConv2d.from_conv(lin, packed, backend=backend)
        else:
            sparse = SparseLinear(packed, lin.bias, backend=backend, in_perm=in_perm)
        if note:
            report[name].reason = note
        replace_module(model, name, sparse)
        lr = report[name]
        lr.status = "converted" if lr.status == "pruned" else lr.status
        lr.backend = sparse.backend
        lr.bytes_ratio = packed.nbytes / packed.dense_nbytes
    if backend == "auto":
        # Measure now, eagerly and outside any torch.compile trace (see sparseprune/autotune.py).
        autotune.note_plans(report, tune_model(model), results)
    model.sparseprune_report = report
    return model
