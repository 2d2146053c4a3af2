"""Calibration: run the model on sample inputs, gather per-layer input statistics, prune.

``prune_layers`` is what ``prune()``/``convert()`` call to prune the selected layers; methods
with ``needs_calibration`` gather their statistics here first, in one of two ways:

* **Block by block** (transformer stacks: the ``nn.ModuleList`` holding most of the selected
  layers, e.g. ``model.layers`` or ``bert.encoder.layer``). A pre-hook on block 0 records its
  inputs (hidden states plus the extra args/kwargs the model passes: attention mask, position
  embeddings / ids, ...) and raises a sentinel so the rest of the model is skipped. Then for each
  block: run it on every item with hooks on its selected layers, prune those layers, run it again
  to produce the next block's inputs. Block i is therefore calibrated on the outputs of the
  already-pruned blocks 0..i-1, and memory holds one set of hidden states plus one block's
  statistics. Selected layers outside the stack (e.g. a classifier head) are calibrated after
  it with one more full pass.
* **Fallback** (plain modules): hooks on all selected layers, one full forward per item.

``calibration`` is an iterable of model inputs (per item: a tensor, a tuple of positional args
or a dict of keyword args; tensors are moved to the model's device) or a callable
``forward_loop(model)`` that runs the model itself. With a callable the whole model runs while
block 0's inputs are captured (the sentinel would abort the caller's loop).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from types import SimpleNamespace

import torch
from torch import nn

from ..formats.conv import gemm_weight, set_gemm_weight
from .budget import global_keep
from .methods import PruningMethod
from .permute import check_permutable, forget_permutation, prune_layer_permuted, remember_permutation
from .sparsegpt import SparseGPT
from .stats import stats_for
from .wanda import Wanda


class _Caught(Exception):
    """Raised by the block-0 pre-hook to stop the model once the block's inputs are recorded."""


# --- running the calibration data ----------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _call(model: nn.Module, item, device):
    item = _to(item, device)
    if isinstance(item, torch.Tensor):
        return model(item)
    if isinstance(item, Mapping):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    raise TypeError(f"calibration items must be tensors, tuples of positional args or dicts of keyword args, "
                    f"got {type(item).__name__}")


def _items(calibration):
    """The calibration items (an iterable, consumed once per pass), or None for a forward_loop."""
    if calibration is None:
        raise ValueError("this pruning method needs calibration=...: an iterable of model inputs (tensor, tuple "
                         "or dict per item) or a callable forward_loop(model)")
    if callable(calibration) and not isinstance(calibration, (torch.Tensor, nn.Module)):
        return None
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]  # one batch
    try:
        iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of model inputs or a callable forward_loop(model), "
                        f"got {type(calibration).__name__}") from None
    return calibration


def _replayable(calibration, passes: int):
    """``calibration`` made safe for ``passes`` passes: a one-shot iterator (a generator, say) is
    streamed when one pass is enough, so its items are never all in memory at once; it is kept in
    a list only when the pruning must replay it."""
    items = _items(calibration)
    if items is not None and passes > 1 and iter(items) is items:
        return list(items)
    return calibration


def run_calibration(model: nn.Module, calibration, *, stop: type[BaseException] | None = None) -> None:
    """Feed every calibration item through ``model`` (or call the forward_loop), under no_grad.

    ``stop``: an exception type raised by a hook to end an item early; it is swallowed per item.
    """
    items = _items(calibration)
    device = _model_device(model)
    with torch.no_grad():
        if items is None:
            calibration(model)
            return
        n = 0
        for item in items:
            n += 1
            try:
                _call(model, item, device)
            except Exception as e:  # noqa: BLE001 - only the sentinel is swallowed
                if stop is None or not isinstance(e, stop):
                    raise
        if n == 0:
            raise ValueError("calibration is empty (or a one-shot iterator that was already used up)")


@contextlib.contextmanager
def _calibration_mode(model: nn.Module):
    """eval() (no dropout) and no KV cache while calibrating; restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    cfg = getattr(model, "config", None)
    had_cache = hasattr(cfg, "use_cache")
    old_cache = getattr(cfg, "use_cache", None)
    model.eval()
    if had_cache:
        cfg.use_cache = False
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t
        if had_cache:
            cfg.use_cache = old_cache


def _stat_hooks(model: nn.Module, plans, hessian: bool) -> tuple[dict, list]:
    """Pre-hooks gathering each plan's input statistics; a plan with ``make_stats(hessian)`` (channel
    pruning's) makes its own kind, else :func:`stats.stats_for` picks it by module type."""
    stats, handles = {}, []
    for p in plans:
        mod = p.module
        make = getattr(p, "make_stats", None)
        st = make(hessian) if make is not None else stats_for(mod, hessian)
        stats[p.name] = st

        def hook(m, args, kwargs, st=st):
            x = args[0] if args else kwargs.get("input")
            st.add(x)

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    return stats, handles


