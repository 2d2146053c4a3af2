"""Structured pruning: whole channels, filters, neurons and attention heads removed for real.

``prune(model, "channel", sparsity=s)`` zeroes, in every prunable group (see
:mod:`sparseprune.prune.channel_graph`), the fraction ``s`` of its units with the lowest scores:
the producers' rows and biases, the per-channel parameters of the norms and depthwise convs on
the way, and the consumers' input columns. ``convert(model, "channel", ...)`` then removes them:
every layer of a group shrinks (smaller dense ``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.LayerNorm``...), attention modules and transformers configs get their new head counts and
widths, and the changes are recorded on the model so that ``sparseprune.save`` / ``load`` rebuild
the same shapes. Because the consumers' columns of a removed channel are zero in the masked model,
removing it changes nothing: the shrunk model computes what the masked one does (up to float
summation order), except where a LayerNorm/RMSNorm re-normalises over the kept channels (the
report says so).

Scores (one per unit; higher = keep), each divided by its layer's mean before the layers of a
group are averaged, so layers of different scale weigh the same:

* ``"magnitude"`` (no data): L2 norm of the unit's weights in every producer (rows, scaled by the
  BatchNorm that follows, when one does) and consumer (input columns).
* ``"wanda"``: Wanda's score per input channel of each consumer, ||W[:, j]||_2 * ||X_j||_2
  (calibration activations), summed over the unit. No weight update.
* ``"flap"`` (An et al., 2024): fluctuation Var(X_j) * ||W[:, j]||^2, and the removed channels'
  mean contribution W[:, R] E[X_R] moved into the consumer's bias (a bias is added where the layer
  had none; a bias-free conv followed by BatchNorm gets it folded into the running mean instead).
* ``"sparsegpt"``: OBS saliency ||W[:, j]||^2 / [H^-1]_jj and a least-squares update of the kept
  columns (and bias) of each Linear consumer, W_K += W_R H_RK H_KK^-1 with H = 2 X^T X / n over
  the calibration inputs (the optimal reconstruction of the layer's outputs on that data);
  conv consumers get the mean compensation (their H over unfolded patches is not gathered).

A bias FLAP adds to a bias-free layer (Llama's o_proj/down_proj) is in sparseprune's record and
checkpoints, not in a transformers config (``mlp_bias`` would add biases everywhere): reload such a
model with ``sparseprune.load``, not ``from_pretrained``; per-layer widths that differ likewise.
With ``global_budget=True`` and ``"sparsegpt"`` every consumer's Hessian is gathered in one pass
(in^2 floats each, all at once); per-group budgets go block by block.

``global_budget=True`` ranks the units of all groups together (scores divided by their group's
mean) and removes ``sparsity`` of all units, keeping at least one per group; otherwise every group
loses ``round(sparsity * units)`` units. Calibrated methods use the shared calibration driver
(:func:`sparseprune.prune.calibrate.calibrate_layers`): transformer stacks block by block, so each
block is scored on the outputs of the blocks already pruned.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..report import LayerReport, Report
from .calibrate import _progress, calibrate_layers, collect_stats
from .stats import LayerStats, stats_for
from .channel_graph import Analysis, Group, find_groups, is_layer
from .select import _matches
from .sparsegpt import hessian_inverse

CHANNEL_METHODS = ("magnitude", "wanda", "flap", "sparsegpt")
RECORD_ATTR = "_sparseprune_channels"

# Attributes a record may set on a module (shapes and head counts, all ints); nothing else is
# ever set from a checkpoint.
_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features",
          "normalized_shape", "num_heads", "num_key_value_heads", "num_attention_heads", "all_head_size",
          "intermediate_size", "hidden_size")
_CONFIG_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


class ChannelStats(LayerStats):
    """LayerStats of a conv layer's input channels: every position of the map is one sample."""

    def add(self, x: torch.Tensor) -> None:
        super().add(x.detach().movedim(1, -1))


