"""Where the time of a sparse conv goes: im2col vs the sparse GEMM vs dense F.conv2d, per ResNet-50 layer.

SparseConv2d runs ``im2col(x) @ W^T`` (sparseprune/conv.py). This measures, for every distinct
groups=1 conv of a ResNet-50 (random weights, channels-last input of --image pixels), interleaved:

  dense      F.conv2d on the dense weight (oneDNN / cuDNN, no im2col): the baseline
  im2col     the unfolding alone (sparseprune.formats.conv.im2col)
  gemm       the 2:4 sparse GEMM alone on the unfolded input (backend --backend)
  sparse     SparseConv2d end to end (im2col + GEMM + the channels-last view)

and reports im2col / dense (if it is large, no GEMM however fast can make the conv beat dense:
a 2:4 conv at 1.2x needs im2col + GEMM <= 0.83 dense, and 2:4 halves the math at best) and
im2col / sparse (its share of our own time; an implicit-GEMM kernel would remove it). The floor
of im2col is writing and re-reading kh*kw times the input; it is printed as MB per layer.

    python benchmarks/bench_conv_im2col.py [--batch 1] [--image 224] [--dtype fp32|bf16] [--device cpu]

Prints a markdown table and appends rows to ``conv-im2col-<device>.csv`` in --out (device name,
versions, date and load average in every row).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparseprune  # noqa: E402
from sparseprune import autotune  # noqa: E402
from sparseprune.bench.models import resnet50  # noqa: E402
from sparseprune.bench.speed import write_csv  # noqa: E402
from sparseprune.bench.timing import compare  # noqa: E402
from sparseprune.formats.conv import ConvGeometry, gemm_weight, im2col  # noqa: E402
from sparseprune.prune.patterns import parse_pattern  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def distinct_convs(model: nn.Module, x: torch.Tensor):
    """[(name, conv, input shape)] of the groups=1 convs, one per (geometry, weight shape, input shape)."""
    seen, out, hooks = set(), [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            def hook(mod, args, name=name):
                key = (ConvGeometry.of(mod), tuple(mod.weight.shape), tuple(args[0].shape))
                if key not in seen:
                    seen.add(key)
                    out.append((name, mod, tuple(args[0].shape)))
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="sparse backend (default: cpu on CPU, triton on CUDA)")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timing per layer")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "local"))
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    backend = args.backend or ("cpu" if device.type == "cpu" else "triton")
    torch.manual_seed(0)
    model = resnet50().to(device, dtype).eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.image, args.image, device=device).to(dtype)
    layers = distinct_convs(model, x.contiguous(memory_format=torch.channels_last))
    dkey = autotune.device_key(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    date = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    print(f"# im2col share of a sparse conv, ResNet-50 layers, batch {args.batch}, {args.image}px, {args.dtype}, "
          f"backend {backend}\n\n- device: `{dkey}`; date {date}; load average {load:.2f}\n")
    print("| layer | conv | input | cols MB | dense ms | im2col ms | gemm ms | sparse ms | im2col/dense | im2col/sparse "
          "| sparse speedup |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, conv, shape in layers:
        geom = ConvGeometry.of(conv)
        if geom.in_channels % 4:
            continue  # the stem: no 2:4 (in_channels=3)
        w2 = gemm_weight(conv)
        keep = w2.abs().reshape(w2.shape[0], -1, 4).topk(2, dim=-1).indices
        mask = torch.zeros_like(w2, dtype=torch.bool).reshape(w2.shape[0], -1, 4).scatter_(2, keep, True)
        packed = sparseprune.pack(w2, parse_pattern("2:4"), mask.reshape(w2.shape))
        sparse = sparseprune.SparseConv2d(packed, geom, None, backend=backend)
        wd = (w2 * mask.reshape(w2.shape)).reshape(conv.out_channels, *geom.kernel_size, geom.in_channels)
        wd = wd.permute(0, 3, 1, 2)  # channels-last strided, as the dense candidate of backend="auto" uses
        xi = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        cols, _ = im2col(xi, geom)
        be = sparseprune.backends.get_backend(backend)
        with torch.no_grad():
            res = compare(lambda: F.conv2d(xi, wd, None, geom.stride, geom.padding, geom.dilation),
                          {"im2col": lambda: im2col(xi, geom), "gemm": lambda: be.forward(sparse, cols),
                           "sparse": lambda: sparse(xi)}, device, budget_s=args.budget)
        dense_s = res["sparse"]["base_s"]
        r = {"date": date, "device": dkey, "dtype": args.dtype, "batch": args.batch, "image": args.image,
             "backend": backend, "layer": name, "conv": geom.describe(), "in_shape": "x".join(map(str, shape)),
             "out_channels": conv.out_channels, "cols_mb": cols.numel() * cols.element_size() / 1e6,
             "dense_ms": dense_s * 1e3, "im2col_ms": res["im2col"]["s"] * 1e3, "gemm_ms": res["gemm"]["s"] * 1e3,
             "sparse_ms": res["sparse"]["s"] * 1e3, "sparse_speedup": res["sparse"]["speedup"],
             "loadavg": round(load, 2)}
        r["im2col_over_dense"] = r["im2col_ms"] / r["dense_ms"]
        r["im2col_over_sparse"] = r["im2col_ms"] / r["sparse_ms"]
        rows.append(r)
        print(f"| {name} | {r['conv']} {geom.in_channels}->{conv.out_channels} | {r['in_shape']} | {r['cols_mb']:.1f} | "
              f"{r['dense_ms']:.3f} | {r['im2col_ms']:.3f} | {r['gemm_ms']:.3f} | {r['sparse_ms']:.3f} | "
              f"{r['im2col_over_dense']:.2f} | {r['im2col_over_sparse']:.2f} | {r['sparse_speedup']:.2f} |", flush=True)
    tot = {k: sum(r[k] for r in rows) for k in ("dense_ms", "im2col_ms", "gemm_ms", "sparse_ms")}
    print(f"\nSum over distinct layers: dense {tot['dense_ms']:.2f} ms, im2col {tot['im2col_ms']:.2f} ms "
          f"({tot['im2col_ms'] / tot['dense_ms']:.2f} of dense, {tot['im2col_ms'] / tot['sparse_ms']:.2f} of sparse), "
          f"gemm {tot['gemm_ms']:.2f} ms, sparse {tot['sparse_ms']:.2f} ms")
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, f"conv-im2col-{device.type}.csv"))


if __name__ == "__main__":
    main()
