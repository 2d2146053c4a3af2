"""``sparseprune bench``: what each pruning style buys on the device at hand, hot and cold.

Times dense ``F.linear`` against our sparse layers (2:4, block, hybrid) and against PyTorch's own
sparse paths (BSR for blocks, CSR for unstructured), on realistic linear shapes and batch sizes,
interleaved in one run (median over rounds of dense time / sparse time).

What keeps it honest:

* **Explicit backends.** "ours" rows run our kernels with the backend named (``cpu`` on CPU; on
  CUDA each of ``cuda`` and ``triton`` that can run the layer), never ``"auto"``, which may route a
  batch to dense and would print ~1.00 under our name. ``backend="auto"`` is its own row, labelled
  ``auto``, with the backend it picked for that batch in the CSV (``backend_used``).
* **Hot and cold weights.** Hot: one weight, called again and again (it stays in the last-level
  cache when it fits). Cold: dense and sparse each rotate through the same number of distinct copies
  of the layer, sized from the last-level cache read from sysfs/lscpu (see ``timing.cold_copies``),
  so every call streams its weight from memory, as a real decode does. Both are reported.
* **Checked before timed.** Every copy of every variant is compared with the masked dense product
  at every batch size before it is timed; a wrong result stops the run (a fast wrong answer is
  never reported).
* **The machine is named.** Every CSV row carries the CPU model, family/model, ISA level in use,
  cores and threads, load average before and after, versions, hot/cold, dtype and date
  (``machine.run_metadata``), and a JSON file beside the CSV holds the same plus the grid run.

Outputs in ``out_dir`` (default ``benchmarks/results/<machine label>/``): ``speed-<dtype>.csv``,
``.txt`` (tables), ``.json`` (metadata) and ``.png``; ``--quick`` writes ``speed-<dtype>-quick.*``.
"""

from __future__ import annotations

import copy
import csv
import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import autotune
from .. import backends as _backends
from ..convert import pack
from ..modules import SparseLinear
from ..prune.masks import make_mask
from ..prune.patterns import parse_pattern
from . import machine
from .timing import COLD_FACTOR, COLD_MIN_BYTES, Rotation, cold_copies, compare

