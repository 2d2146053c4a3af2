"""backend="auto": per layer and batch bucket, run whichever backend is fastest, dense included.

How it decides. For each :class:`~sparseprune.modules.SparseLinear` with ``backend="auto"``, every
backend that can run its weight on its device ("cpu"; "cuda"/"triton" on GPUs; always "dense") is
timed against dense at the edges of the batch buckets 1 | 2-8 | 9-64 | 65-512 | 513+ (rows =
``x.numel() / in_features``; for a SparseConv2d the output pixels N*Ho*Wo, timed on a roughly
square image whole conv against dense ``F.conv2d``), measured at 1, 8, 64, 512 and 1024 rows. Runs are interleaved and
the ratio of each candidate's best time to dense's best time is kept (interference on a shared
machine only adds time), a few ms per candidate and size (at least 5 runs each, 2 for calls over 20 ms). A sparse backend
takes a bucket only if it is no slower than dense (within ``SLACK``) at both edges of that bucket;
otherwise the bucket runs dense, so "auto" is never slower than the dense model beyond noise.

When it measures. convert() and load() measure eagerly; a module that was not measured yet (moved
to another device, built by hand) measures on its first call outside torch.compile. The choice in
forward is then a Python branch on the row count, which torch.compile guards on.

What it costs. Measurements are cached in memory by layer signature (device, format, dtype,
shape, block size, density, bias), so a Llama-style model measures each distinct shape once. An
on-disk JSON cache keyed by device name and library versions is opt-in: pass ``cache_path`` or
set ``SPARSEPRUNE_AUTOTUNE_CACHE=<file>``. ``SPARSEPRUNE_AUTOTUNE=0`` turns measuring off ("auto"
then always uses the first sparse backend that can run the layer).

Memory trade-off: a layer with any dense bucket keeps a dense copy of its weight (a non-persistent
buffer, never saved) next to the packed tensors, i.e. packed + dense bytes for that layer; layers
where a sparse kernel wins every bucket keep only the packed tensors. We keep the packed tensors
even for all-dense layers because checkpoints, state_dict and other devices need them.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings

import torch

from . import backends as _backends
from ._device import cpu_name
from ._native import build_info
from ._version import __version__

# Upper edges of the batch-row buckets (rows = x.numel() / in_features); the last is open-ended.
BUCKET_EDGES = (1, 8, 64, 512)
BUCKET_LABELS = ("1", "2-8", "9-64", "65-512", "513+")
MEASURE_ROWS = (1, 8, 64, 512, 1024)
# Bucket i is judged at these MEASURE_ROWS indices (its lower and upper edge; 2 ~ 1, 9 ~ 8, ...).
BUCKET_POINTS = ((0,), (0, 1), (1, 2), (2, 3), (3, 4))
# A sparse backend within 3% of dense counts as "not slower" (run-to-run noise on a busy CPU).
SLACK = 0.03
BUDGET_S = 0.004  # per candidate and measured size, after one warm-up call
MIN_REPS, MAX_REPS = 5, 50
LONG_CALL_S = 0.02  # a call this long is timed 2 times, not MIN_REPS


def bucket_of(rows: int) -> int:
    """Index of the batch bucket holding ``rows``: 0 for 0-1, 1 for 2-8, ..., 4 for 513+."""
    for i, edge in enumerate(BUCKET_EDGES):
        if rows <= edge:
            return i
    return len(BUCKET_EDGES)

_lock = threading.RLock()  # tuning mutates modules and caches; forward threads may race to it
_memory_cache: dict[str, tuple[str, ...]] = {}
_disk_loaded: dict[str, dict] = {}


def enabled() -> bool:
    return os.environ.get("SPARSEPRUNE_AUTOTUNE", "1") not in ("0", "false", "off")


def device_key(device) -> str:
    """Device name plus what changes timings: library versions, CPU ISA level and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = f"{cpu_name()} isa={build_info()['cpu_isa_active']} threads={torch.get_num_threads()}"
    else:
        name = device.type
    return f"{device.type}:{name}|torch={torch.__version__}|sparseprune={__version__}"


