"""Command line: ``sparseprune bench`` (also ``python -m sparseprune bench``).

``sparseprune bench`` runs one mode, picked by a flag; without one it runs the speed benchmark.
Results go to ``benchmarks/results/<machine label>/`` (``--out`` overrides), e.g.
``cpu-epyc-zen3-2core``: one folder per kind of machine, so figures from different CPUs never mix.

To add a mode: write ``_<mode>(args, out)`` below, list it in ``MODES`` (flag name and help) and,
if it has options of its own, add them in an argument group in ``_add_<mode>_options``. A mode
flag may take a value (``MODE_ARGS``): ``--models`` alone runs every model, ``--models llama`` one.
"""

from __future__ import annotations

import argparse
import sys


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _ints(text: str) -> list[int]:
    return [int(s) for s in _csv(text)]


def _weights(text: str) -> list[str]:
    modes = _csv(text)
    if not modes or any(m not in ("hot", "cold") for m in modes):
        raise argparse.ArgumentTypeError(f"expected hot, cold or hot,cold, got {text!r}")
    return modes


def _model_names(text: str) -> list[str]:
    from .bench.model_speed import MODELS

    names = _csv(text)
    bad = [n for n in names if n not in MODELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown model(s) {bad or text!r}; known: {', '.join(MODELS)}")
    return names


def _style_names(text: str) -> list[str]:
    from .bench.model_speed import resolve_styles

    try:
        return [s.label for s in resolve_styles(_csv(text))]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_ints(text: str) -> list[int]:
    try:
        values = _ints(text)
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_speed_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("speed (the default mode)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default fp32 on CPU, fp16 on CUDA (also for --models)")
    g.add_argument("--weights", default="hot,cold", type=_weights,
                   help="hot (one weight, called again and again), cold (rotate through distinct copies so every "
                        "call streams its weight from memory), or hot,cold (the default)")
    g.add_argument("--backends", default=None, type=_csv,
                   help="backends for the 'ours' rows, named explicitly (default: cpu on CPU; cuda,triton on CUDA; "
                        "also for --models)")
    g.add_argument("--auto-cases", default=None, type=_csv,
                   help="cases that also get a backend='auto' row (default 2:4, hybrid 87.5%%; "
                        "'none' for no auto rows)")
    g.add_argument("--shapes", default=None, type=_csv, help="shape labels or NxK (out x in), comma-separated")
    g.add_argument("--cases", default=None, type=_csv,
                   help="pattern cases, comma-separated (e.g. '2:4,block32 90%%,torch-bsr32 50%%')")
    g.add_argument("--batches", default=None, type=_ints, help="batch sizes (hot, and cold unless --cold-batches)")
    g.add_argument("--cold-batches", default=None, type=_ints, help="batch sizes for cold weights")
    g.add_argument("--budget", default=None, type=float,
                   help="seconds of timing per configuration (also for --models: rounds of short calls fill it)")
    g.add_argument("--llc-mb", default=None, type=float,
                   help="last-level cache size to size the cold copies from (default: read from sysfs/lscpu)")
    g.add_argument("--cold-max-mb", default=None, type=float, help="memory cap for the cold copies")


def _add_models_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("whole models (--models [llama,resnet50]; --dtype, --budget and --quick apply too)")
    g.add_argument("--styles", default=None, type=_style_names,
                   help="styles, comma-separated (default all: '2:4,block32 75%%,block32 90%%,hybrid 87.5%%,"
                        "channel 25%%,channel 50%%')")
    g.add_argument("--decode-batches", default=None, type=_positive_ints,
                   help="Llama decode batch sizes (default 1,8)")
    g.add_argument("--image-batches", default=None, type=_positive_ints,
                   help="ResNet-50 batch sizes (default 1,32)")
    g.add_argument("--rounds", default=None, type=_positive_int,
                   help="interleaved rounds per comparison, at least (default 5; --quick 3)")


def _speed(args, out) -> int:
    from .bench import speed

    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    speed.run(out, quick=args.quick, device=args.device, dtype=dtype, weights=args.weights, shapes=args.shapes,
              batches=args.batches, cold_batches=args.cold_batches, cases=args.cases, backends=args.backends,
              auto_cases=[] if args.auto_cases == ["none"] else args.auto_cases, budget_s=args.budget,
              llc_bytes=int(args.llc_mb * 2**20) if args.llc_mb else None,
              cold_max_bytes=int(args.cold_max_mb * 2**20) if args.cold_max_mb else None,
              progress=not args.no_progress and sys.stderr.isatty())
    return 0


def _accuracy(args, out) -> int:
    from .bench import accuracy

    accuracy.run(out, quick=args.quick, device=args.device)
    return 0


def _models(args, out) -> int:
    from .bench import model_speed

    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    model_speed.run(out, quick=args.quick, device=args.device, dtype=dtype, models=args.models, styles=args.styles,
                    decode_batches=args.decode_batches, image_batches=args.image_batches, rounds=args.rounds,
                    budget_s=args.budget, backends=args.backends)
    return 0


# flag -> (runner, help). The speed benchmark runs when no mode flag is given.
MODES = {
    "accuracy": (_accuracy, "run the accuracy study (accuracy vs speedup of every pruning style) instead"),
    "models": (_models, "time complete models end to end instead (a Llama-shaped decoder: prefill and decode "
                        "tokens/s; ResNet-50: images/s), dense vs every style; optionally which models, "
                        "comma-separated (llama, resnet50; default both)"),
}
# Mode flags that take a value (argparse keywords); the others are plain switches.
MODE_ARGS = {
    "models": dict(nargs="?", const=["llama", "resnet50"], default=None, type=_model_names, metavar="MODELS"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparseprune", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time dense vs each sparsity pattern on this device (or another mode)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--out", default=None,
                   help="results folder (created; default benchmarks/results/<machine label>/)")
    b.add_argument("--quick", action="store_true", help="a subset that finishes in about a minute on 2 CPU cores")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--no-progress", action="store_true",
                   help="a log line per configuration instead of the progress bar (the default when stderr is "
                        "not a terminal)")
    modes = b.add_mutually_exclusive_group()
    for name, (_, help_text) in MODES.items():
        modes.add_argument(f"--{name}", help=help_text, **MODE_ARGS.get(name, dict(action="store_true")))
    _add_speed_options(b)
    _add_models_options(b)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    import torch

    from .bench import machine

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or machine.default_results_dir(args.device)
    for name, (runner, _) in MODES.items():
        if getattr(args, name):
            return runner(args, out)
    return _speed(args, out)


if __name__ == "__main__":
    sys.exit(main())