class _ConsumerPlan:
    """A consumer layer whose inputs the calibration driver records (duck-types LayerPlan)."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    def make_stats(self, hessian: bool) -> LayerStats:
        if isinstance(self.module, nn.Linear):
            return stats_for(self.module, hessian)
        # a conv consumer: per input channel, not per unfolded patch column (no Hessian needed)
        return ChannelStats(self.module.in_channels, self.module.weight.device, False)


# --- the tensors of a member -----------------------------------------------------------------------

def unit_index(units: torch.Tensor, width: int) -> torch.Tensor:
    """Indices along a member's dim covered by ``units`` (each ``width`` consecutive indices)."""
    units = units.to(torch.int64)
    return (units[:, None] * width + torch.arange(width, device=units.device)).reshape(-1)


def _slices(mod: nn.Module, role: str, n: int) -> list[tuple[str, int, bool]]:
    """(tensor name, dim, is a parameter) of ``mod`` holding the member's ``n`` channels."""
    if role == "out":
        return [("weight", 0, True)] + ([("bias", 0, True)] if mod.bias is not None else [])
    if role == "in":
        return [("weight", 1, True)]
    out = [(k, 0, True) for k, t in mod._parameters.items() if t is not None and t.dim() >= 1 and t.shape[0] == n]
    return out + [(k, 0, False) for k, t in mod._buffers.items() if t is not None and t.dim() >= 1 and t.shape[0] == n]


def _sq_per_index(mod: nn.Module, role: str) -> torch.Tensor:
    """Squared L2 norm of the weights of each index along the member's dim (fp32)."""
    w = mod.weight.detach().float()
    if role == "out":
        return w.reshape(w.shape[0], -1).pow(2).sum(1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).pow(2).sum(1)


def _bn_scale(bn: nn.Module) -> torch.Tensor | None:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return None
    s = (bn.running_var.detach().float() + bn.eps).rsqrt()
    return s * bn.weight.detach().float() if bn.weight is not None else s


# --- scores and budgets ----------------------------------------------------------------------------

def _normalized(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p / p.mean().clamp_min(1e-30) for p in parts]).mean(0)


def group_scores(group: Group, mods: dict, method: str, stats: dict | None = None) -> torch.Tensor:
    """Score of each unit of ``group`` (higher = keep), see the module docstring."""
    parts = []
    units = group.units
    consumers = [m for m in group.of_role("in") if stats and m.module in stats]
    if method == "magnitude" or not consumers:
        for m in group.members:
            if m.role == "follow":
                continue
            mod = mods[m.module]
            v = _sq_per_index(mod, m.role)
            if m.role == "out" and m.module in group.scales:
                scale = _bn_scale(mods[group.scales[m.module]])
                if scale is not None:
                    v = v * scale.to(v.device).pow(2)
            parts.append(v.reshape(units, m.width).sum(1).sqrt())
        return _normalized(parts).cpu()
    for m in consumers:
        mod, st = mods[m.module], stats[m.module]
        w2 = _sq_per_index(mod, "in")
        if method == "wanda":
            v = w2.sqrt() * st.col_norm().to(w2.device)
        elif method == "flap":
            v = w2 * (st.sq_mean - st.mean.pow(2)).clamp_min(0).to(w2.device)
        elif st.H is not None:  # sparsegpt on a Linear: OBS saliency (inputs that were always zero cost nothing)
            hinv, dead = hessian_inverse(st.H)
            v = (w2 / hinv.diagonal().to(w2.device)).masked_fill(dead.to(w2.device), 0.0)
        else:  # sparsegpt on a conv: the diagonal of H
            v = w2 * st.sq_mean.to(w2.device)
        parts.append(v.reshape(units, m.width).sum(1))
    return _normalized(parts).cpu()


def n_remove(units: int, sparsity: float) -> int:
    """Units a group of ``units`` loses at ``sparsity`` (at least one unit is always kept)."""
    return max(0, min(int(round(sparsity * units)), units - 1))