SHAPES = {  # label: (out_features, in_features)
    "llama 4096x4096": (4096, 4096),
    "llama-up 11008x4096": (11008, 4096),
    "llama-down 4096x11008": (4096, 11008),
    "bert 768x768": (768, 768),
    "bert-up 3072x768": (3072, 768),
    "bert-down 768x3072": (768, 3072),
}
QUICK_SHAPES = ["llama 4096x4096", "bert-up 3072x768"]
# Hot: the whole batch range. Cold: weights from DRAM matter while the weight read dominates (small
# batches); at 512 tokens the kernels are compute-bound and the hot figure says the same.
BATCHES = {"hot": [1, 4, 16, 64, 128, 512], "cold": [1, 16, 128]}
QUICK_BATCHES = {"hot": [1, 16, 128], "cold": [1, 16]}
WEIGHTS = ("hot", "cold")


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
# The full run (hot and cold, fp32 and bf16, about 20 minutes on 2 cores) leaves out, to fit:
# PyTorch's 50% BSR/CSR (0.06-2.1x of dense in the committed Zen 4 run, a third of its time), and
# block 50% and hybrid 75% (between 2:4 and block 75% in density, and the weakest in accuracy).
# `--cases` still runs any of them.
TRIMMED_CASES = ("torch-bsr32 50%", "torch-csr 50%", "block32 50%", "hybrid 75%")
DEFAULT_CASES = [c.label for c in CASES if c.label not in TRIMMED_CASES]
QUICK_CASES = ["2:4", "block32 90%", "hybrid 87.5%", "torch-bsr32 90%", "torch-csr 90%"]
# backend="auto" rows where auto has a real choice to make: 2:4 and hybrid 87.5% are the patterns
# that lose to dense somewhere (bf16 at batch >= 16 on AMX Xeons); block 90% never did. Each auto
# layer measures itself once per shape and dtype (up to ~30 s on a big bf16 layer without native
# bf16), so the full run keeps to these two; `auto_cases=` picks others.
AUTO_CASES = ["2:4", "hybrid 87.5%"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Accepted error against an fp32 product of the same (rounded) inputs, as a fraction of the output's
# largest magnitude: two roundings of the output dtype plus a floor (bf16: 2.4%; our kernels were
# seen at 0.2-0.4% on 4096x11008). Loose enough for any summation order; tight enough that a
# dropped block (~6% of that scale at 50% block sparsity, 4096 inputs), a wrong 2:4 position or an
# unwritten (NaN-poisoned) output fails.
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def tolerance(dtype: torch.dtype) -> float:
    return 2 * torch.finfo(dtype).eps + FLOOR[dtype]


def resolve_shapes(shapes) -> list[tuple[str, int, int]]:
    """Labels from SHAPES or ``"NxK"`` strings (out x in) -> [(label, N, K)]."""
    out = []
    for s in shapes:
        if s in SHAPES:
            out.append((s, *SHAPES[s]))
        elif m := re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", s):
            out.append((f"{m.group(1)}x{m.group(2)}", int(m.group(1)), int(m.group(2))))
        else:
            raise ValueError(f"unknown shape {s!r}: use one of {list(SHAPES)} or 'NxK' (out x in)")
    return out


def resolve_cases(labels) -> list[Case]:
    by = {c.label: c for c in CASES}
    bad = [s for s in labels if s not in by]
    if bad:
        raise ValueError(f"unknown case(s) {bad}; known: {list(by)}")
    return [by[s] for s in labels]


def explicit_backends(device) -> list[str]:
    """The sparse backends 'auto' would consider on this device (cpu; cuda, triton), each a row."""
    return list(_backends.AUTO_ORDER.get(torch.device(device).type, []))


def check_result(got: torch.Tensor, want32: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """Raises unless ``got`` matches ``want32`` (the masked product in fp32) within ``tolerance(dtype)``
    of the output scale; returns the max error relative to that scale."""
    if got.shape != want32.shape:
        raise RuntimeError(f"{what}: output shape {tuple(got.shape)}, expected {tuple(want32.shape)}; refusing to time it")
    if not want32.numel():
        return 0.0
    scale = max(want32.abs().max().item(), 1e-30)
    rel = (got.float() - want32).abs().max().item() / scale
    if not rel <= tolerance(dtype):  # also catches NaN (unwritten outputs under SPARSEPRUNE_POISON)
        raise RuntimeError(f"{what}: wrong result (max error {rel:.3g} of the output scale {scale:.3g}, allowed "
                           f"{tolerance(dtype):.3g}); refusing to time it")
    return rel


@dataclass
class Variant:
    """One row kind of a case: our layer on a named backend, the auto layer, or PyTorch's sparse tensor."""
    row: str  # "cpu" / "cuda" / "triton" (ours, backend named), "auto", "torch"
    impl: str  # "ours", "auto", "torch-bsr", "torch-csr"
    copies: list = field(default_factory=list)  # distinct weights (modules or sparse tensors)
    nbytes: int = 0  # bytes of one copy

    def call(self, i: int, x: torch.Tensor, xt: torch.Tensor):
        c = self.copies[i]
        return (lambda: torch.mm(c, xt)) if self.impl.startswith("torch") else (lambda: c(x))

    def output(self, i: int, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        y = self.call(i, x, xt)()
        return y.t() if self.impl.startswith("torch") else y

    def copy_bytes(self) -> int:
        """Bytes of one copy: everything its forward may read (auto: packed + any dense copy)."""
        c = self.copies[0]
        if isinstance(c, torch.nn.Module):
            return sum(t.nbytes for t in list(c.buffers()) + list(c.parameters()))
        return c.values().nbytes + c.crow_indices().nbytes + c.col_indices().nbytes  # BSR / CSR

    def used(self, batch: int) -> str:
        """The backend that ran this batch: for auto, the bucket's choice."""
        if self.impl != "auto":
            return self.row if self.impl == "ours" else "torch"
        mod = self.copies[0]
        if mod.auto_plan:
            return mod.auto_plan.get(autotune.BUCKET_LABELS[autotune.bucket_of(batch)], mod.backend)
        return mod.backend


def _clone_module(mod: SparseLinear) -> SparseLinear:
    """A copy with its own tensors (packed weight, and auto's dense copy if it keeps one) that shares
    the stateless backend objects, so it needs neither re-validation nor re-tuning."""
    names = {mod.backend, "dense", *(mod.auto_plan or {}).values()}
    memo = {id(b): b for b in (_backends.get_backend(n) for n in names)}
    return copy.deepcopy(mod, memo)


def build_variants(case: Case, w: torch.Tensor, backends: list[str], with_auto: bool) -> tuple[list[Variant], torch.Tensor]:
    """(variants with one copy each, masked dense weight). Unsupported combinations are left out."""
    pat = parse_pattern(case.pattern, sparsity=case.sparsity, block_size=(32, 32))
    mask = make_mask(w.abs().float(), pat, case.sparsity)
    wm = w * mask
    out: list[Variant] = []
    if case.impl == "ours":
        packed = pack(wm, pat, mask)
        for b in backends + (["auto"] if with_auto else []):
            if b != "auto" and _backends.get_backend(b).unsupported_reason(packed, w.device) is not None:
                continue
            mod = SparseLinear(packed, None, backend=b)
            if out:  # each variant its own tensors, or a cold round would read one of them hot
                mod = _clone_module(mod)
            out.append(Variant(b, "ours" if b != "auto" else "auto", [mod]))
        return out, wm
    try:
        ws = wm.to_sparse_bsr((32, 32)) if case.impl == "torch-bsr" else wm.to_sparse_csr()
        torch.mm(ws, wm[:1].t().contiguous())  # this dtype/device may have no kernel
    except (RuntimeError, NotImplementedError):
        return [], wm
    out.append(Variant("torch", case.impl, [ws]))
    return out, wm


def add_copies(v: Variant, n: int) -> None:
    while len(v.copies) < n:
        c = v.copies[0]
        v.copies.append(_clone_module(c) if isinstance(c, torch.nn.Module) else c.clone())


@dataclass
class Prepared:
    """One (shape, case): the dense weight's copies, the variants' copies, the masked reference."""
    case: Case
    shape: str
    dense: list  # distinct dense weights (the first is the original)
    variants: list
    wm: torch.Tensor  # masked dense weight: what every variant must compute
    copies: int  # copies per rotation in cold mode (1 when only hot is run)
    note: str = ""

    @property
    def round_bytes(self) -> int:
        """Bytes one round touches: one copy of the dense weight and of every variant."""
        return self.dense[0].nbytes + sum(v.nbytes for v in self.variants)


def prepare_case(case: Case, shape: str, w: torch.Tensor, dense: list, backends: list[str], with_auto: bool, *,
                 cold: bool, llc_bytes: int, cold_max_bytes: int | None = None) -> Prepared | None:
    """Builds the variants of ``case`` for weight ``w`` and, for cold runs, enough distinct copies of
    them and of the dense weight (``dense`` grows in place) that a rotation streams more than the
    cache; None when nothing can run the case here."""
    variants, wm = build_variants(case, w, backends, with_auto)
    if not variants:
        return None
    # one call each first: "auto" measures here, and may keep a dense copy (its bytes count)
    x1 = torch.randn(1, w.shape[1], device=w.device, dtype=torch.float32).to(w.dtype)
    for v in variants:
        v.output(0, x1, x1.t().contiguous())
        v.nbytes = v.copy_bytes()
    prep = Prepared(case, shape, dense, variants, wm, 1)
    if cold:
        prep.copies, prep.note = cold_copies(prep.round_bytes, llc_bytes,
                                             **({"max_bytes": cold_max_bytes} if cold_max_bytes else {}))
        while len(dense) < prep.copies:
            dense.append(w.clone())
        for v in variants:
            add_copies(v, prep.copies)
    return prep


def measure_batch(prep: Prepared, b: int, modes: list[str], budget_s: float) -> list[dict]:
    """Checks every copy that ``modes`` will time at batch ``b`` (raising on a wrong result, before
    any timing), then times each mode; returns one row per (mode, variant)."""
    w = prep.dense[0]
    n, k = w.shape
    x = torch.randn(b, k, device=w.device, dtype=torch.float32).to(w.dtype)
    xt = x.t().contiguous()  # PyTorch's sparse @ dense wants the tokens as columns
    want32 = F.linear(x.float(), prep.wm.float())
    ncheck = prep.copies if "cold" in modes else 1
    errs = {v.row: max(check_result(v.output(i, x, xt), want32, w.dtype,
                                    f"{prep.case.label} [{v.row}] {prep.shape} batch {b} copy {i}")
                       for i in range(ncheck)) for v in prep.variants}
    rows = []
    for mode in modes:
        copies = prep.copies if mode == "cold" else 1
        base = Rotation([(lambda wi=wi: F.linear(x, wi)) for wi in prep.dense[:copies]])
        cands = {v.row: Rotation([v.call(i, x, xt) for i in range(copies)]) for v in prep.variants}
        # warmup=1: the check above already ran every sparse copy once at this batch
        res = compare(base, cands, w.device, budget_s=budget_s, warmup=1)
        load = machine.loadavg()[0]
        for v in prep.variants:
            r = res[v.row]
            rows.append({
                "weights": mode, "shape": prep.shape, "out_features": n, "in_features": k, "batch": b,
                "pattern": prep.case.label, "impl": v.impl, "backend": v.row, "backend_used": v.used(b),
                "sparsity": prep.case.overall, "bytes_ratio": round(v.nbytes / w.nbytes, 4), "copies": copies,
                "rotation_mb": round(copies * prep.round_bytes / 2**20, 1),
                "ms_dense": round(r["base_s"] * 1e3, 4), "ms_sparse": round(r["s"] * 1e3, 4),
                "speedup": round(r["speedup"], 3), "ms_dense_min": round(r["base_min_s"] * 1e3, 4),
                "ms_sparse_min": round(r["min_s"] * 1e3, 4), "speedup_best": round(r["speedup_best"], 3),
                "rounds": r["rounds"], "max_rel_err": f"{errs[v.row]:.2e}", "load_1m": load})
    return rows


def run(out_dir: str | None = None, *, quick: bool = False, device: str = "cpu", dtype: str = "fp32",
        weights=WEIGHTS, shapes=None, batches=None, cold_batches=None, cases=None, backends=None,
        auto_cases=None, budget_s: float | None = None, llc_bytes: int | None = None,
        cold_max_bytes: int | None = None, progress: bool = True) -> list[dict]:
    """Runs the speed benchmark; prints the tables and writes speed-<dtype>[-quick].{csv,txt,json,png}.

    ``llc_bytes`` overrides the cache size read from the machine (for a VM whose reported L3 is
    not what it gets); ``cold_max_bytes`` caps the memory of the cold copies.
    """
    dev = torch.device(device)
    dt = DTYPES[dtype]
    weights = tuple(weights)
    if not weights or any(m not in WEIGHTS for m in weights):
        raise ValueError(f"weights must be a non-empty subset of {WEIGHTS}, got {weights}")
    shape_list = resolve_shapes(shapes or (QUICK_SHAPES if quick else list(SHAPES)))
    grid = QUICK_BATCHES if quick else BATCHES
    batch_for = {"hot": list(batches or grid["hot"]),
                 "cold": list(cold_batches or batches or grid["cold"])}
    all_batches = sorted({b for m in weights for b in batch_for[m]})
    case_list = resolve_cases(cases or (QUICK_CASES if quick else DEFAULT_CASES))
    backends = list(backends) if backends else explicit_backends(dev)
    auto_cases = [c.label for c in resolve_cases(AUTO_CASES if auto_cases is None else auto_cases)]
    budget = budget_s if budget_s is not None else (0.25 if quick else 0.8)
    out_dir = out_dir or machine.default_results_dir(dev)
    stem = f"speed-{dtype}" + ("-quick" if quick else "")
    meta = machine.run_metadata(dev, dtype=dtype)
    llc, llc_src = (llc_bytes, "given") if llc_bytes else (meta["llc_bytes"], meta["llc_source"])
    meta.update(llc_bytes=llc, llc_source=llc_src)
    print(machine.describe(meta), flush=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    cold_notes: list[str] = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(shape_list) * len(case_list) * sum(len(batch_for[m]) for m in weights)
    bar = tqdm(total=total, desc="sparseprune bench", unit="cfg") if tqdm and progress else None
    with torch.inference_mode():
        for shape_label, n, k in shape_list:
            w = torch.randn(n, k, device=dev, dtype=torch.float32).to(dt)
            dense = [w]  # dense copies, shared by the cases of this shape
            for case in case_list:
                prep = prepare_case(case, shape_label, w, dense, backends, case.label in auto_cases,
                                    cold="cold" in weights, llc_bytes=llc, cold_max_bytes=cold_max_bytes)
                if prep is None:
                    print(f"  {case.label}: no kernel for {dtype} on {dev.type} here, skipped", flush=True)
                    if bar is not None:
                        bar.update(sum(len(batch_for[m]) for m in weights))
                    continue
                if prep.note:
                    cold_notes.append(f"{shape_label} {case.label}: {prep.note}")
                for b in all_batches:
                    modes = [m for m in weights if b in batch_for[m]]
                    got = measure_batch(prep, b, modes, budget)
                    rows += [{**meta, **r} for r in got]
                    if bar is not None:
                        bar.update(len(modes))
                    if bar is None or not progress:  # a log line per configuration instead of the bar
                        print(f"  [{time.perf_counter() - t0:6.0f} s] {shape_label} {case.label} b={b}: " + ", ".join(
                            f"{r['weights']} {r['backend']} {r['speedup']:.2f}x" for r in got), flush=True)
                del prep
            del dense, w
    if bar is not None:
        bar.close()
    meta = machine.finish(meta)
    for r in rows:
        r["loadavg_after"] = meta["loadavg_after"]
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, stem + ".csv"))
    table = format_table(rows, meta)
    with open(os.path.join(out_dir, stem + ".txt"), "w") as f:
        f.write(table + "\n")
    machine.write_metadata(
        os.path.join(out_dir, stem + ".json"), meta, duration_s=round(time.perf_counter() - t0, 1),
        grid={"quick": quick, "weights": list(weights), "shapes": [s[0] for s in shape_list],
              "cases": [c.label for c in case_list], "batches": {m: batch_for[m] for m in weights},
              "backends": backends, "auto_cases": auto_cases, "budget_s": budget},
        cold={"llc_bytes": llc, "llc_source": llc_src, "notes": cold_notes} if "cold" in weights else None)
    print(table)
    try:
        plot(rows, os.path.join(out_dir, stem + ".png"))
    except ImportError:
        print("matplotlib not installed: skipped the plot")
    print(f"took {time.perf_counter() - t0:.0f} s; wrote {out_dir}/{stem}.csv, .txt, .json, .png", flush=True)
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    """Writes the rows (overwriting): one run per file, so a file never mixes machines or runs."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


def _row_label(r: dict) -> str:
    return {"ours": f"ours[{r['backend']}]", "auto": "auto"}.get(r["impl"], "torch")


def format_table(rows: list[dict], meta: dict | None = None) -> str:
    """One table per weights mode (hot, cold): speedup per batch size, rows per pattern and backend."""
    if not rows:
        return "(no results)"
    meta = meta or rows[0]
    lines = [machine.describe(meta), f"dtype {meta['dtype']}; speedup over dense F.linear in the same dtype "
             "(higher is better; median of interleaved per-round ratios).",
             "ours[b]: our kernel on backend b, named explicitly. auto: backend='auto'; a 'd' after the figure "
             "means it ran that batch on dense."]
    for mode in WEIGHTS:
        sub = [r for r in rows if r["weights"] == mode]
        if not sub:
            continue
        batches = sorted({r["batch"] for r in sub})
        if mode == "hot":
            lines += ["", "HOT weights: one weight per layer, called again and again (cached when it fits the LLC)"]
        else:
            target = max(COLD_FACTOR * meta["llc_bytes"], COLD_MIN_BYTES) / 2**20
            lines += ["", f"COLD weights: dense and sparse each rotate through the same number of distinct copies, "
                          f"enough that >= {target:.0f} MiB (LLC {meta['llc_bytes'] / 2**20:.0f} MiB, "
                          f"{meta['llc_source']}) is streamed between two uses of one copy (copies per case: CSV/JSON)"]
        lines.append(f"{'shape':24s} {'pattern':16s} {'row':12s} " + " ".join(f"{'b=' + str(b):>8s}" for b in batches))
        keys = list(dict.fromkeys((r["shape"], r["pattern"], _row_label(r)) for r in sub))
        for key in keys:
            cells = {r["batch"]: r for r in sub if (r["shape"], r["pattern"], _row_label(r)) == key}
            lines.append(f"{key[0]:24s} {key[1]:16s} {key[2]:12s} " + " ".join(
                f"{cells[b]['speedup']:7.2f}" + ("d" if cells[b]["impl"] == "auto" and cells[b]["backend_used"] == "dense"
                                                else " ") if b in cells else f"{'-':>8s}" for b in batches))
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Speedup vs batch: one column per shape, a row of panels per weights mode (auto rows left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["impl"] != "auto"]
    if not rows:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    modes = [m for m in WEIGHTS if any(r["weights"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), len(shapes), figsize=(4.2 * len(shapes), 3.6 * len(modes)), squeeze=False)
    for mi, mode in enumerate(modes):
        for si, shape in enumerate(shapes):
            ax = axes[mi][si]
            sub = [r for r in rows if r["shape"] == shape and r["weights"] == mode]
            for key in dict.fromkeys((r["pattern"], _row_label(r)) for r in sub):
                pts = sorted((r["batch"], r["speedup"]) for r in sub if (r["pattern"], _row_label(r)) == key)
                style = "--" if key[1] == "torch" else "-"
                label = key[0] if key[1] == "torch" or key[1] == "ours[cpu]" else f"{key[0]} {key[1]}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{shape} ({mode})", fontsize=9)
            ax.set_xlabel("batch (tokens)")
            ax.set_ylabel("speedup vs dense")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"sparseprune on {machine.caption(rows[0])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
