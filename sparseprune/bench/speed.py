"""``sparseprune bench``: what each pruning style buys on the device at hand.

Times dense ``F.linear`` against our sparse layers (2:4, block, hybrid) and against PyTorch's own
sparse paths (BSR for blocks, CSR for unstructured), on realistic linear shapes and batch sizes,
interleaved in one run. Every sparse result is checked against the masked dense product before
it is timed: a fast wrong answer is never reported.
"""

from __future__ import annotations

import csv
import datetime
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._device import device_name
from ..convert import pack
from ..modules import SparseLinear
from ..prune.masks import make_mask
from ..prune.patterns import parse_pattern
from .timing import compare

SHAPES = {  # label: (out_features, in_features)
    "llama 4096x4096": (4096, 4096),
    "llama-up 11008x4096": (11008, 4096),
    "llama-down 4096x11008": (4096, 11008),
    "bert 768x768": (768, 768),
    "bert-up 3072x768": (3072, 768),
    "bert-down 768x3072": (768, 3072),
}
QUICK_SHAPES = ["llama 4096x4096", "bert-up 3072x768"]
BATCHES = [1, 4, 16, 64, 128, 512]
QUICK_BATCHES = [1, 16, 128]


@dataclass(frozen=True)
class Case:
    label: str
    impl: str  # "ours", "torch-bsr", "torch-csr"
    pattern: str
    sparsity: float | None  # pattern parameter (fraction of blocks for block/hybrid)
    overall: float  # fraction of weights that are zero