# --- finding the transformer stack ---------------------------------------------------------------

def find_block_stack(model: nn.Module, names) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of same-typed blocks holding the most selected layers, if any."""
    best, best_count = None, 0
    names = list(names)
    for mname, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(b) for b in mod}) != 1:
            continue
        pre = f"{mname}." if mname else ""
        count = sum(1 for n in names if n.startswith(pre) and n[len(pre):].split(".")[0].isdigit())
        if count > best_count:
            best, best_count = (mname, mod), count
    return best


def _hidden_of(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], False
    return None, False


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


_CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


def _capture_block_inputs(model, block, calibration):
    """[(args, kwargs)] of block 0 for every calibration item (hidden states at args[0] or kwargs)."""
    records = []
    items = _items(calibration)

    def pre_hook(m, args, kwargs):
        kwargs = dict(kwargs)
        for k in _CACHE_KWARGS:
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        records.append((args, kwargs))
        if items is not None:
            raise _Caught

    h = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        run_calibration(model, calibration, stop=_Caught)
    finally:
        h.remove()
    return records


def _run_block(block, record, hidden):
    args, kwargs = record
    dev = next(iter(block.parameters()), hidden).device
    hidden = hidden.to(dev)
    if args and isinstance(args[0], torch.Tensor):
        out = block(hidden, *args[1:], **kwargs)
    else:
        kwargs = dict(kwargs, hidden_states=hidden)
        out = block(*args, **kwargs)
    return _first_tensor(out)


# --- pruning --------------------------------------------------------------------------------------

class _Pruner:
    def __init__(self, method: PruningMethod, permute: bool, block_keep: dict, bar):
        self.method, self.permute, self.block_keep, self.bar = method, permute, block_keep, bar
        self.masks: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, plan, stats) -> None:
        w = gemm_weight(plan.module)  # a Conv2d's weight as [O, kh*kw*C] (sparseprune.formats.conv)
        bk = self.block_keep.get(plan.name)
        if self.permute and not isinstance(plan.module, nn.Conv2d):  # convs: not implemented (see api.py)
            mask, new_w, perm = prune_layer_permuted(self.method, w, plan.pattern, plan.sparsity,
                                                     stats=stats, block_keep=bk)
        else:
            mask, new_w = self.method.prune_layer(w, plan.pattern, plan.sparsity, stats=stats, block_keep=bk)
            perm = None
        new_w = new_w.to(w.dtype) * mask.to(w.device)  # the mask holds exactly, also after rounding
        set_gemm_weight(plan.module, new_w)
        remember_permutation(plan.module, perm)
        self.masks[plan.name] = mask
        self.bar.update(1)


def _progress(total: int, enabled: bool | None):
    if enabled is None:  # default: a bar for people watching a terminal, not in logs and pipes
        enabled = sys.stderr is not None and sys.stderr.isatty()
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="sparseprune: pruning layers", unit="layer")
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Null()


def _collect_and_prune(model, plans, method, calibration, pruner):
    """Fallback: hooks on ``plans``' layers, one full pass over the calibration data, prune."""
    if plans:
        _gather_and_prune(model, plans, getattr(method, "needs_hessian", False),
                          lambda: run_calibration(model, calibration), pruner,
                          "during calibration (is it used by forward()?)")


def _gather_and_prune(model, plans, hessian: bool, run, pruner, where: str) -> None:
    """Hooks on ``plans``' layers while ``run()`` feeds them, then prunes each from its statistics."""
    stats, handles = _stat_hooks(model, plans, hessian)
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    for p in plans:
        if stats[p.name].n == 0:
            raise RuntimeError(f"layer {p.name} received no input {where}")
        pruner(p, stats[p.name])
        del stats[p.name]  # frees the Hessian before the next layer's update


def _split_by_block(plans, stack) -> tuple[dict[int, list], list]:
    """({block index: plans inside it}, plans outside the stack)."""
    sname, blocks = stack
    pre = f"{sname}." if sname else ""
    by_block: dict[int, list] = {}
    outside = []
    for p in plans:
        rest = p.name[len(pre):] if p.name.startswith(pre) else ""
        head = rest.split(".")[0]
        if rest and head.isdigit() and int(head) < len(blocks):
            by_block.setdefault(int(head), []).append(p)
        else:
            outside.append(p)
    return by_block, outside


