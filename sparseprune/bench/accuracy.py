"""``sparseprune bench --accuracy``: what each pruning style costs in accuracy, next to its speedup.

Three models are trained inside the benchmark on data that ships with Python and scikit-learn
(nothing is downloaded):

* **lm**: a small Llama (``transformers.LlamaForCausalLM`` from a tiny config) trained on
  byte-level text: the source files of Python's standard library (held-out files for
  validation). Metric: validation perplexity per byte (lower is better). Models this small, trained
  for minutes, lack the outlier input features of billion-parameter LLMs, which is what makes
  magnitude pruning collapse there and Wanda shine (see ``benchmarks/wanda_diagnosis.py``); the
  targets are checked on both models and reported as they come out.
* **digits**: an MLP on scikit-learn's bundled 8x8 digits. Metric: test accuracy (%).
* **cnn**: a small CNN (three Conv-BN-ReLU, a max-pool, two Linear) on the same digits, so the
  convolutional styles (Conv2d 2:4/block/hybrid, channel pruning of conv filters) have a point.

For each pruning style (dense; unstructured 50%; 2:4 with magnitude / Wanda / SparseGPT, each
with and without channel permutation; 4:8; block 50% and 75%; hybrid; channel pruning at 25% and
50% of each group's channels/neurons/heads with magnitude / Wanda / FLAP / SparseGPT) the trained
model is copied, pruned with calibration data from the training split, evaluated, then converted
(packed in our formats, or shrunk for channel pruning) and evaluated again, and the converted
layers are timed against the dense ones on the inputs they see in the model (interleaved runs,
median of ratios; for channel pruning every layer whose shape changed, each on the input it sees
in its own model). Patterns without kernels (unstructured, 4:8) report speedup n/a. Writes
``accuracy.csv`` and ``accuracy.png``, and prints, per task, the style that loses least at
each speedup level.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sysconfig
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import prune as sp_prune
from ..convert import convert
from ..bench.models import digits_cnn
from ..modules import PackedModule
from . import machine
from .timing import compare


@dataclass(frozen=True)
class Style:
    label: str
    pattern: str
    method: str
    sparsity: float | None = None
    permute: bool = False
    block: int = 32

    @property
    def overall(self) -> float:
        if self.pattern == "dense":
            return 0.0
        if self.pattern == "hybrid":
            return (1 + self.sparsity) / 2
        if self.pattern == "channel":  # fraction of channels; a layer between two pruned groups loses more weights
            return self.sparsity
        if ":" in self.pattern:
            n, m = map(int, self.pattern.split(":"))
            return 1 - n / m
        return self.sparsity

    @property
    def has_kernels(self) -> bool:
        return self.pattern in ("2:4", "block", "hybrid", "channel")


METHODS = ("magnitude", "wanda", "sparsegpt")
STYLES: list[Style] = [Style("dense", "dense", "-")]
STYLES += [Style(f"unstructured 50% {m}", "unstructured", m, 0.5) for m in METHODS]
STYLES += [Style(f"2:4 {m}{' +perm' if p else ''}", "2:4", m, permute=p) for m in METHODS for p in (False, True)]
STYLES += [Style(f"4:8 {m}", "4:8", m) for m in METHODS]
STYLES += [Style(f"block32 50% {m}", "block", m, 0.5) for m in METHODS]
STYLES += [Style(f"block32 75% {m}", "block", m, 0.75) for m in METHODS]
STYLES += [Style(f"hybrid 75% {m}", "hybrid", m, 0.5) for m in METHODS]
STYLES += [Style("hybrid 75% sparsegpt +perm", "hybrid", "sparsegpt", 0.5, permute=True)]
CHANNEL_METHODS = ("magnitude", "wanda", "flap", "sparsegpt")
STYLES += [Style(f"channel {round(s * 100)}% {m}", "channel", m, s) for s in (0.25, 0.5) for m in CHANNEL_METHODS]


@dataclass
class Task:
    name: str
    model: nn.Module
    calibration: list
    evaluate: callable  # model -> metric value
    metric: str
    higher_is_better: bool
    include: str | list[str] | None
    timing_inputs: callable  # model -> {layer name: input tensor}, batch 1 and batch 64
    notes: dict = field(default_factory=dict)


# --- data -----------------------------------------------------------------------------------------

def stdlib_text(max_bytes: int, val_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 tensors: Python's stdlib source files, every ``val_every``-th file held out."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        with open(os.path.join(root, f), "rb") as fh:
            data = fh.read()
        (val if i % val_every == val_every - 1 else train).extend(data)
        if len(train) >= max_bytes and len(val) >= max_bytes // 8:
            break
    if len(train) < 100_000:
        raise RuntimeError(f"found only {len(train)} bytes of Python source under {root}")
    return (torch.frombuffer(bytearray(train[:max_bytes]), dtype=torch.uint8).long(),
            torch.frombuffer(bytearray(val[: max(max_bytes // 8, 200_000)]), dtype=torch.uint8).long())


def _windows(data: torch.Tensor, seq: int, count: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq - 1, (count,), generator=gen)
    return torch.stack([data[s:s + seq + 1] for s in starts.tolist()])


# --- the small language model -----------------------------------------------------------------------

@dataclass(frozen=True)
class LMSize:
    hidden: int
    inter: int
    layers: int
    steps: int
    batch: int
    train_bytes: int
    val_windows: int
    calib_batches: int  # of 8 windows each


LM_SIZES = {"quick": LMSize(128, 384, 4, 160, 16, 1_500_000, 48, 4),
            "full": LMSize(192, 512, 4, 1200, 24, 4_000_000, 128, 8)}


def _train_lm(model, train, seq, size: LMSize, gen, device, log, t0) -> None:
    """AdamW with linear warm-up and cosine decay, gradient clipping at 1. As in the usual LLM
    recipes only matrices are decayed: norm gains are free to grow (that is where outlier
    features show up in large models)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    free = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": free, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    steps = size.steps
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for step in range(steps):
        w = _windows(train, seq, size.batch, gen).to(device)
        logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  lm: step {step + 1}/{steps} train loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")