def keep_units(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted indices of the ``len(scores) - remove`` highest-scoring units."""
    order = scores.argsort(descending=True, stable=True)
    return order[: scores.numel() - remove].sort().values


def unit_cost(group: Group, mods: dict) -> int:
    """Weights one unit of ``group`` holds in its producers and consumers."""
    cost = 0
    for m in group.members:
        if m.role != "follow":
            w = mods[m.module].weight
            cost += m.width * w.numel() // w.shape[0 if m.role == "out" else 1]
    return cost


def global_removal(scores: dict[str, torch.Tensor], costs: dict[str, int], sparsity: float) -> dict[str, int]:
    """{group: units to remove} for one budget over all groups: units are ranked together by their
    score divided by their group's mean, and the lowest go until ``sparsity`` of the groups' weights
    are removed (a head weighs what its rows and columns hold); each group keeps its best unit."""
    names = list(scores)
    norm = [scores[n].float().cpu() / scores[n].float().mean().clamp_min(1e-30) for n in names]
    flat = torch.cat(norm)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(norm)])
    cost = torch.tensor([costs[n] for n in names], dtype=torch.float64)[owner]
    start = 0
    for s in norm:  # the best unit of every group is never removed
        flat[start + int(s.argmax())] = float("inf")
        start += s.numel()
    order = flat.argsort(stable=True)
    order = order[torch.isfinite(flat[order])]
    budget = sparsity * float(cost.sum())
    # remove the lowest-ranked units while the removed weights stay within the budget
    n = int(torch.searchsorted(cost[order].cumsum(0), torch.tensor([budget], dtype=torch.float64),
                               right=True).item())
    out = {n_: 0 for n_ in names}
    for i in owner[order[:n]].tolist():
        out[names[i]] += 1
    return out


# --- corrections of the consumers ------------------------------------------------------------------

def _bias_for(mod: nn.Module, bn_after: dict, name: str, mods: dict) -> tuple[str, torch.Tensor | None]:
    """Where a constant added to ``mod``'s outputs goes: its bias, the running mean of the
    BatchNorm right after it, or a new bias."""
    if mod.bias is not None:
        return "bias", mod.bias
    bn = mods.get(bn_after.get(name, ""))
    if bn is not None and getattr(bn, "running_mean", None) is not None:
        return "bn", bn.running_mean
    return "new", None


@torch.no_grad()
def compensate_mean(name: str, mod: nn.Module, removed: torch.Tensor, st: LayerStats, bn_after: dict,
                    mods: dict) -> None:
    """FLAP's bias compensation: the removed inputs' mean contribution moves into a constant."""
    w = mod.weight.detach().float()
    mean = st.mean.to(w.device)[removed]
    cols = w[:, removed]
    if cols.dim() > 2:  # conv: a constant input channel contributes mean * sum of its kernel
        cols = cols.reshape(cols.shape[0], cols.shape[1], -1).sum(-1)
    delta = cols @ mean
    where, t = _bias_for(mod, bn_after, name, mods)
    if where == "bias":
        t.add_(delta.to(t.dtype))
    elif where == "bn":  # BN(y + d) with running mean m is BN(y) with running mean m - d
        t.sub_(delta.to(t.dtype))
    else:
        mod.bias = nn.Parameter(delta.to(mod.weight.dtype), requires_grad=mod.weight.requires_grad)


@torch.no_grad()
def least_squares(mod: nn.Linear, keep: torch.Tensor, removed: torch.Tensor, st: LayerStats) -> None:
    """W_K += W_R H_RK H_KK^-1 (and the bias as the input of constant 1, when the layer has one):
    the kept columns that best reproduce the layer's calibration outputs without the removed ones."""
    H = st.H.to(mod.weight.device)
    W = mod.weight.detach().float()
    n_in = W.shape[1]
    if mod.bias is not None:  # augment x with a constant 1: E[x] and E[1 * 1] join the Hessian
        mu = st.mean.to(H.device)
        H = torch.cat([torch.cat([H, 2 * mu[:, None]], 1), torch.cat([2 * mu, H.new_tensor([2.0])])[None]], 0)
        W = torch.cat([W, mod.bias.detach().float()[:, None]], 1)
        keep = torch.cat([keep, keep.new_tensor([n_in])])
    hk = H[keep][:, keep]
    hkr = H[keep][:, removed]
    hinv, _ = hessian_inverse(hk)  # damped like SparseGPT's (more if Cholesky fails)
    update = (hinv @ hkr).t()  # [R, K]: H_RK H_KK^-1
    new_k = W[:, keep] + W[:, removed] @ update
    mod.weight.data[:, keep[: keep.numel() - (mod.bias is not None)]] = \
        new_k[:, : new_k.shape[1] - (mod.bias is not None)].to(mod.weight.dtype)
    if mod.bias is not None:
        mod.bias.data.copy_(new_k[:, -1].to(mod.bias.dtype))


# --- masking, shrinking, recording ----------------------------------------------------------------

@torch.no_grad()
def mask_group(group: Group, mods: dict, removed: torch.Tensor) -> None:
    """Zero the removed units in every member (producers' rows and biases, followers' per-channel
    parameters, consumers' columns); running statistics are left as they are."""
    for m in group.members:
        mod = mods[m.module]
        idx = unit_index(removed, m.width).to(mod.weight.device if getattr(mod, "weight", None) is not None else "cpu")
        for tname, dim, is_param in _slices(mod, m.role, group.units * m.width):
            if is_param:
                getattr(mod, tname).data.index_fill_(dim, idx.to(getattr(mod, tname).device), 0)


@torch.no_grad()
def shrink_group(group: Group, mods: dict, keep: torch.Tensor) -> None:
    """Remove everything but the kept units from every member's tensors, and fix the modules'
    size attributes (in/out features and channels, num_features, normalized_shape, head counts)."""
    for m in group.members:
        mod = mods[m.module]
        n = group.units * m.width
        for tname, dim, is_param in _slices(mod, m.role, n):
            t = getattr(mod, tname)
            new = t.detach().index_select(dim, unit_index(keep, m.width).to(t.device)).contiguous()
            if is_param:
                mod._parameters[tname] = nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                mod._buffers[tname] = new
        _sync_attrs(mod, keep.numel() * m.width if m.role == "follow" else None)
    for mname, attr, per in group.attrs:
        setattr(mods[mname], attr, keep.numel() * per)


def _sync_attrs(mod: nn.Module, n_follow: int | None) -> None:
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif is_layer(mod):
        if n_follow is not None:  # depthwise
            mod.in_channels = mod.out_channels = mod.groups = n_follow
        else:
            mod.out_channels, mod.in_channels = mod.weight.shape[0], mod.weight.shape[1] * mod.groups
    elif n_follow is not None:
        if hasattr(mod, "num_features"):
            mod.num_features = n_follow
        if isinstance(getattr(mod, "normalized_shape", None), (tuple, list)):
            mod.normalized_shape = (n_follow,)


def describe_module(mod: nn.Module) -> dict:
    """A module's structure as a record stores it: parameter/buffer shapes and size attributes."""
    attrs = {}
    for a in _ATTRS:
        v = getattr(mod, a, None)
        if isinstance(v, int) and not isinstance(v, bool):
            attrs[a] = v
        elif isinstance(v, (tuple, list)) and v and all(isinstance(x, int) for x in v):
            attrs[a] = list(v)
    return {"params": {k: list(t.shape) for k, t in mod._parameters.items() if t is not None},
            "buffers": {k: list(t.shape) for k, t in mod._buffers.items() if t is not None},
            "attrs": attrs}


def _merge_record(model: nn.Module, modules: dict, config: dict) -> None:
    rec = getattr(model, RECORD_ATTR, None) or {"modules": {}, "config": {}}
    rec["modules"].update(modules)
    rec["config"].update(config)
    setattr(model, RECORD_ATTR, rec)


def _inconsistent(mod: nn.Module) -> str | None:
    """Why ``mod``'s size attributes disagree with its tensors (None: they agree)."""
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.Linear):
        want = (mod.out_features, mod.in_features)
    elif is_layer(mod):
        want = (mod.out_channels, mod.in_channels // max(mod.groups, 1), *mod.kernel_size)
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        t = w if w is not None else mod.running_mean
        return None if t is None or t.shape == (mod.num_features,) else \
            f"num_features={mod.num_features} but its tensors hold {tuple(t.shape)}"
    elif isinstance(getattr(mod, "normalized_shape", None), tuple) and w is not None:
        want = tuple(mod.normalized_shape)
    else:
        return None
    if w is not None and tuple(w.shape) != want:
        return f"its weight is {tuple(w.shape)}, its size attributes say {want}"
    b = getattr(mod, "bias", None)
    if isinstance(b, torch.Tensor) and b.shape != (want[0],):
        return f"its bias is {tuple(b.shape)}, it has {want[0]} outputs"
    return None


def _shape_list(v, what: str) -> list[int]:
    if not (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)):
        raise ValueError(f"{what} must be a list of non-negative ints, got {v!r}")
    return v


