"""Timing that survives noisy shared machines (interleaved runs, medians of ratios), and cold weights.

Hot: one weight, called again and again, stays in the last-level cache when it fits there (a
4096x4096 fp32 weight is 67 MB: it fits the 300 MB L3 of an Emerald Rapids Xeon), so a loop over
one layer can time the cache rather than memory. In a real decode each layer's weight is read once
per token, from DRAM. Cold: :class:`Rotation` cycles through distinct copies of the same layer,
dense and sparse alike, enough of them (:func:`cold_copies`) that everything touched between two
uses of one copy is at least twice the last-level cache, so every call streams its weight.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence

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
            budget_s: float = 0.5, min_rounds: int = 5, max_rounds: int = 200, warmup: int = 2,
            long_round_rounds: int = 3, self_timed: bool = False) -> dict[str, dict]:
    """Times ``baseline`` and each candidate interleaved, round after round.

    Each round runs the baseline then every candidate once (CPU) or a short burst each (GPU), so
    machine noise hits all of them alike. Returns, per candidate, the median seconds of the
    baseline and the candidate and the median over rounds of baseline/candidate (the speedup),
    and the same from the best (minimum) times. Rounds: as many as fit ``budget_s``, at least
    ``min_rounds``; a round longer than the whole budget (a big layer at a big batch, seconds per
    call, where one call already averages out short noise) gets ``long_round_rounds``.

    ``self_timed``: each function returns the seconds to count for its call instead of being timed
    whole (a greedy ``generate`` that counts only its decode steps, not its prefill); it then runs
    once per round on every device, and must synchronize a GPU itself before reading its clock.
    """
    device = torch.device(device)
    fns = {"__base__": baseline, **candidates}
    for _ in range(warmup):  # first-call allocations, autotuning, caches
        for fn in fns.values():
            fn()
    _sync(device)
    # one warm round, in the same order as the timed ones, sizes the rest; on CPU (one call per
    # sample) it also counts as the first round, which spares a call of every function on big layers
    def sample(fn, inner):
        return float(fn()) if self_timed else time_once(fn, device, inner)

    one = {k: sample(fn, 1) for k, fn in fns.items()}
    slowest, round_s = max(one.values()), sum(one.values())
    inner = 1 if device.type == "cpu" or self_timed else max(1, min(100, int(2e-3 / max(slowest, 1e-6))))
    floor = min(min_rounds, long_round_rounds) if round_s * inner > budget_s else min_rounds
    rounds = int(min(max_rounds, max(floor, budget_s / max(round_s * inner, 1e-6))))
    samples: dict[str, list[float]] = {k: ([t] if inner == 1 else []) for k, t in one.items()}
    for _ in range(rounds - len(samples["__base__"])):
        for k, fn in fns.items():
            samples[k].append(sample(fn, inner))
    base = samples["__base__"]
    out = {}
    for k in candidates:
        ratios = [b / c for b, c in zip(base, samples[k])]
        # best-time ratio: interference from other processes only ever adds time, so on a shared
        # machine min/min is a second estimate of the quiet-machine ratio (the two should agree)
        out[k] = {"base_s": statistics.median(base), "s": statistics.median(samples[k]),
                  "speedup": statistics.median(ratios), "base_min_s": min(base), "min_s": min(samples[k]),
                  "speedup_best": min(base) / min(samples[k]), "rounds": rounds}
    return out


class Rotation:
    """A callable that runs the next of ``calls`` (one per distinct weight copy) each time.

    ``compare`` calls every function once per round, so rotations of the same length advance in
    step: the bytes streamed between two uses of one copy are ``copies x (bytes of one copy of
    every rotation in the round)``.
    """

    def __init__(self, calls: Sequence[Callable[[], object]]):
        if not calls:
            raise ValueError("Rotation needs at least one call")
        self.calls = list(calls)
        self._i = 0

    def __len__(self) -> int:
        return len(self.calls)

    def __call__(self):
        fn = self.calls[self._i]
        self._i = (self._i + 1) % len(self.calls)
        return fn()


# Cold weights: what is streamed between two uses of one copy must be at least COLD_FACTOR x the
# last-level cache (LRU-like replacement then keeps none of it), and never less than COLD_MIN_BYTES
# (caches that misreport their size). COLD_MAX_BYTES caps the memory the copies may take.
COLD_FACTOR = 2.0
COLD_MIN_BYTES = 64 << 20
COLD_MAX_BYTES = 6 << 30
MIN_COPIES = 2


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def cold_copies(round_bytes: int, llc_bytes: int, *, factor: float = COLD_FACTOR, min_bytes: int = COLD_MIN_BYTES,
                max_bytes: int | None = COLD_MAX_BYTES) -> tuple[int, str]:
    """(copies of each rotation, note): the fewest copies that stream ``max(factor x llc, min_bytes)``
    between two uses of one copy, where one round touches ``round_bytes`` (one copy of every rotation).

    The memory cap is ``max_bytes`` and half the available memory; when it binds, the note says so
    (and whether the copies still exceed the cache at all).
    """
    if round_bytes <= 0:
        raise ValueError(f"round_bytes must be positive, got {round_bytes}")
    target = max(factor * llc_bytes, min_bytes)
    n = max(MIN_COPIES, math.ceil(target / round_bytes))
    cap = max_bytes if max_bytes is not None else float("inf")
    avail = available_memory_bytes()
    if avail is not None:
        cap = min(cap, avail // 2)
    if n * round_bytes > cap:
        n = max(MIN_COPIES, int(cap // round_bytes))
        note = (f"capped at {n} copies ({n * round_bytes / 2**20:.0f} MiB) by memory; "
                + ("still over the LLC" if n * round_bytes > llc_bytes else "NOT over the LLC: not cold"))
        return n, note
    return n, f"{n} copies, {n * round_bytes / 2**20:.0f} MiB >= {target / 2**20:.0f} MiB"