def _block_by_block(model, by_block, method, calibration, pruner, stack) -> None:
    """Prune the layers inside ``stack`` block by block (``by_block``: {block index: plans})."""
    sname, blocks = stack
    pre = f"{sname}." if sname else ""
    records = _capture_block_inputs(model, blocks[0], calibration)
    if not records:
        raise RuntimeError(f"calibration never reached {pre}0 (the first block of the stack)")
    hidden = []
    for r in records:
        h, _ = _hidden_of(*r)
        if h is None:
            raise RuntimeError(f"cannot find the hidden states among the inputs of {pre}0")
        hidden.append(h)
    hessian = getattr(method, "needs_hessian", False)
    last = max(by_block) if by_block else -1
    with torch.no_grad():
        for i in range(last + 1):
            block = blocks[i]
            todo = by_block.get(i, [])
            if todo:
                def run_block(block=block):
                    for rec, h in zip(records, hidden):
                        _run_block(block, rec, h)

                _gather_and_prune(model, todo, hessian, run_block, pruner, "while running its block")
            if i < last:
                # Outputs of the (now pruned) block become the next block's inputs, in place.
                for j, (rec, h) in enumerate(zip(records, hidden)):
                    out = _run_block(block, rec, h)
                    if out.shape != h.shape:
                        raise RuntimeError(f"block {pre}{i} maps hidden states {tuple(h.shape)} to {tuple(out.shape)}; "
                                           f"block-by-block calibration needs blocks that keep the shape")
                    hidden[j] = out


def collect_stats(model: nn.Module, plans, calibration, *, hessian: bool = False) -> dict:
    """{plan name: statistics} of ``plans``' layers' inputs over one pass of the calibration data
    through the (unchanged) model, under eval() and without a KV cache."""
    stats, handles = _stat_hooks(model, plans, hessian)
    try:
        with _calibration_mode(model):
            run_calibration(model, calibration)
    finally:
        for h in handles:
            h.remove()
    return stats


def _global_keep(model, plans, method, calibration):
    """Global budget for a calibrated method: rank blocks (weights) of all layers together, by the
    method's score from input norms gathered on the dense model (one pre-pass)."""
    sparsity = plans[0].sparsity
    if sparsity is None or any(p.sparsity != sparsity for p in plans):
        raise ValueError("global_budget=True needs one float sparsity for the whole model")
    return global_keep(plans, method, collect_stats(model, plans, calibration))


def calibrate_layers(model: nn.Module, plans, calibration, apply, *, hessian: bool = False) -> None:
    """Feeds the calibration data to ``plans``' layers and calls ``apply(plan, stats)`` for each
    layer once its input statistics are complete: block by block where the layers sit in a
    transformer stack (each block sees the outputs of the blocks already changed by ``apply``),
    else in one pass. Runs under eval() and without a KV cache."""
    method = SimpleNamespace(needs_hessian=hessian)
    with _calibration_mode(model):
        stack = find_block_stack(model, [p.name for p in plans])
        by_block, rest = _split_by_block(plans, stack) if stack is not None else ({}, plans)
        calibration = _replayable(calibration, int(bool(by_block)) + int(bool(rest)))
        if by_block:
            _block_by_block(model, by_block, method, calibration, apply, stack)
        _collect_and_prune(model, rest, method, calibration, apply)


def prune_layers(model: nn.Module, plans, method: PruningMethod, calibration, *, global_budget=False,
                 progress=None, permute=False) -> dict[str, torch.Tensor]:
    """Prune ``plans``' layers in place (``nn.Linear.weight.data``); returns {layer name: bool mask}.

    Methods without ``needs_calibration`` (magnitude) run layer by layer without data; calibrated
    ones gather statistics block by block (transformer stacks) or in one pass (other modules).
    With ``permute=True`` each layer's input order is searched first (see
    :mod:`sparseprune.prune.permute`) and remembered on the module for ``convert()``.
    """
    if permute:
        for p in plans:
            check_permutable(p.pattern)
    bar = _progress(len(plans), progress)
    try:
        if not method.needs_calibration:
            block_keep = {}
            if global_budget and plans and plans[0].pattern.kind != "nm":
                block_keep = global_keep(plans, method, {})
            pruner = _Pruner(method, permute, block_keep, bar)
            for p in plans:
                forget_permutation(p.module)
                pruner(p, None)
            return pruner.masks
        block_keep = {}
        if global_budget and plans and plans[0].pattern.kind != "nm":
            calibration = _replayable(calibration, 2)
            with _calibration_mode(model):
                block_keep = _global_keep(model, plans, method, calibration)
        pruner = _Pruner(method, permute, block_keep, bar)
        calibrate_layers(model, plans, calibration, pruner, hessian=getattr(method, "needs_hessian", False))
        return pruner.masks
    finally:
        bar.close()



__all__ = ["prune_layers", "calibrate_layers", "collect_stats", "run_calibration", "find_block_stack",
           "Wanda", "SparseGPT"]
