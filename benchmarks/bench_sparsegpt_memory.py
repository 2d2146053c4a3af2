"""SparseGPT on one 4096x4096 layer with 128 x 2048 calibration tokens: memory beyond the model, and time.

The issue's requirement: this must fit in 2 GB beyond the model, on CPU and GPU. What SparseGPT
itself holds is H (in^2 floats), its inverse / Cholesky factor and a float copy of W: about
3 x 64 MB + 64 MB here. The calibration activations are the other risk (128 x 2048 x 4096 fp32
is 4.3 GB): they are fed as a generator, which pruning streams item by item (see
``sparseprune.prune.calibrate._replayable``), so only one item (32 MB) and its output live at once.

Peak memory is measured in a fresh process: on CPU the rise of the peak RSS (``ru_maxrss``) from
after the model and the first item exist to the end of pruning; on CUDA ``max_memory_allocated``
over the same span.

    python benchmarks/bench_sparsegpt_memory.py [--device cpu|cuda] [--k 4096] [--items 128] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparseprune  # noqa: E402
from sparseprune._device import device_name  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--items", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    layer = nn.Linear(args.k, args.k, bias=False).to(dev)
    # Inputs with a spread of feature scales (never zeros): a fresh tensor per item.
    scale = (torch.rand(args.k, device=dev) * 3 + 0.25)
    gen = torch.Generator(device=dev).manual_seed(1)

    def items():
        for _ in range(args.items):
            yield torch.randn(args.tokens, args.k, device=dev, generator=gen) * scale

    first = torch.randn(args.tokens, args.k, device=dev)  # the high-water mark includes one item
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() / 2**20
    else:
        base = _rss_mb()
    del first
    before = layer.weight.detach().clone()
    t0 = time.perf_counter()
    sparseprune.prune(layer, "2:4", method="sparsegpt", calibration=items())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _rss_mb()
    secs = time.perf_counter() - t0
    kept = (layer.weight != 0).float().mean().item()
    changed = (layer.weight != before)[layer.weight != 0].float().mean().item()
    model_mb = layer.weight.numel() * layer.weight.element_size() / 2**20
    extra = peak - base
    verdict = "fits" if extra <= 2048 else "DOES NOT fit"
    print(f"device {device_name(dev)}, torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {torch.get_num_threads()}")
    print(f"sparsegpt 2:4, {args.k}x{args.k} fp32 layer ({model_mb:.0f} MB), calibration "
          f"{args.items} x {args.tokens} tokens ({args.items * args.tokens * args.k * 4 / 2**30:.1f} GiB of fp32 "
          f"activations, streamed from a generator)")
    print(f"peak memory beyond the model and one input item: {extra:.0f} MiB ({verdict} in 2 GiB); "
          f"time {secs:.1f} s; kept {kept:.3f} of the weights, {changed:.3f} of the kept ones updated")
    return 0 if extra <= 2048 else 1


if __name__ == "__main__":
    raise SystemExit(main())
