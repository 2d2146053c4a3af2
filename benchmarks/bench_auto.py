"""backend="auto" is never slower than dense: dense vs auto-converted Llama-shaped MLP blocks.

For each block shape and batch size, the dense block and its 2:4 auto-converted copy (and the same
copy forced onto the sparse kernel, backend="cpu", for reference) are timed interleaved; we report
the median over rounds of dense/auto (the speedup; >= 1 means auto is not slower).

    python benchmarks/bench_auto.py [--quick] [--dtype fp32|bf16] [--out benchmarks/results]

Writes ``auto-<device>.md`` (a table, overwritten) and appends rows to ``auto-<device>.csv`` with
device name, versions and date.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import platform
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparseprune  # noqa: E402
from sparseprune import autotune  # noqa: E402
from sparseprune.bench.timing import time_once  # noqa: E402


def interleaved(fns: dict, device, budget_s: float, min_rounds: int = 7, max_rounds: int = 200) -> dict:
    """Rounds of one call each, in turn; per name: median s, best s, and vs 'dense' the median of
    per-round ratios and the ratio of best times (interference on a shared box only adds time)."""
    for fn in fns.values():
        fn()
        fn()
    one = max(time_once(fn, device) for fn in fns.values())
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(one * len(fns), 1e-6))))
    t = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t[k].append(time_once(fn, device))
    base = t["dense"]
    return {k: {"s": statistics.median(v), "best_s": min(v), "rounds": rounds,
                "speedup": statistics.median(b / c for b, c in zip(base, v)), "best_speedup": min(base) / min(v)}
            for k, v in t.items()}

# (name, hidden, intermediate): MLP blocks up [I x H] -> SiLU -> down [H x I], Llama-style.
SHAPES = [("mlp-1024x2816", 1024, 2816), ("mlp-2048x5632", 2048, 5632), ("attn-proj-1024", 1024, 1024)]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def block(hidden, inter, dtype):
    torch.manual_seed(0)
    if hidden == inter:
        return nn.Sequential(nn.Linear(hidden, inter, bias=False)).to(dtype).eval()
    return nn.Sequential(nn.Linear(hidden, inter, bias=False), nn.SiLU(),
                         nn.Linear(inter, hidden, bias=False)).to(dtype).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, fewer batch sizes")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=float, default=0.6, help="seconds of timing per (shape, batch)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = SHAPES[:1] if args.quick else SHAPES
    batches = [1, 8, 64, 512] if args.quick else BATCHES
    dkey = autotune.device_key(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    date = datetime.datetime.now().isoformat(timespec="seconds")

    rows = []
    for name, hidden, inter in shapes:
        dense = block(hidden, inter, dtype).to(device)
        auto = sparseprune.convert(copy.deepcopy(dense), "2:4", backend="auto")
        forced = copy.deepcopy(auto)
        for m in forced.modules():
            if isinstance(m, sparseprune.SparseLinear):
                m.set_backend("cpu" if device.type == "cpu" else m.backend)
        plans = {n: autotune.describe(m.auto_plan) for n, m in auto.named_modules()
                 if isinstance(m, sparseprune.SparseLinear)}
        print(f"{name}: {plans}", flush=True)
        for b in batches:
            x = torch.randn(b, hidden, device=device).to(dtype)
            with torch.no_grad():
                res = interleaved({"dense": lambda: dense(x), "auto": lambda: auto(x), "sparse": lambda: forced(x)},
                                  device, args.budget)
            row = {"date": date, "device": dkey, "dtype": args.dtype, "shape": name, "batch": b,
                   "dense_ms": res["dense"]["s"] * 1e3, "auto_ms": res["auto"]["s"] * 1e3,
                   "auto_speedup": res["auto"]["speedup"], "auto_best_speedup": res["auto"]["best_speedup"],
                   "sparse_ms": res["sparse"]["s"] * 1e3, "sparse_speedup": res["sparse"]["speedup"],
                   "rounds": res["auto"]["rounds"],
                   "auto_plan": ";".join(f"{n}:{','.join(f'{k}={v}' for k, v in m.auto_plan.items())}"
                                         for n, m in auto.named_modules() if isinstance(m, sparseprune.SparseLinear)),
                   "loadavg": round(load, 2)}
            rows.append(row)
            print(f"  batch {b:5d}: dense {row['dense_ms']:8.3f} ms  auto {row['auto_ms']:8.3f} ms "
                  f"(x{row['auto_speedup']:.2f})  sparse-only {row['sparse_ms']:8.3f} ms (x{row['sparse_speedup']:.2f})",
                  flush=True)

    os.makedirs(args.out, exist_ok=True)
    tag = device.type
    csv_path = os.path.join(args.out, f"auto-{tag}.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    md = [f"# backend=\"auto\" vs dense on {device.type}", "",
          f"- device: `{dkey}`", f"- platform: {platform.platform()}, dtype {args.dtype}, 2:4 magnitude-pruned, "
          f"no bias; date {date}; 1-min load average at start {load:.2f}",
          "- speedup = median over interleaved rounds of dense time / auto time (>= 1: auto not slower); "
          "best-time speedup = dense best / auto best (robust to bursts of load from other processes). "
          "'sparse only' forces the sparse kernel on every batch size, for reference.",
          "- auto plan per layer (batch buckets 1 | 2-8 | 9-64 | 65-512 | 513+):"]
    for name, hidden, inter in shapes:
        plan = next(r["auto_plan"] for r in rows if r["shape"] == name)
        md.append(f"  - {name}: `{plan}`")
    md += ["", "| shape | batch | dense ms | auto ms | auto speedup | auto best-time speedup | sparse-only ms "
           "| sparse-only speedup |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['batch']} | {r['dense_ms']:.3f} | {r['auto_ms']:.3f} | {r['auto_speedup']:.2f} | "
                  f"{r['auto_best_speedup']:.2f} | {r['sparse_ms']:.3f} | {r['sparse_speedup']:.2f} |")
    worst = min(rows, key=lambda r: r["auto_speedup"])
    worst_best = min(rows, key=lambda r: r["auto_best_speedup"])
    md += ["", f"Worst auto speedup: {worst['auto_speedup']:.2f} ({worst['shape']}, batch {worst['batch']}); "
           f"worst best-time speedup: {worst_best['auto_best_speedup']:.2f} ({worst_best['shape']}, "
           f"batch {worst_best['batch']})."]
    with open(os.path.join(args.out, f"auto-{tag}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
