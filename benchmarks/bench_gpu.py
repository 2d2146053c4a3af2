"""GPU speed of sparseprune's backends vs cuBLAS dense and PyTorch's own sparse paths (fp16).

Llama-3-8B linear shapes (out x in): 4096x4096 (q/o_proj), 14336x4096 (gate/up), 4096x14336
(down), batch 1..8192. Contenders per shape and batch:
  dense       F.linear (cuBLAS) on the dense weight                         (the baseline)
  torch-2:4   to_sparse_semi_structured, CUTLASS and cuSPARSELt backends      (semi24 weight)
  torch-bsr   torch.sparse._triton_ops.bsr_dense_mm, 64x64 blocks at 90%      (bsr weight)
  ours        SparseLinear(backend=b) for every b in available_backends("cuda"):
              semi24, bsr 64x64 at 90% sparsity, hybrid 64x64 at 87.5% (75%-sparse blocks of 2:4)
Every result is checked against the fp32 dense reference before it is timed. Times are medians
of triton.testing.do_bench (eager launches) and of do_bench_cudagraph (the kernel alone, as in
CUDA-graph decode). One CSV row per measurement, with device, versions and date.

Targets (H100): Semi24 >= 1.6x over dense at batch 1-16 (PyTorch's 2:4 path: 0.11x at batch 1,
pytorch#111339); BSR 64x64 90% >= 5x at batch 1-16 and >= 3x at 4096; Hybrid 87.5% >= 4x at 1-16.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

import sparseprune.backends as B
from sparseprune.formats import BlockSparseWeight, HybridWeight, Semi24Weight
from sparseprune.modules import SparseLinear

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096, 8192]
FIELDS = ["date", "device", "torch", "triton", "N", "K", "batch", "format", "impl", "backend",
          "ms_eager", "ms_graph", "speedup_eager", "speedup_graph", "rel_err", "note"]


def mask_24(n, k, device):
    g = torch.rand(n, k // 4, 4, device=device).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(2, g, True).reshape(n, k)


def block_mask(n, k, block, density, device):
    return torch.rand(n // block[0], k // block[1], device=device) < density


def weights(n, k, device):
    """format -> (PackedWeight, dense fp16 weight with the same values)."""
    w = torch.randn(n, k, device=device, dtype=torch.float16) / k**0.5
    out = {}
    s = Semi24Weight.from_dense(w, mask_24(n, k, device))
    out["semi24"] = (s, s.to_dense())
    b = BlockSparseWeight.from_dense(w, (64, 64), block_mask(n, k, (64, 64), 0.10, device))
    out["bsr64_90"] = (b, b.to_dense())
    h = HybridWeight.from_dense(w * mask_24(n, k, device), (64, 64), block_mask(n, k, (64, 64), 0.25, device))
    out["hybrid64_87.5"] = (h, h.to_dense())
    return out


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def time_fn(fn, rep):
    eager = do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median")
    try:
        graph = do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception:  # noqa: BLE001 - e.g. a path that synchronizes; recorded as empty
        graph = float("nan")
    return eager, graph


def contenders(fmt, packed, wd, device):
    """(impl, backend, callable(x)) for one weight format."""
    out = []
    for name in B.available_backends(device):
        be = B.get_backend(name)
        if be.unsupported_reason(packed, torch.device(device)) is None:
            mod = SparseLinear(packed, None, backend=name)
            out.append(("sparseprune", name, mod))
    if fmt == "semi24":
        try:
            from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

            for force_cutlass, label in ((True, "torch-2:4-cutlass"), (False, "torch-2:4-cusparselt")):
                SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
                try:
                    ws = to_sparse_semi_structured(wd)
                    out.append((label, "torch", lambda x, ws=ws: F.linear(x, ws)))
                except Exception as e:  # noqa: BLE001
                    print(f"  {label}: unavailable ({type(e).__name__}: {str(e)[:120]})")
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
        except ImportError as e:
            print(f"  torch 2:4: unavailable ({e})")
    if fmt.startswith("bsr"):
        try:
            from torch.sparse._triton_ops import bsr_dense_mm

            wb = wd.to_sparse_bsr((64, 64))
            out.append(("torch-bsr", "torch", lambda x, wb=wb: bsr_dense_mm(wb, x.t()).t()))
        except Exception as e:  # noqa: BLE001
            print(f"  torch-bsr: unavailable ({type(e).__name__}: {str(e)[:120]})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/local")
    ap.add_argument("--batches", type=int, nargs="*", default=BATCHES)
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 4096x4096,14336x4096")
    ap.add_argument("--rep", type=int, default=40, help="milliseconds of timing per measurement")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    device = "cuda"
    torch.manual_seed(0)
    shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_gpu.csv")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    print(f"{meta}\nbackends on cuda: {B.available_backends(device)}\nwriting {path}")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            wr.writeheader()
        for n, k in shapes:
            ws = weights(n, k, device)
            for fmt, (packed, wd) in ws.items():
                impls = contenders(fmt, packed, wd, device)
                for m in args.batches:
                    x = torch.randn(m, k, device=device, dtype=torch.float16)
                    ref = F.linear(x.float(), wd.float())
                    dense_ms = time_fn(lambda: F.linear(x, wd), args.rep)
                    row = dict(meta, N=n, K=k, batch=m, format=fmt)
                    wr.writerow(dict(row, impl="dense-cublas", backend="torch", ms_eager=dense_ms[0], ms_graph=dense_ms[1],
                                     speedup_eager=1.0, speedup_graph=1.0,
                                     rel_err=rel_err(F.linear(x, wd), ref), note=""))
                    for impl, backend, fn in impls:
                        rec = dict(row, impl=impl, backend=backend)
                        try:
                            err = rel_err(fn(x), ref)
                            if not err < 2e-2:
                                rec.update(rel_err=err, note="WRONG RESULT: not timed")
                                print(f"  {n}x{k} {fmt} b={m} {impl}/{backend}: WRONG (rel err {err:.3g})")
                            else:
                                t = time_fn(lambda: fn(x), args.rep)
                                rec.update(ms_eager=t[0], ms_graph=t[1], rel_err=err,
                                           speedup_eager=dense_ms[0] / t[0], speedup_graph=dense_ms[1] / t[1])
                        except Exception as e:  # noqa: BLE001 - record and go on
                            rec["note"] = f"{type(e).__name__}: {str(e)[:160]}"
                            if impl == "sparseprune":
                                traceback.print_exc()
                        wr.writerow(rec)
                        f.flush()
                        if "ms_eager" in rec:
                            print(f"  {n}x{k} {fmt:14s} b={m:5d} {impl}/{backend:7s} {rec['ms_eager'] * 1e3:9.1f} us "
                                  f"({rec['speedup_eager']:.2f}x eager, {rec['speedup_graph']:.2f}x graph)")


if __name__ == "__main__":
    main()
