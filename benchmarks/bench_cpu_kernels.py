"""CPU kernel benchmark: dense F.linear vs sparseprune's semi24 / BSR / hybrid ops.

Dense and sparse runs are interleaved round by round and the reported ratio is the median of the
per-round ratios (dense ms / sparse ms), which cancels slow drifts (turbo, other tenants). With
``--isa a,b`` each sparse case runs at every listed ISA level in the same rounds (e.g. ``amx,avx512bf16``
on an Intel Xeon with AMX: tiles vs AVX-512), and ``--amx-min-batch`` moves the batch where the AMX
tiles take over (default: where the AVX-512 GEMV stops), to find the crossover; ``--gemv-max-batch`` does
the same for the GEMV / tiled switch of the vector levels.

Floor: the time the sparse kernel would take if it read its bytes at the bandwidth dense fp32 F.linear
reaches at batch 1 and did its useful FLOPs at the best rate dense F.linear reaches (fp32 or the dtype) at
the largest batch, all measured at the start of this run (``--bandwidth-gbs`` / ``--peak-gflops`` replace
them); "of floor" = floor / ours. Dense's rate is what a user gets, not the CPU's peak (MKL fp32 reached
about 45% of the FMA peak on a Zen 3), so a kernel can beat this floor.

    python benchmarks/bench_cpu_kernels.py [--large] [--dtypes fp32,bf16] [--batches 1,16,128] [--isa amx,avx512bf16]
    python benchmarks/bench_cpu_kernels.py --threads 1 --clock cpu   # shared machine: thread CPU time

Writes a CSV (default ``benchmarks/results/<machine label>/cpu_kernels.csv``, overwritten) whose
rows carry the machine's metadata (``sparseprune.bench.machine``: CPU model, family/model, ISA level
in use, cores, threads, load before/after, versions, date), and the same metadata as JSON beside it.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

import torch.nn.functional as F

import sparseprune  # noqa: F401
from sparseprune.bench import machine
from sparseprune.formats import BlockSparseWeight, HybridWeight, Semi24Weight
from sparseprune.ops import bsr, hybrid, semi24

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mask_24(n, k, g):
    idx = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(n, k)


def block_mask(n, k, block, sparsity, g):
    """Exactly round(density * blocks) kept blocks per block row (even load, as pruning would give)."""
    nbr, nbc = n // block[0], k // block[1]
    keep = max(1, round((1 - sparsity) * nbc))
    order = torch.rand(nbr, nbc, generator=g).argsort(-1)[:, :keep]
    return torch.zeros(nbr, nbc, dtype=torch.bool).scatter_(1, order, True)


def make_cases(n, k, dtype, g):
    """[(pattern, sparsity, packed weight, sparse callable(x))] and the dense weight to time F.linear with."""
    w = torch.randn(n, k, generator=g)
    cases = []
    m24 = mask_24(n, k, g)
    p = Semi24Weight.from_dense(w.to(dtype), m24)
    cases.append(("semi24", 0.5, p, (lambda p: lambda x: semi24.semi24_linear(x, p.values, p.meta))(p)))
    for sp in (0.5, 0.75, 0.9):
        p = BlockSparseWeight.from_dense(w.to(dtype), (32, 32), block_mask(n, k, (32, 32), sp, g))
        cases.append(("bsr32x32", sp, p, (lambda p: lambda x: bsr.bsr_linear(x, p.values, p.crow, p.col, k))(p)))
    p = HybridWeight.from_dense((w * m24).to(dtype), (32, 32), block_mask(n, k, (32, 32), 0.75, g))
    cases.append(("hybrid32x32", 0.875, p,
                  (lambda p: lambda x: hybrid.hybrid_linear(x, p.values, p.meta, p.crow, p.col, k))(p)))
    return w.to(dtype), cases


def packed_bytes(p) -> int:
    return sum(t.numel() * t.element_size() for t in p.tensors().values())


def kept_weights(p) -> int:
    """Multiply-adds per batch row the sparse kernel must do: its stored values (2:4 stores the kept half)."""
    return p.values.numel()


def clock(kind):
    return time.thread_time if kind == "cpu" else time.perf_counter


def timed(fn, x, reps, now=time.perf_counter):
    t0 = now()
    for _ in range(reps):
        fn(x)
    return (now() - t0) / reps * 1e3


def at_isa(fn, isa):
    """fn run with SPARSEPRUNE_CPU_ISA=isa (the dispatcher reads it per call); isa '' = the default level."""
    if not isa:
        return fn

    def run(x):
        old = os.environ.get("SPARSEPRUNE_CPU_ISA")
        os.environ["SPARSEPRUNE_CPU_ISA"] = isa
        try:
            return fn(x)
        finally:
            if old is None:
                del os.environ["SPARSEPRUNE_CPU_ISA"]
            else:
                os.environ["SPARSEPRUNE_CPU_ISA"] = old
    return run


def bench_round_robin(dense_fn, sparse_fns, x, rounds, now=time.perf_counter, target_s=0.005):
    """Dense and every sparse candidate, interleaved round by round. Returns (dense median ms, dense min ms,
    {name: (median ms, median of per-round dense/sparse ratios, min ms)}).

    Short timing windows (~5 ms) and the minimum over rounds are reported too: on a shared, loaded
    machine a 2-thread region often waits a whole scheduler slice for its second thread, and the
    minimum is the best estimate of the uncontended time.
    """
    fns = {"__dense__": dense_fn, **sparse_fns}
    for f in fns.values():  # warm up (page faults, thread pool)
        f(x)
    reps = {k: max(1, int(target_s * 1e3 / max(timed(f, x, 1, now), 1e-3))) for k, f in fns.items()}
    ms = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            ms[k].append(timed(f, x, reps[k], now))
    d = ms.pop("__dense__")
    out = {k: (statistics.median(v), statistics.median(a / b for a, b in zip(d, v)), min(v)) for k, v in ms.items()}
    return statistics.median(d), min(d), out


def dense_rates(w, k, batches, now, rounds=5):
    """(GB/s dense F.linear reads w at batch 1, GFLOP/s it reaches at the largest batch, at least 256)."""
    def med(b):
        x = torch.randn(b, k).to(w.dtype)
        F.linear(x, w)
        reps = max(1, int(5 / max(timed(lambda x: F.linear(x, w), x, 1, now), 1e-3)))
        return statistics.median(timed(lambda x: F.linear(x, w), x, reps, now) for _ in range(rounds)) / 1e3
    big = max(max(batches), 256)
    return w.numel() * w.element_size() / med(1) / 1e9, 2 * big * w.numel() / med(big) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--large", action="store_true", help="also batch 4096")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--patterns", default="", help="comma list of pattern names to keep (default all)")
    ap.add_argument("--isa", default="", help="comma list of SPARSEPRUNE_CPU_ISA levels to run side by side "
                    "(default: the level in use)")
    ap.add_argument("--amx-min-batch", type=int, default=0, help="SPARSEPRUNE_AMX_MIN_BATCH for this run")
    ap.add_argument("--gemv-max-batch", type=int, default=0, help="SPARSEPRUNE_GEMV_MAX_BATCH for this run")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: thread CPU time (needs --threads 1; steadier on a shared machine)")
    ap.add_argument("--bandwidth-gbs", type=float, default=0.0, help="floor: weight bandwidth (default: measured)")
    ap.add_argument("--peak-gflops", type=float, default=0.0, help="floor: FLOP rate (default: measured)")
    ap.add_argument("--csv", default=None, help="default benchmarks/results/<machine label>/cpu_kernels.csv")
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures the calling thread only: use it with --threads 1")
    if args.amx_min_batch:
        os.environ["SPARSEPRUNE_AMX_MIN_BATCH"] = str(args.amx_min_batch)
    if args.gemv_max_batch:
        os.environ["SPARSEPRUNE_GEMV_MAX_BATCH"] = str(args.gemv_max_batch)

    torch.set_num_threads(args.threads)
    now = clock(args.clock)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.large and 4096 not in batches:
        batches.append(4096)
    keep = set(filter(None, args.patterns.split(",")))
    isas = args.isa.split(",") if args.isa else [""]
    g = torch.Generator().manual_seed(0)
    rows = []
    info = sparseprune.build_info()
    meta = machine.run_metadata("cpu", weights="hot")
    print(f"# {machine.describe(meta)}, amx: {info['cpu_amx']}, {args.clock} clock, {args.n}x{args.k}")
    print(f"{'dtype':5} {'pattern':12} {'sparsity':>8} {'batch':>6} {'isa':>12} {'dense ms':>9} {'ours ms':>9} {'ratio':>6}"
          f" {'ratio(min)':>10} {'floor ms':>9} {'of floor':>8}")
    # Floor rates: the bandwidth of the fp32 dense GEMV (memory-bound on every CPU we know) and the best FLOP
    # rate dense reaches in fp32 or in the dtype (bf16 may have AMX, or no fast path at all).
    bw32, fl32 = dense_rates(torch.randn(args.n, args.k, generator=g), args.k, batches, now)
    for dn in args.dtypes.split(","):
        dtype = DTYPES[dn]
        w, cases = make_cases(args.n, args.k, dtype, g)
        fl = fl32 if dtype == torch.float32 else max(fl32, dense_rates(w, args.k, batches, now)[1])
        bw, fl = args.bandwidth_gbs or bw32, args.peak_gflops or fl
        print(f"# {dn}: floor rates: {bw:.1f} GB/s (dense fp32 F.linear weight reads, batch 1), {fl:.1f} GFLOP/s "
              f"(best dense F.linear, fp32 or {dn}, batch {max(max(batches), 256)})")
        for pattern, sp, packed, fn in cases:
            if keep and pattern not in keep:
                continue
            for b in batches:
                x = torch.randn(b, args.k, generator=g).to(dtype)
                for isa in isas:
                    assert torch.isfinite(at_isa(fn, isa)(x).float()).all()  # smoke check; correctness lives in the tests
                rounds = args.rounds if b < 1024 else max(3, args.rounds // 3)
                cands = {isa or info["cpu_isa_active"]: at_isa(fn, isa) for isa in isas}
                d, dmin, res = bench_round_robin(lambda x, w=w: F.linear(x, w), cands, x, rounds, now)
                floor = max(packed_bytes(packed) / bw / 1e6, 2 * b * kept_weights(packed) / fl / 1e6)
                for isa, (s, r, smin) in res.items():
                    print(f"{dn:5} {pattern:12} {sp:8.3f} {b:6d} {isa:>12} {d:9.3f} {s:9.3f} {r:6.2f} {dmin / smin:10.2f}"
                          f" {floor:9.3f} {floor / s:8.2f}", flush=True)
                    rows.append({**meta, "dtype": dn, "shape": f"{args.n}x{args.k}", "pattern": pattern,
                                 "sparsity": sp, "batch": b, "isa_run": isa, "clock": args.clock,
                                 "ms_dense": f"{d:.4f}", "ms_sparse": f"{s:.4f}", "ratio": f"{r:.3f}",
                                 "ms_dense_min": f"{dmin:.4f}", "ms_sparse_min": f"{smin:.4f}",
                                 "ratio_of_min": f"{dmin / smin:.3f}", "ms_floor": f"{floor:.4f}",
                                 "load_1m": machine.loadavg()[0]})
    meta = machine.finish(meta)
    path = args.csv or os.path.join(machine.default_results_dir("cpu"), "cpu_kernels.csv")
    if rows:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows({**r, "loadavg_after": meta["loadavg_after"]} for r in rows)
        machine.write_metadata(os.path.splitext(path)[0] + ".json", meta, dtypes=args.dtypes.split(","),
                               batches=batches, shape=[args.n, args.k], rounds=args.rounds, clock=args.clock)
        print(f"wrote {path}")

if __name__ == "__main__":
    main()
