"""Timing that survives noisy shared machines: interleaved runs and medians of ratios."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (averaged over ``inner`` back-to-back calls)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def compare(baseline: Callable[[], object], candidates: dict[str, Callable[[], object]], device, *,
            budget_s: float = 0.5, min_rounds: int = 5, max_rounds: int = 200) -> dict[str, dict]:
    """Times ``baseline`` and each candidate interleaved, round after round.

    Each round runs the baseline then every candidate once (CPU) or a short burst each (GPU), so
    machine noise hits all of them alike. Returns, per candidate, the median seconds of the
    baseline and the candidate and the median over rounds of baseline/candidate (the speedup).
    """
    device = torch.device(device)
    fns = {"__base__": baseline, **candidates}
    for fn in fns.values():  # warm-up (first-call allocations, autotuning, caches)
        fn()
        fn()
    _sync(device)
    # a burst long enough to be measurable, sized from one warm call of the slowest function
    one = max(time_once(fn, device) for fn in fns.values())
    inner = 1 if device.type == "cpu" else max(1, min(100, int(2e-3 / max(one, 1e-6))))
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(one * inner * len(fns), 1e-6))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(time_once(fn, device, inner))
    base = samples["__base__"]
    out = {}
    for k in candidates:
        ratios = [b / c for b, c in zip(base, samples[k])]
        out[k] = {"base_s": statistics.median(base), "s": statistics.median(samples[k]),
                  "speedup": statistics.median(ratios), "rounds": rounds}
    return out
