"""backend="auto" is never slower than dense: dense vs auto-converted Llama-shaped MLP blocks.

For each block shape and batch size, the dense block, its 2:4 auto-converted copy and the same copy
forced onto each sparse backend by name (backend="cpu" on CPU; "cuda" and "triton" on a GPU, where
they can run it) are timed interleaved; we report the median over rounds of dense/auto (the
speedup; >= 1 means auto is not slower) and the same for each forced backend.

    python benchmarks/bench_auto.py [--quick] [--dtype fp32|bf16] [--out DIR]

Writes ``auto-<dtype>.md`` (a table), ``auto-<dtype>.csv`` (one row per shape and batch, each with
the machine's metadata: CPU model, family/model, ISA level, cores, threads, load, versions, date)
and ``auto-<dtype>.json`` (the metadata) to DIR, by default ``benchmarks/results/<machine label>/``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparseprune  # noqa: E402
from sparseprune import autotune  # noqa: E402
from sparseprune.bench import machine  # noqa: E402
from sparseprune.bench.speed import explicit_backends  # noqa: E402
from sparseprune.bench.timing import compare  # noqa: E402

# (name, hidden, intermediate): MLP blocks up [I x H] -> SiLU -> down [H x I], Llama-style.
SHAPES = [("mlp-1024x2816", 1024, 2816), ("mlp-2048x5632", 2048, 5632), ("attn-proj-1024", 1024, 1024)]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def block(hidden, inter, dtype):
    torch.manual_seed(0)
    if hidden == inter:
        return nn.Sequential(nn.Linear(hidden, inter, bias=False)).to(dtype).eval()
    return nn.Sequential(nn.Linear(hidden, inter, bias=False), nn.SiLU(),
                         nn.Linear(inter, hidden, bias=False)).to(dtype).eval()


def forced(auto_model, backend):
    """A copy of the auto-converted model with every sparse layer bound to ``backend`` by name,
    or None when some layer cannot run on it."""
    m = copy.deepcopy(auto_model)
    try:
        for mod in m.modules():
            if isinstance(mod, sparseprune.SparseLinear):
                mod.set_backend(backend)
    except (RuntimeError, ValueError):
        return None
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, fewer batch sizes")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=float, default=0.6, help="seconds of timing per (shape, batch)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {[s[0] for s in SHAPES]}")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--out", default=None, help="default benchmarks/results/<machine label>/")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [s for s in SHAPES if s[0] in wanted]
        if len(shapes) != len(wanted):
            ap.error(f"unknown shape in {wanted}; known: {[s[0] for s in SHAPES]}")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 8, 64, 512] if args.quick else BATCHES
    out_dir = args.out or machine.default_results_dir(device, RESULTS)
    meta = machine.run_metadata(device, dtype=args.dtype, weights="hot")
    print(machine.describe(meta), flush=True)

    rows = []
    for name, hidden, inter in shapes:
        dense = block(hidden, inter, dtype).to(device)
        auto = sparseprune.convert(copy.deepcopy(dense), "2:4", backend="auto")
        named = {b: m for b in explicit_backends(device) if (m := forced(auto, b)) is not None}
        plan = ";".join(f"{n}:{','.join(f'{k}={v}' for k, v in m.auto_plan.items())}"
                        for n, m in auto.named_modules() if isinstance(m, sparseprune.SparseLinear))
        print(f"{name}: {plan}", flush=True)
        for b in batches:
            x = torch.randn(b, hidden, device=device).to(dtype)
            with torch.no_grad():
                fns = {"auto": lambda: auto(x), **{k: (lambda m=m: m(x)) for k, m in named.items()}}
                res = compare(lambda: dense(x), fns, device, budget_s=args.budget, min_rounds=7)
            row = {**meta, "shape": name, "batch": b, "dense_ms": res["auto"]["base_s"] * 1e3,
                   "auto_ms": res["auto"]["s"] * 1e3, "auto_speedup": res["auto"]["speedup"],
                   "auto_best_speedup": res["auto"]["speedup_best"]}
            for k in named:
                row[f"{k}_ms"] = res[k]["s"] * 1e3
                row[f"{k}_speedup"] = res[k]["speedup"]
            row.update(rounds=res["auto"]["rounds"], auto_plan=plan, load_1m=machine.loadavg()[0])
            rows.append(row)
            print(f"  batch {b:5d}: dense {row['dense_ms']:8.3f} ms  auto {row['auto_ms']:8.3f} ms "
                  f"(x{row['auto_speedup']:.2f})" + "".join(f"  {k} {row[f'{k}_ms']:8.3f} ms (x{row[f'{k}_speedup']:.2f})"
                                                            for k in named), flush=True)

    meta = machine.finish(meta)
    for r in rows:
        r["loadavg_after"] = meta["loadavg_after"]
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"auto-{args.dtype}" + ("-quick" if args.quick else ""))
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    machine.write_metadata(stem + ".json", meta, grid={"shapes": [s[0] for s in shapes], "batches": batches,
                                                       "budget_s": args.budget, "pattern": "2:4 magnitude"})
    forced_names = [k for k in rows[0] if k.endswith("_speedup") and k not in ("auto_speedup", "auto_best_speedup")]
    md = [f"# backend=\"auto\" vs dense, {args.dtype}", "",
          f"- machine: {machine.describe(meta)}",
          "- 2:4 magnitude-pruned, no bias, hot weights (the same block called again and again).",
          "- speedup = median over interleaved rounds of dense time / auto time (>= 1: auto not slower); "
          "best-time speedup = dense best / auto best (robust to bursts of load from other processes). "
          "Forced rows run every layer on the named backend at every batch size, for reference.",
          "- auto plan per layer (batch buckets 1 | 2-8 | 9-64 | 65-512 | 513+):"]
    for name, hidden, inter in shapes:
        md.append(f"  - {name}: `{next(r['auto_plan'] for r in rows if r['shape'] == name)}`")
    fnames = [k[: -len("_speedup")] for k in forced_names]
    md += ["", "| shape | batch | dense ms | auto ms | auto speedup | auto best-time speedup | "
           + " | ".join(f"{k} ms | {k} speedup" for k in fnames) + " |",
           "|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(fnames)]
    for r in rows:
        md.append(f"| {r['shape']} | {r['batch']} | {r['dense_ms']:.3f} | {r['auto_ms']:.3f} | {r['auto_speedup']:.2f} | "
                  f"{r['auto_best_speedup']:.2f} | " + " | ".join(
                      f"{r.get(k + '_ms', float('nan')):.3f} | {r.get(k + '_speedup', float('nan')):.2f}" for k in fnames)
                  + " |")
    worst = min(rows, key=lambda r: r["auto_speedup"])
    worst_best = min(rows, key=lambda r: r["auto_best_speedup"])
    md += ["", f"Worst auto speedup: {worst['auto_speedup']:.2f} ({worst['shape']}, batch {worst['batch']}); "
           f"worst best-time speedup: {worst_best['auto_best_speedup']:.2f} ({worst_best['shape']}, "
           f"batch {worst_best['batch']})."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