def build_lm_task(quick: bool, device: torch.device, seed: int = 0, log=print, cache_dir: str | None = None,
                  size: LMSize | None = None) -> Task:
    """Trains (or loads from ``cache_dir``, where it is saved after training) the small Llama."""
    import safetensors.torch
    import transformers

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    seq = 128
    size = size or LM_SIZES["quick" if quick else "full"]
    train, val = stdlib_text(size.train_bytes)
    cfg = transformers.LlamaConfig(hidden_size=size.hidden, intermediate_size=size.inter,
                                   num_hidden_layers=size.layers, num_attention_heads=4, num_key_value_heads=4,
                                   vocab_size=256, max_position_embeddings=seq, tie_word_embeddings=False,
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to(device)
    ckpt = None
    if cache_dir:
        ckpt = os.path.join(cache_dir, f"accuracy_lm_h{size.hidden}_i{size.inter}_l{size.layers}_s{size.steps}"
                                       f"_b{size.batch}_seed{seed}_v2.safetensors")
    t0 = time.perf_counter()
    trained = False
    if ckpt and os.path.exists(ckpt):
        model.load_state_dict(safetensors.torch.load_file(ckpt, device=str(device)))
        log(f"  lm: loaded the trained model from {ckpt} (delete it to retrain)")
    else:
        _train_lm(model, train, seq, size, gen, device, log, t0)
        trained = True
    model.eval()
    train_s = time.perf_counter() - t0
    if ckpt and trained:
        safetensors.torch.save_file(model.state_dict(), ckpt)
    val_w = _windows(val, seq, size.val_windows, torch.Generator().manual_seed(seed + 1)).to(device)
    cgen = torch.Generator().manual_seed(seed + 2)  # own stream: the same bytes whether trained or loaded
    calib = [_windows(train, seq, 8, cgen)[:, :-1].to(device) for _ in range(size.calib_batches)]

    @torch.no_grad()
    def evaluate(m) -> float:
        total, n = 0.0, 0
        for chunk in val_w.split(16):
            logits = m(input_ids=chunk[:, :-1]).logits.float()
            total += F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum").item()
            n += chunk[:, 1:].numel()
        return math.exp(total / n)

    def timing_inputs(m):
        return _capture_inputs(m, lambda mm: mm(input_ids=val_w[:1, :64]), ".layers.")

    return Task("lm", model, calib, evaluate, "ppl", False, "model.layers.*", timing_inputs,
                notes={"params": sum(p.numel() for p in model.parameters()), "train_s": train_s, "trained": trained,
                       "calibration": f"{len(calib) * 8} x {seq} bytes"})


# --- the digits MLP -----------------------------------------------------------------------------------

def digits_data(seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(test x, test y, train x, train y): scikit-learn's 8x8 digits scaled to [0, 1], a quarter held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm].to(device), y[perm].to(device)
    n_test = len(x) // 4
    return x[:n_test], y[:n_test], x[n_test:], y[n_test:]


def _train_classifier(model, xtr, ytr, epochs: int, seed: int, device, lr: float = 2e-3) -> float:
    """AdamW, batches of 64, ``epochs`` passes; returns the seconds it took."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=g).to(device)
        for idx in order.split(64):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


def build_digits_task(quick: bool, device: torch.device, seed: int = 0, log=print, cache_dir: str | None = None) -> Task:
    torch.manual_seed(seed)
    xt, yt, xtr, ytr = digits_data(seed, device)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    epochs = 60 if quick else 150
    train_s = _train_classifier(model, xtr, ytr, epochs, seed, device)

    @torch.no_grad()
    def evaluate(m) -> float:
        return 100.0 * (m(xt).argmax(-1) == yt).float().mean().item()

    calib = list(xtr[:512].split(128))
    log(f"  digits: trained {epochs} epochs in {train_s:.1f} s, test accuracy {evaluate(model):.2f}%")

    def timing_inputs(m):
        return _capture_inputs(m, lambda mm: mm(xt[:1]), "")

    return Task("digits", model, calib, evaluate, "acc%", True, None, timing_inputs,
                notes={"params": sum(p.numel() for p in model.parameters()), "train_s": train_s,
                       "calibration": "512 training images"})


# --- the digits CNN -----------------------------------------------------------------------------------

def build_cnn_task(quick: bool, device: torch.device, seed: int = 0, log=print, cache_dir: str | None = None) -> Task:
    """A small CNN (:func:`sparseprune.bench.models.digits_cnn`) on the 8x8 digits, channels-last."""
    torch.manual_seed(seed)
    xt, yt, xtr, ytr = digits_data(seed, device)
    as_images = lambda v: v.reshape(-1, 1, 8, 8).contiguous(memory_format=torch.channels_last)  # noqa: E731
    xt, xtr = as_images(xt), as_images(xtr)
    model = digits_cnn().to(device).to(memory_format=torch.channels_last)
    epochs = 8 if quick else 30
    train_s = _train_classifier(model, xtr, ytr, epochs, seed, device)

    @torch.no_grad()
    def evaluate(m) -> float:
        return 100.0 * (m(xt).argmax(-1) == yt).float().mean().item()

    calib = list(xtr[:512].split(128))
    log(f"  cnn: trained {epochs} epochs in {train_s:.1f} s, test accuracy {evaluate(model):.2f}%")

    def timing_inputs(m):
        return _capture_inputs(m, lambda mm: mm(xt[:1]), "")

    return Task("cnn", model, calib, evaluate, "acc%", True, None, timing_inputs,
                notes={"params": sum(p.numel() for p in model.parameters()), "train_s": train_s,
                       "calibration": "512 training images"})


# --- timing the same layers dense vs converted ----------------------------------------------------

def _capture_inputs(model: nn.Module, run, name_part: str) -> dict[str, torch.Tensor]:
    """{layer name: its input for one model call} for every Linear / Conv2d (dense or packed) whose
    name contains name_part: Linear inputs as rows [tokens, features], conv inputs as images."""
    seen, handles = {}, []

    def keep(name, x):
        x = x.detach()
        seen.setdefault(name, (x.reshape(-1, x.shape[-1]) if x.dim() != 4 else x).clone())

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d, PackedModule)) and name_part in name:
            handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: keep(name, a[0])))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return seen


def _rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` rows (tokens, or images for a conv) of ``x``, repeating its first when it has fewer."""
    fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    out = x[:1].expand(rows, *x.shape[1:]) if x.shape[0] < rows else x[:rows]
    return out.contiguous(memory_format=fmt)


def time_layers(dense: nn.Module, sparse: nn.Module, inputs: dict[str, torch.Tensor], device, rows: int,
                budget_s: float, sparse_inputs: dict[str, torch.Tensor] | None = None) -> float | None:
    """Median-of-ratios speedup of the converted layers over the same dense layers on ``rows`` rows
    (tokens, or images for convs). ``sparse_inputs``: channel pruning, where every layer whose shape
    changed is timed on the (narrower) input it sees in the shrunk model."""
    pairs = []
    for name, x in inputs.items():
        s, d = sparse.get_submodule(name), dense.get_submodule(name)
        if sparse_inputs is None:
            if not isinstance(s, PackedModule):
                continue
            xs = x
        else:
            if name not in sparse_inputs or s.weight.shape == d.weight.shape:
                continue
            xs = sparse_inputs[name]
        pairs.append((d, _rows(x, rows), s, _rows(xs, rows)))
    if not pairs:
        return None

    def run_dense():  # module calls on both sides, so both pay nn.Module.__call__
        for d, x, _, _ in pairs:
            d(x)

    def run_sparse():
        for _, _, s, x in pairs:
            s(x)

    with torch.no_grad():
        return compare(run_dense, {"sparse": run_sparse}, device, budget_s=budget_s)["sparse"]["speedup"]


# --- the study ------------------------------------------------------------------------------------------

def _kernel_backend(device: torch.device) -> str:
    """Time our sparse kernels themselves (``auto`` may pick a dense fallback where they lose)."""
    from .. import backends

    for name in backends.AUTO_ORDER.get(device.type, []):  # only this device's backends get imported
        try:
            if backends.get_backend(name).unavailable_reason(device) is None:
                return name
        except ValueError:
            continue
    return "auto"


def run_task(task: Task, device: torch.device, quick: bool, log=print, styles=None,
             timing_budget_s: float | None = None) -> list[dict]:
    rows = []
    dense_metric = task.evaluate(task.model)
    speed_cache: dict[tuple, tuple] = {}
    inputs = task.timing_inputs(task.model)
    backend = _kernel_backend(device)
    for st in STYLES if styles is None else styles:
        t0 = time.perf_counter()
        row = {"model": task.name, "style": st.label, "pattern": st.pattern, "method": st.method,
               "permute": st.permute, "sparsity": round(st.overall, 4), "metric": task.metric}
        if st.pattern == "dense":
            row.update(value=dense_metric, value_converted=dense_metric, speedup_b1=1.0, speedup_b64=1.0,
                       prune_s=0.0)
            rows.append(row)
            continue
        m = copy.deepcopy(task.model)
        kw = dict(method=st.method, include=task.include, permute=st.permute,
                  calibration=task.calibration if st.method != "magnitude" else None)
        if st.pattern in ("block", "hybrid", "unstructured"):
            kw.update(sparsity=st.sparsity, block_size=(st.block, st.block))
        if st.pattern == "channel":
            kw.update(sparsity=st.sparsity)
        rep = sp_prune(m, st.pattern, **kw)
        row["prune_s"] = round(time.perf_counter() - t0, 2)
        row["value"] = task.evaluate(m)
        row["layers_pruned"] = len(rep.converted)
        row["value_converted"] = None
        row["speedup_b1"] = row["speedup_b64"] = None
        if st.pattern == "channel":
            # convert() with no sparsity removes exactly what prune() zeroed: the shrunk model
            conv = convert(copy.deepcopy(m), "channel", include=task.include)
            row["value_converted"] = task.evaluate(conv)
            # speed depends on the shapes only (the same for every method at one per-group sparsity)
            key = ("channel", tuple((n, tuple(p.shape)) for n, p in conv.named_parameters()))
            if key not in speed_cache:
                shrunk_inputs = task.timing_inputs(conv)
                speed_cache[key] = tuple(time_layers(task.model, conv, inputs, device, r,
                                                     timing_budget_s or (0.3 if quick else 1.0),
                                                     sparse_inputs=shrunk_inputs) for r in (1, 64))
            row["speedup_b1"], row["speedup_b64"] = speed_cache[key]
        elif st.has_kernels:
            conv = convert(copy.deepcopy(m), st.pattern, sparsity=st.sparsity, block_size=(st.block, st.block),
                           include=task.include, backend=backend)
            row["value_converted"] = task.evaluate(conv)
            key = (st.pattern, st.sparsity, st.permute)
            if key not in speed_cache:
                # speed depends on the structure only, not on which weights were kept
                speed_cache[key] = tuple(time_layers(task.model, conv, inputs, device, r,
                                                                     timing_budget_s or (0.3 if quick else 1.0))
                                         for r in (1, 64))
            row["speedup_b1"], row["speedup_b64"] = speed_cache[key]
        rows.append(row)
        log(f"  {task.name}: {st.label:30s} {task.metric} {row['value']:.4g}  ({time.perf_counter() - t0:.1f} s)")
    return rows


def _find(rows, model, style):
    for r in rows:
        if r["model"] == model and r["style"] == style:
            return r
    return None


def check_targets(rows: list[dict], model: str = "lm") -> list[tuple[str, bool | None, str]]:
    """The issue's targets on ``model``: (target, met (None if not measurable), detail)."""
    d = _find(rows, model, "dense")
    if d is None:
        return []
    hib = d["metric"].startswith("acc")

    def loss_of(r):  # how much worse than dense (positive = worse)
        return (d["value"] - r["value"]) if hib else (r["value"] - d["value"])

    needed = ["2:4 magnitude"] + [f"2:4 {m}{p}" for m in METHODS for p in ("", " +perm")]
    if any(_find(rows, model, n) is None for n in needed):
        return []
    out = []
    mag = _find(rows, model, "2:4 magnitude")
    lost = loss_of(mag)
    for meth, need in (("sparsegpt", 2 / 3), ("wanda", 1 / 2)):
        r = _find(rows, model, f"2:4 {meth}")
        if lost <= 1e-9:
            out.append((f"2:4 {meth} recovers >= {need:.0%} of what magnitude loses", None,
                        "magnitude loses nothing here"))
            continue
        rec = (lost - loss_of(r)) / lost
        out.append((f"2:4 {meth} recovers >= {need:.0%} of what magnitude loses", rec >= need,
                    f"recovers {rec:.0%} ({d['metric']}: dense {d['value']:.4g}, magnitude {mag['value']:.4g}, "
                    f"{meth} {r['value']:.4g})"))
    for meth in METHODS:
        a, b = _find(rows, model, f"2:4 {meth}"), _find(rows, model, f"2:4 {meth} +perm")
        better = (b["value"] > a["value"]) if hib else (b["value"] < a["value"])
        out.append((f"permutation improves 2:4 {meth}", better, f"{a['value']:.4g} -> {b['value']:.4g}"))
    unstr = min((loss_of(r) for r in rows if r["model"] == model and r["pattern"] == "unstructured"))
    structured = [r for r in rows if r["model"] == model and r["pattern"] in ("2:4", "4:8", "block")
                  and abs(r["sparsity"] - 0.5) < 1e-6]
    best = min(structured, key=loss_of)
    out.append(("unstructured 50% is the ceiling for 50% structured styles", unstr <= loss_of(best) + 1e-12,
                f"best unstructured loses {unstr:.4g}, best structured ({best['style']}) loses {loss_of(best):.4g}"))
    return out


# --- output -----------------------------------------------------------------------------------------------

def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':7s} {'style':30s} {'sparsity':>8s} {'metric':>7s} {'pruned':>9s} {'converted':>9s} "
             f"{'speedup b1':>10s} {'b64':>6s}"]
    for r in rows:
        lines.append(f"{r['model']:7s} {r['style']:30s} {r['sparsity']:8.3f} {r['metric']:>7s} {r['value']:9.4g} "
                     f"{_fmt(r['value_converted'], '9.4g'):>9s} {_fmt(r['speedup_b1'], '9.2f'):>9s}x "
                     f"{_fmt(r['speedup_b64'], '5.2f'):>5s}x")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str, meta: dict) -> None:
    keys = ["model", "style", "pattern", "method", "permute", "sparsity", "metric", "value", "value_converted",
            "speedup_b1", "speedup_b64", "prune_s", "layers_pruned"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys + list(meta))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in keys}, **meta})


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=lambda m: m != "lm")
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    colors = {"magnitude": "tab:red", "wanda": "tab:blue", "sparsegpt": "tab:green", "flap": "tab:purple",
              "-": "black"}
    markers = {"dense": "*", "unstructured": "x", "2:4": "o", "4:8": "P", "block": "s", "hybrid": "D", "channel": "v"}
    for ax, model in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == model]
        for r in rs:
            x = r["speedup_b1"] if r["speedup_b1"] is not None else 0.0
            ax.scatter(x, r["value"], c=colors.get(r["method"], "gray"), marker=markers.get(r["pattern"], "o"),
                       s=70 if not r["permute"] else 110, edgecolors="k" if r["permute"] else None, alpha=0.85)
            ax.annotate(r["style"].replace(" magnitude", " mag").replace(" sparsegpt", " sgpt"), (x, r["value"]),
                        fontsize=6, xytext=(4, 2), textcoords="offset points")
        ax.axvline(1.0, color="gray", lw=0.5, ls="--")
        ax.set_xlabel("speedup of the converted layers at batch 1 (0 = no kernel)")
        ax.set_ylabel(rs[0]["metric"] + (" (higher is better)" if rs[0]["metric"].startswith("acc")
                                         else " (lower is better)"))
        if not rs[0]["metric"].startswith("acc"):
            ax.set_yscale("log")
        ax.set_title(f"{model}: accuracy vs speedup")
        for meth, c in colors.items():
            if meth != "-":
                ax.scatter([], [], c=c, label=meth)
        for pat, mk in markers.items():
            if pat != "dense":
                ax.scatter([], [], c="gray", marker=mk, label=pat)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def least_loss_at_speedup(rows: list[dict], model: str, levels=(1.0, 1.25, 1.5, 2.0, 3.0),
                          key: str = "speedup_b1") -> list[tuple[float, dict | None]]:
    """For each speedup level: the style of ``model`` with the best metric among those at least that
    fast (measured, converted; dense counts at 1.0), or None when no style is that fast."""
    rs = [r for r in rows if r["model"] == model and r.get(key) is not None]
    out = []
    for lv in levels:
        fast = [r for r in rs if r[key] >= lv and r["pattern"] != "dense" or (lv <= 1.0 and r["pattern"] == "dense")]
        if not fast:
            out.append((lv, None))
            continue
        hib = fast[0]["metric"].startswith("acc")
        val = lambda r: r["value_converted"] if r.get("value_converted") is not None else r["value"]  # noqa: E731
        out.append((lv, max(fast, key=val) if hib else min(fast, key=val)))
    return out