@torch.no_grad()
def apply_record(model: nn.Module, record, where: str = "checkpoint") -> None:
    """Rebuild recorded shapes on a model built at its original sizes (``sparseprune.load``).

    Every recorded parameter/buffer is replaced by an uninitialised tensor of the recorded shape
    (the checkpoint's values are loaded next); a recorded parameter the module lacks (a bias that
    FLAP's compensation added) is created. Only size attributes and transformers config sizes
    listed in this module are ever set.
    """
    if not isinstance(record, dict) or not isinstance(record.get("modules"), dict):
        raise ValueError(f"{where}: the channel record must be an object with a 'modules' map")
    for name, rec in record["modules"].items():
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: channel record of {name} must be an object")
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{where}: the channel record resizes {name}, which the model lacks") from e
        ref = next((t for t in list(mod._parameters.values()) + list(mod._buffers.values()) if t is not None), None)
        for kind, table in (("params", mod._parameters), ("buffers", mod._buffers)):
            for tname, shape in (rec.get(kind) or {}).items():
                shape = _shape_list(shape, f"{where}: {name}.{tname} shape")
                if tname not in table:
                    raise ValueError(f"{where}: {name} ({type(mod).__name__}) has no {kind[:-1]} {tname!r}")
                old = table[tname]
                if old is not None and list(old.shape) == shape:
                    continue
                like = old if old is not None else ref
                if like is None:
                    raise ValueError(f"{where}: cannot create {name}.{tname}: the module has no tensor to take a "
                                     f"dtype from")
                new = torch.empty(shape, dtype=like.dtype, device=like.device)
                if kind == "params":
                    table[tname] = nn.Parameter(new, requires_grad=old.requires_grad if old is not None else True)
                else:
                    table[tname] = new
        for a, v in (rec.get("attrs") or {}).items():
            if a not in _ATTRS:
                raise ValueError(f"{where}: the channel record may not set {name}.{a}")
            if isinstance(v, list):
                v = tuple(_shape_list(v, f"{where}: {name}.{a}"))
            elif not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{where}: {name}.{a} must be a positive int, got {v!r}")
            setattr(mod, a, v)
        why = _inconsistent(mod)
        if why:
            raise ValueError(f"{where}: the channel record leaves {name} inconsistent: {why}")
    cfg = getattr(model, "config", None)
    for k, v in (record.get("config") or {}).items():
        if k not in _CONFIG_KEYS or not (isinstance(v, int) and v > 0):
            raise ValueError(f"{where}: the channel record may not set config.{k} = {v!r}")
        if cfg is not None:
            setattr(cfg, k, v)
    _merge_record(model, dict(record["modules"]), dict(record.get("config") or {}))