def layer_signature(module, candidates) -> str:
    w = module.packed_weight()
    block = getattr(w, "block_size", None)
    density = round(w.nnzb / max(1, (w.shape[0] // block[0]) * (w.shape[1] // block[1])), 2) if block else 1.0
    return (f"{w.kind}|{str(w.dtype).replace('torch.', '')}|{w.shape[0]}x{w.shape[1]}|block={block}|"
            f"density={density}|bias={module.bias is not None}{module.autotune_key()}|candidates={','.join(candidates)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize()


def _candidates(module, device) -> list[str]:
    w = module.packed_weight()
    out = []
    for name in _backends.available_backends(device):
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            continue  # the Triton interpreter is a debugging aid, never worth measuring for serving
        try:
            if _backends.get_backend(name).unsupported_reason(w, device) is None:
                out.append(name)
        except ValueError:
            continue
    if "dense" in out:  # dense first: it is the baseline every ratio is taken against
        out.remove("dense")
    return ["dense"] + out


def measure(module, candidates, rows_list=MEASURE_ROWS, budget_s=BUDGET_S) -> dict[str, list[float]]:
    """{candidate: [median time ratio to dense at each rows]}; interleaved runs, bounded time."""
    device = module.values.device
    dense = _backends.get_backend("dense")
    had_dense = "dense_weight" in module._buffers
    if not had_dense:
        dense.prepare(module)
    ratios = {c: [] for c in candidates}
    try:
        with torch.no_grad():
            for rows in rows_list:
                x = module.autotune_input(rows)  # SparseConv2d: an image with ``rows`` output pixels
                fns = {c: (lambda b=_backends.get_backend(c): module.autotune_call(b, x)) for c in candidates}
                times = {c: [] for c in candidates}
                _sync(device)
                t_warm = time.perf_counter()
                for c in candidates:  # warm-up (first-call allocations, lazy init)
                    fns[c]()
                _sync(device)
                # Calls long enough to time reliably (big layers at 1024 rows) need fewer runs; this
                # keeps tuning a 4096x11008 layer to seconds rather than minutes on a small CPU.
                min_reps = MIN_REPS if time.perf_counter() - t_warm < LONG_CALL_S * len(candidates) else 2
                start = time.perf_counter()
                for rep in range(MAX_REPS):
                    for c in candidates:
                        _sync(device)
                        t0 = time.perf_counter()
                        fns[c]()
                        _sync(device)
                        times[c].append(time.perf_counter() - t0)
                    if rep + 1 >= min_reps and time.perf_counter() - start > budget_s * len(candidates):
                        break
                # Ratio of best times: on a shared machine, bursts of interference only ever add time,
                # so each candidate's fastest run is its least disturbed one.
                base = max(min(times["dense"]), 1e-9)
                for c in candidates:
                    ratios[c].append(min(times[c]) / base)
    finally:
        if not had_dense:
            dense.release(module)
    return ratios


def decide(ratios: dict[str, list[float]]) -> tuple[str, ...]:
    """Per bucket: the sparse candidate with the best worst-edge ratio if it is <= 1 + SLACK, else dense."""
    plan = []
    for points in BUCKET_POINTS:
        best, best_worst = "dense", None
        for c, r in ratios.items():
            if c == "dense":
                continue
            worst = max(r[i] for i in points)
            if worst <= 1 + SLACK and (best_worst is None or worst < best_worst):
                best, best_worst = c, worst
        plan.append(best)
    return tuple(plan)


def _cache_file(cache_path):
    return cache_path or os.environ.get("SPARSEPRUNE_AUTOTUNE_CACHE") or None


def _disk_get(path, dkey, sig):
    if path not in _disk_loaded:
        try:
            with open(path) as f:
                data = json.load(f)
            _disk_loaded[path] = data if isinstance(data, dict) else {}
        except FileNotFoundError:
            _disk_loaded[path] = {}
        except (OSError, ValueError) as e:
            warnings.warn(f"sparseprune autotune cache {path} is unreadable ({e}); measuring again")
            _disk_loaded[path] = {}
    plan = _disk_loaded[path].get(dkey, {}).get(sig)
    ok = isinstance(plan, list) and len(plan) == len(BUCKET_LABELS) and all(isinstance(p, str) for p in plan)
    return tuple(plan) if ok else None


def _disk_put(path, dkey, sig, plan) -> None:
    data = _disk_loaded.setdefault(path, {})
    data.setdefault(dkey, {})[sig] = list(plan)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"sparseprune: could not write autotune cache {path}: {e}")


def tune_module(module, *, cache_path=None, budget_s=BUDGET_S, force=False,
                force_if_dtype_changed=True) -> dict[str, str]:
    """Measures (or looks up) and installs the per-bucket plan of one SparseLinear; returns it by label.

    ``force`` measures again even if a plan (or a cached measurement) exists; a plan made for
    another dtype (the model was cast since) is replaced unless ``force_if_dtype_changed=False``.
    """
    with _lock:
        stale = force_if_dtype_changed and module._plan_dtype != module.dtype
        if module._plan is not None and not force and not stale:
            return module.auto_plan
        device = module.values.device
        bound = module._bound[1]
        if not enabled():
            plan = (bound.name,) * len(BUCKET_LABELS)
        else:
            cands = _candidates(module, device)
            dkey = device_key(device)
            sig = layer_signature(module, cands)
            key = f"{dkey}||{sig}"
            path = _cache_file(cache_path)
            plan = None if force else _memory_cache.get(key)
            if plan is None and path and not force:
                plan = _disk_get(path, dkey, sig)
            if plan is None:
                plan = decide(measure(module, cands, budget_s=budget_s)) if len(cands) > 1 else (cands[0],) * 5
                if path:
                    _disk_put(path, dkey, sig, plan)
            _memory_cache[key] = plan
        module._set_plan([_backends.get_backend(n) for n in plan])
        module._plan_dtype = module.dtype
        module.auto_plan = dict(zip(BUCKET_LABELS, plan))
        return module.auto_plan


def describe(plan: dict[str, str] | None) -> str:
    """'auto: cpu at 1, 2-8; dense at 9-64, 65-512, 513+ (sparse slower there)'."""
    if not plan:
        return ""
    by: dict[str, list[str]] = {}
    for label, name in plan.items():
        by.setdefault(name, []).append(label)
    text = "auto: " + "; ".join(f"{n} at batch {', '.join(labels)}" for n, labels in by.items())
    if "dense" in by:
        text += " (no sparse backend beat dense there; a dense weight copy is kept)"
    return text


def clear_cache() -> None:
    """Forgets in-memory measurements (disk caches are re-read on next use)."""
    with _lock:
        _memory_cache.clear()
        _disk_loaded.clear()


def note_plans(report, plans: dict[str, dict[str, str]], names) -> None:
    """Writes each measured plan into the conversion report's row for layers in ``names``."""
    for name in names:
        plan = plans.get(name)
        if not plan:
            continue
        row = report[name]
        if all(n == "dense" for n in plan.values()):
            row.backend = "dense"
        row.reason = "; ".join(r for r in (row.reason, describe(plan)) if r)