TASKS = {"lm": build_lm_task, "digits": build_digits_task, "cnn": build_cnn_task}


# Trained models are kept out of the results folders, which are committed (as bench_vllm.py does).
CACHE_DIR = os.path.join("build", "bench-cache")


def run(out_dir: str, quick: bool = False, device: str = "cpu", log=print, tasks=("lm", "digits", "cnn"),
        styles=None, cache_dir: str | None = CACHE_DIR) -> list[dict]:
    """Train the models, prune them every way, print the table; writes accuracy.csv, accuracy.png and
    accuracy.txt (the table, the least loss at each speedup and the targets, as printed).

    The trained LM is saved in ``cache_dir`` and reused by later runs with the same settings.
    """
    dev = torch.device(device)
    os.makedirs(out_dir, exist_ok=True)
    meta = machine.run_metadata(dev, quick=quick)  # the machine, and the load average as the run starts
    t0 = time.perf_counter()
    rows = []
    notes = {}
    for name in tasks:
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
        task = TASKS[name](quick, dev, log=log, cache_dir=cache_dir)
        notes[task.name] = task.notes
        rows += run_task(task, dev, quick, log=log, styles=styles)
        del task
    meta = machine.finish(meta)
    write_csv(rows, os.path.join(out_dir, "accuracy.csv"), meta)
    machine.write_metadata(os.path.join(out_dir, "accuracy.json"), meta, tasks=list(tasks))
    plot(rows, os.path.join(out_dir, "accuracy.png"))
    lines = [machine.describe(meta), format_table(rows)]
    say = lines.append  # the summary goes to accuracy.txt and to the terminal
    for name, n in notes.items():
        how = "loaded from the cache" if n.get("trained") is False else f"trained in {n['train_s']:.0f} s"
        say(f"{name}: {n['params']:,} parameters, {how}, calibration {n['calibration']}")
    for name in tasks:
        say(f"least loss at equal speedup ({name}, batch 1):")
        for lv, r in least_loss_at_speedup(rows, name):
            say(f"  >= {lv:.2f}x: " + ("no style is that fast" if r is None else
                                         f"{r['style']} ({r['metric']} {r['value']:.4g}, {r['speedup_b1']:.2f}x)"))
    for name in tasks:
        checks = check_targets(rows, name)
        if checks:
            say(f"targets ({name}):")
        for target, ok, detail in checks:
            say(f"  [{'met' if ok else 'n/a' if ok is None else 'NOT met'}] {target}: {detail}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "accuracy.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    print(f"accuracy study took {time.perf_counter() - t0:.0f} s; wrote {out_dir}/accuracy.csv, .png and .txt")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparseprune.bench.accuracy", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="default benchmarks/results/<machine label>/")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    run(args.out or machine.default_results_dir(args.device), quick=args.quick, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
