"""Plots benchmarks/bench_gpu.py's CSV: speedup over dense cuBLAS vs batch (at most 2 PNGs).

  gpu_speedup_eager.png   do_bench medians (eager launches)
  gpu_speedup_graph.png   do_bench_cudagraph medians (kernel time, as in CUDA-graph decode)
One panel per weight shape; one line per (format, implementation, backend).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/local")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    path = args.csv or os.path.join(args.out, "bench_gpu.csv")
    rows = list(csv.DictReader(open(path)))
    if not rows:
        raise SystemExit(f"{path} has no rows")
    last = max(r["date"] for r in rows)  # plot the latest run only
    rows = [r for r in rows if r["date"] == last]
    shapes = sorted({(int(r["N"]), int(r["K"])) for r in rows})
    for mode in ("eager", "graph"):
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
        for ax, (n, k) in zip(axes[0], shapes):
            lines = defaultdict(list)
            for r in rows:
                if (int(r["N"]), int(r["K"])) != (n, k) or r["impl"] == "dense-cublas":
                    continue
                v = r.get(f"speedup_{mode}") or ""
                if v and not math.isnan(float(v)):
                    lines[(r["format"], r["impl"], r["backend"])].append((int(r["batch"]), float(v)))
            for (fmt, impl, be), pts in sorted(lines.items()):
                pts.sort()
                style = "-" if impl == "sparseprune" else "--"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                        label=f"{fmt} {impl if impl != 'sparseprune' else ''}{be if impl == 'sparseprune' else ''}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{n}x{k} fp16")
            ax.set_xlabel("batch (tokens)")
            ax.set_ylabel("speedup over dense cuBLAS")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        dev = rows[0]["device"]
        fig.suptitle(f"{dev}, torch {rows[0]['torch']}, triton {rows[0]['triton']}, {last} ({mode} timing)")
        fig.tight_layout()
        out = os.path.join(args.out, f"gpu_speedup_{mode}.png")
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