# --- the driver -------------------------------------------------------------------------------------

def _group_sparsity(group: Group, sparsity) -> float | None:
    if isinstance(sparsity, dict):
        names = [group.name] + group.layers()
        for pat, s in sparsity.items():
            if any(fnmatch.fnmatchcase(n, pat) for n in names):
                return s
        return None
    return sparsity


def _zero_units(group: Group, mods: dict) -> torch.Tensor:
    """Units already zero in every producer row (and bias) and consumer column (a masked model)."""
    zero = torch.ones(group.units, dtype=torch.bool)
    for m in group.members:
        if m.role == "follow":
            continue
        mod = mods[m.module]
        v = _sq_per_index(mod, m.role)
        if m.role == "out" and mod.bias is not None:
            v = v + mod.bias.detach().float().pow(2)
        zero &= (v.reshape(group.units, m.width).sum(1) == 0).cpu()
    return zero


def _layer_shape(mod: nn.Module) -> tuple[int, int]:
    w = mod.weight
    return (w.shape[0], w.shape[1] * (mod.groups if not isinstance(mod, nn.Linear) else 1))


def prune_channels(model: nn.Module, *, sparsity=None, method: str = "magnitude", include=None, exclude=None,
                   calibration=None, global_budget: bool = False, strict: bool = False, progress=None,
                   shrink: bool = False) -> Report:
    """Structured pruning of ``model`` in place; ``shrink=False`` masks (prune), True removes (convert).

    ``sparsity``: the fraction of units removed from each group (a float, or {glob: float} matched
    against group and layer names); None with ``shrink=True`` removes the units that are already
    zero (a model masked by an earlier ``prune(model, "channel", ...)``). A group is pruned only
    when all its layers are selected by ``include``/``exclude``. ``strict=True`` raises when a
    selected layer is left alone because the analysis cannot handle it (not when its channels are
    fixed by the model itself: its outputs, the residual stream of a transformer).
    """
    if method not in CHANNEL_METHODS:
        raise ValueError(f"channel pruning methods are {list(CHANNEL_METHODS)}, got {method!r}")
    if sparsity is None and not shrink:
        raise ValueError("channel pruning needs sparsity= (the fraction of channels, neurons or heads removed "
                         "from each group)")
    for s in (sparsity.values() if isinstance(sparsity, dict) else [sparsity]):
        if s is not None and not (isinstance(s, (int, float)) and 0.0 <= float(s) < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {s!r}")
    if global_budget and not isinstance(sparsity, (int, float)):
        raise ValueError("global_budget=True needs one float sparsity for the whole model")
    calibrated = method != "magnitude"
    if calibrated and calibration is None:
        raise ValueError(f"method '{method}' needs calibration=...: an iterable of model inputs (tensor, tuple or "
                         f"dict per item) or a callable forward_loop(model)")

    analysis: Analysis = find_groups(model)
    mods = dict(model.named_modules())
    layers = [n for n, m in mods.items() if is_layer(m)]
    selected = {n for n in layers if (include is None or _matches(n, include)) and not _matches(n, exclude)}
    before = {n: _layer_shape(mods[n]) for n in layers}
    had_bias = {n: mods[n].bias is not None for n in layers}

    if strict:
        bad = [f"{n}: {why}" for n, (why, fatal) in analysis.left.items() if fatal and n in selected]
        bad += [f"{p.module}: {g.problem}" for g in analysis.groups if g.problem and g.fatal
                for p in g.of_role("out") if p.module in selected]
        if bad:
            raise ValueError(f"strict=True and {len(bad)} layer(s) cannot be channel-pruned: " + "; ".join(bad))

    todo: list[tuple[Group, float | None]] = []
    why_not: dict[str, str] = {}
    for g in analysis.groups:
        if g.problem:
            continue
        off = [n for n in g.layers() if n not in selected]
        s = _group_sparsity(g, sparsity)
        if off:
            why_not[g.name] = f"its group also holds {', '.join(off[:3])}, which include/exclude leave out"
        elif sparsity is not None and s is None:
            why_not[g.name] = "no sparsity given for its group"
        elif not g.of_role("in"):
            why_not[g.name] = "nothing reads its channels"
        else:
            todo.append((g, s))

    removed: dict[str, torch.Tensor] = {}  # group name -> removed unit indices
    kept: dict[str, torch.Tensor] = {}

    def decide(g: Group, remove: int, scores: torch.Tensor) -> None:
        keep = keep_units(scores.cpu(), remove)
        gone = torch.ones(g.units, dtype=torch.bool)
        gone[keep] = False
        kept[g.name], removed[g.name] = keep, gone.nonzero().flatten()

    bn_after = {p: bn for g in analysis.groups for p, bn in g.scales.items()}
    bar = _progress(len(todo), progress if calibrated else False)
    try:
        if sparsity is None:  # remove what an earlier prune() zeroed
            for g, _ in todo:
                zero = _zero_units(g, mods)
                if zero.all():
                    zero[0] = False  # a group keeps at least one unit
                decide(g, int(zero.sum()), (~zero).float())
        elif not calibrated:
            scores = {g.name: group_scores(g, mods, method) for g, _ in todo}
            counts = (global_removal(scores, {g.name: unit_cost(g, mods) for g, _ in todo}, float(sparsity))
                      if global_budget else {g.name: n_remove(g.units, s) for g, s in todo})
            for g, _ in todo:
                decide(g, counts[g.name], scores[g.name])
                mask_group(g, mods, removed[g.name])
        else:
            _calibrated(model, todo, mods, method, calibration, global_budget, sparsity, decide, removed, bn_after,
                        bar)
    finally:
        bar.close()
    # Corrections write whole columns and biases; a layer that is also a producer of another group
    # gets its removed rows zeroed again.
    for g, _ in todo:
        mask_group(g, mods, removed[g.name])

    touched: dict[str, nn.Module] = {}
    if shrink:
        for g, _ in todo:
            if removed[g.name].numel():
                shrink_group(g, mods, kept[g.name])
                touched.update({m.module: mods[m.module] for m in g.members})
                touched.update({a: mods[a] for a, _, _ in g.attrs})
        config = _config_updates(model, analysis.groups, kept) if touched else {}
        cfg = getattr(model, "config", None)
        for k, v in config.items():
            setattr(cfg, k, v)
    else:
        config = {}
    # Modules whose structure changed without shrinking (a bias added by the compensation).
    for g, _ in todo:
        for m in g.of_role("in"):
            if mods[m.module].bias is not None and not had_bias[m.module]:
                touched[m.module] = mods[m.module]
    if touched or config:
        _merge_record(model, {n: describe_module(m) for n, m in touched.items()}, config)
    return _report(analysis, todo, removed, why_not, mods, layers, selected, before, shrink, method)


def _calibrated(model, todo, mods, method, calibration, global_budget, sparsity, decide, removed, bn_after, bar):
    """Gather the consumers' input statistics with the calibration driver and prune each group
    once all its consumers' statistics are in (block by block in transformer stacks)."""
    hessian = method == "sparsegpt"
    consumers: dict[str, list[Group]] = {}
    for g, _ in todo:
        for m in g.of_role("in"):
            consumers.setdefault(m.module, []).append(g)
    plans = [_ConsumerPlan(n, mods[n]) for n in consumers]
    spars = {g.name: s for g, s in todo}
    stats: dict[str, LayerStats] = {}

    def correct_and_mask(g: Group) -> None:
        gone = removed[g.name]
        for m in g.of_role("in"):
            mod, st = mods[m.module], stats.get(m.module)
            if st is None or not gone.numel():
                continue
            r = unit_index(gone, m.width).to(mod.weight.device)
            if method == "flap" or (method == "sparsegpt" and (st.H is None or not isinstance(mod, nn.Linear))):
                compensate_mean(m.module, mod, r, st, bn_after, mods)
            elif method == "sparsegpt":
                k = unit_index(_kept_of(g, gone), m.width).to(mod.weight.device)
                least_squares(mod, k, r, st)
        mask_group(g, mods, gone)
        bar.update(1)

    if global_budget:
        stats.update(collect_stats(model, plans, calibration, hessian=hessian))
        scores = {g.name: group_scores(g, mods, method, stats) for g, _ in todo}
        counts = global_removal(scores, {g.name: unit_cost(g, mods) for g, _ in todo}, float(sparsity))
        for g, _ in todo:
            decide(g, counts[g.name], scores[g.name])
            correct_and_mask(g)
        return

    waiting = {g.name: {m.module for m in g.of_role("in")} for g, _ in todo}
    by_name = {g.name: g for g, _ in todo}

    def apply(plan, st) -> None:
        stats[plan.name] = st
        for g in consumers[plan.name]:
            waiting[g.name].discard(plan.name)
            if not waiting[g.name]:
                decide(g, n_remove(g.units, spars[g.name]), group_scores(g, mods, method, stats))
                correct_and_mask(by_name[g.name])
                for m in g.of_role("in"):  # its Hessians are no longer needed
                    if all(not waiting[x.name] for x in consumers[m.module]):
                        stats.pop(m.module, None)

    calibrate_layers(model, plans, calibration, apply, hessian=hessian)


def _kept_of(g: Group, gone: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(g.units, dtype=torch.bool)
    keep[gone.cpu()] = False
    return keep.nonzero().flatten()


def _config_updates(model: nn.Module, groups: list[Group], kept: dict) -> dict:
    """transformers config sizes that are now the same in every layer (per-layer sizes that differ
    stay in the record only: the config cannot express them)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    values: dict[str, set] = {}
    fixed: dict[str, int] = {}
    for g in groups:
        units = kept[g.name].numel() if g.name in kept else g.units
        for k, per in g.config.items():
            values.setdefault(k, set()).add(units * per)
        fixed.update(g.fixed_config)
    out = {k: next(iter(v)) for k, v in values.items() if len(v) == 1 and k in _CONFIG_KEYS}
    if any(k in out for k in ("num_attention_heads", "num_key_value_heads")):
        out.update({k: v for k, v in fixed.items() if k in _CONFIG_KEYS})
    return {k: v for k, v in out.items() if getattr(cfg, k, None) != v}


def _report(analysis, todo, removed, why_not, mods, layers, selected, before, shrink, method) -> Report:
    report = Report(pattern="channel", method=method)
    changes: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    out_group: dict[str, Group] = {}
    for g in analysis.groups:
        for m in g.of_role("out"):
            out_group[m.module] = g
    for g, _ in todo:
        gone = removed[g.name].numel()
        if not gone:
            continue
        what = {"mlp": "neurons", "channels": "channels"}.get(g.kind, "heads")
        if "num_key_value_heads" in g.config:
            what = f"KV heads (each with {g.config['num_attention_heads']} query heads)"
        for m in g.members:
            if m.module not in before:
                continue
            n = g.units * m.width
            changes.setdefault(m.module, []).append(f"{m.role} {n}->{n - gone * m.width}")
        first = g.of_role("out")[0].module
        notes.setdefault(first, []).append(f"group {g.name}: {gone} of {g.units} {what} removed"
                                           + (f" ({g.note})" if g.note else ""))
    pruned_out = {m.module for g, _ in todo if removed[g.name].numel() for m in g.of_role("out")}

    def kept_because(n: str) -> str:
        g = out_group.get(n)
        if g is not None and g.problem:
            return g.problem
        if n in analysis.left:
            return analysis.left[n][0]
        if g is not None and g.name in why_not:
            return why_not[g.name]
        return "no channel of its group scored low enough to go at this sparsity"

    for n in layers:
        if n not in selected and n not in changes:
            continue
        mod = mods[n]
        if n not in changes:
            report.layers.append(LayerReport(n, before[n], "skipped", "channel", reason=kept_because(n)))
            continue
        if shrink:
            o0, i0 = before[n]
            o1, i1 = _layer_shape(mod)
            sp = 1.0 - (o1 * i1) / (o0 * i0)
        else:
            sp = (mod.weight == 0).float().mean().item()
        reason = ", ".join(sorted(changes[n], reverse=True)) + ("; " + "; ".join(notes[n]) if n in notes else "")
        if n not in pruned_out:
            reason += f"; outputs kept: {kept_because(n)}"
        report.layers.append(LayerReport(n, before[n], "converted" if shrink else "pruned", "channel",
                                         sparsity=sp, bytes_ratio=1.0 - sp if shrink else None, reason=reason))
    return report