CASES = [
    Case("2:4", "ours", "2:4", None, 0.5),
    Case("block32 50%", "ours", "block", 0.5, 0.5),
    Case("block32 75%", "ours", "block", 0.75, 0.75),
    Case("block32 90%", "ours", "block", 0.9, 0.9),
    Case("hybrid 75%", "ours", "hybrid", 0.5, 0.75),
    Case("hybrid 87.5%", "ours", "hybrid", 0.75, 0.875),
    Case("torch-bsr32 50%", "torch-bsr", "block", 0.5, 0.5),
    Case("torch-bsr32 90%", "torch-bsr", "block", 0.9, 0.9),
    Case("torch-csr 50%", "torch-csr", "unstructured", 0.5, 0.5),
    Case("torch-csr 90%", "torch-csr", "unstructured", 0.9, 0.9),
]
QUICK_CASES = ["2:4", "block32 90%", "hybrid 87.5%", "torch-bsr32 90%", "torch-csr 90%"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    scale = max(want.float().abs().max().item(), 1.0) if want.numel() else 1.0
    if not err <= TOL[want.dtype] * scale * 4:
        raise RuntimeError(f"{what}: wrong result (max error {err:.3g} at scale {scale:.3g}); refusing to time it")


def _sparse_fn(case: Case, w: torch.Tensor, x: torch.Tensor, backend: str):
    """(callable, masked dense weight, backend label, bytes ratio) or None when unsupported."""
    pat = parse_pattern(case.pattern, sparsity=case.sparsity, block_size=(32, 32))
    mask = make_mask(w.abs().float(), pat, case.sparsity)
    wm = w * mask
    if case.impl == "ours":
        mod = SparseLinear(pack(wm, pat, mask), None, backend=backend)
        return (lambda: mod(x)), wm, mod.backend, mod.packed_weight().nbytes / (w.numel() * w.element_size())
    xt = x.t().contiguous()  # PyTorch's sparse @ dense wants the tokens as columns
    try:
        ws = wm.to_sparse_bsr((32, 32)) if case.impl == "torch-bsr" else wm.to_sparse_csr()
        torch.mm(ws, xt[:, :1])
    except (RuntimeError, NotImplementedError):
        return None
    return (lambda: torch.mm(ws, xt)), wm, "torch", float("nan")


def run(out_dir: str, *, quick: bool = False, device: str = "cpu", dtype: str = "fp32", backend: str = "auto",
        shapes=None, batches=None, cases=None, budget_s: float | None = None, progress: bool = True) -> list[dict]:
    """Runs the speed benchmark, prints a table, writes ``speed.csv`` and ``speed.png`` to out_dir."""
    dev = torch.device(device)
    dt = DTYPES[dtype]
    shapes = shapes or (QUICK_SHAPES if quick else list(SHAPES))
    batches = batches or (QUICK_BATCHES if quick else BATCHES)
    case_list = [c for c in CASES if c.label in (cases or (QUICK_CASES if quick else [c.label for c in CASES]))]
    budget = budget_s if budget_s is not None else (0.25 if quick else 1.0)
    rows: list[dict] = []
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    meta = {"date": stamp, "device": device_name(dev), "torch": torch.__version__,
            "threads": torch.get_num_threads() if dev.type == "cpu" else "", "dtype": dtype}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(shapes) * len(case_list) * len(batches)
    bar = tqdm(total=total, desc="sparseprune bench", disable=not progress or tqdm is None, unit="cfg") if tqdm else None
    with torch.inference_mode():
        for shape_label in shapes:
            n, k = SHAPES[shape_label]
            w = torch.randn(n, k, device=dev, dtype=torch.float32).to(dt)
            for case in case_list:
                for b in batches:
                    x = torch.randn(b, k, device=dev, dtype=torch.float32).to(dt)
                    made = _sparse_fn(case, w, x, backend)
                    if bar is not None:
                        bar.update(1)
                    if made is None:
                        continue
                    fn, wm, used, bytes_ratio = made
                    want = F.linear(x, wm)
                    got = fn()
                    _check(got.t() if case.impl != "ours" else got, want, f"{case.label} {shape_label} batch {b}")
                    res = compare(lambda: F.linear(x, w), {"s": fn}, dev, budget_s=budget)["s"]
                    rows.append({**meta, "shape": shape_label, "out_features": n, "in_features": k, "batch": b,
                                 "pattern": case.label, "impl": case.impl, "sparsity": case.overall,
                                 "backend": used, "bytes_ratio": round(bytes_ratio, 4),
                                 "ms_dense": round(res["base_s"] * 1e3, 4), "ms_sparse": round(res["s"] * 1e3, 4),
                                 "speedup": round(res["speedup"], 3), "rounds": res["rounds"]})
    if bar is not None:
        bar.close()
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "speed.csv"))
    print(format_table(rows))
    try:
        plot(rows, os.path.join(out_dir, "speed.png"))
    except ImportError:
        print("matplotlib not installed: skipped speed.png")
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    if not rows:
        return
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            wr.writeheader()
        wr.writerows(rows)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)"
    batches = sorted({r["batch"] for r in rows})
    head = f"{rows[0]['device']} | torch {rows[0]['torch']} | {rows[0]['dtype']} | threads {rows[0]['threads']}"
    lines = [head, "speedup over dense F.linear (higher is better; median of interleaved ratios)",
             f"{'shape':24s} {'pattern':18s} {'backend':8s} " + " ".join(f"{'b=' + str(b):>8s}" for b in batches)]
    keys = []
    for r in rows:
        key = (r["shape"], r["pattern"], r["backend"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        by_b = {r["batch"]: r["speedup"] for r in rows if (r["shape"], r["pattern"], r["backend"]) == key}
        lines.append(f"{key[0]:24s} {key[1]:18s} {key[2]:8s} " +
                     " ".join(f"{by_b[b]:8.2f}" if b in by_b else f"{'-':>8s}" for b in batches))
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cols = min(3, len(shapes))
    nrows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        sub = [r for r in rows if r["shape"] == shape]
        for pattern in dict.fromkeys(r["pattern"] for r in sub):
            pts = sorted((r["batch"], r["speedup"]) for r in sub if r["pattern"] == pattern)
            style = "--" if not pattern[0].isdigit() and pattern.startswith("torch") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=pattern)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("batch (tokens)")
        ax.set_ylabel("speedup vs dense")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"sparseprune on {rows[0]['device']} ({rows[0]['dtype']}, torch {rows[0]['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
