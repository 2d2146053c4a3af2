"""Command line: ``sparseprune bench`` (also ``python -m sparseprune bench``)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sparseprune", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time dense vs each sparsity pattern on this device (or --accuracy)")
    b.add_argument("--out", default="benchmarks/results/local", help="folder for the CSV and PNG (created)")
    b.add_argument("--quick", action="store_true", help="a subset that finishes in under a minute on 2 CPU cores")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    b.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default fp32 on CPU, fp16 on CUDA")
    b.add_argument("--backend", default="auto", help="sparseprune backend for our layers (default auto)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--accuracy", action="store_true",
                   help="run the accuracy study (accuracy vs speedup of every pruning style) instead")
    b.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy:
        from .bench import accuracy

        accuracy.run(args.out, quick=args.quick, device=device)
        return 0
    from .bench import speed

    dtype = args.dtype or ("fp16" if device == "cuda" else "fp32")
    speed.run(args.out, quick=args.quick, device=device, dtype=dtype, backend=args.backend,
              progress=not args.no_progress)
    print(f"wrote {args.out}/speed.csv and {args.out}/speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
