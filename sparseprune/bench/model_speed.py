"""``sparseprune bench --models``: complete models end to end, dense vs every pruning style.

Two models with random (seeded) weights, nothing downloaded, each timed whole on the device at hand:

* **llama**: ``transformers.LlamaForCausalLM`` from a config with realistic widths (hidden 2048,
  intermediate 5632, 4 layers, 16 query heads sharing 4 KV heads, vocab 8192 so that the linear
  layers of the blocks dominate). *Prefill*: tokens/s of one forward over a 1 x 256 prompt, as
  ``generate`` prefills (KV cache built, logits of the last position only). *Decode*: tokens/s of
  greedy ``generate`` at batch 1 and 8, counting the decode steps only (:func:`decode_seconds`).
  The LM head and the embeddings stay dense (``exclude=["lm_head"]``; an embedding is no GEMM).
* **resnet50**: :func:`sparseprune.bench.models.resnet50` (torchvision's layout, width 64) on
  224x224 channels-last images, eval mode: images/s at batch 1 and 32.

Styles, all pruned by magnitude (no calibration: with random weights accuracy is moot, and speed
depends on the structure only): 2:4; block 32x32 at 75% and 90% of the blocks (convs too: their
GEMM weights [out, kh*kw*in] are blocked like a Linear's); hybrid (32x32 blocks at 75%, 2:4 inside
the rest: 87.5% zeros, the layer benchmark's hybrid); channel pruning at 25% and 50% of every
group's units (MLP neurons, KV-head groups, conv filters). A kernel style has two rows: **ours**,
our kernels on the backend named (``backend="cpu"`` on CPU; never a dense fallback: the check
below verifies that every converted layer ran it), and **auto** (``backend="auto"``, which may
run a layer on dense where our kernel loses; its rows say how many layers ran a sparse kernel).
Channel rows are ordinary smaller dense modules running on PyTorch's own kernels.

What keeps it honest:

* **One style at a time.** Every variant is converted from a deep copy of the same dense model,
  checked, timed against the dense model and freed before the next style is built.
* **Interleaved.** Each round runs the dense model, then every row of the style
  (:func:`~sparseprune.bench.timing.compare`), so machine noise hits them alike; the speedup is
  the median over rounds of dense seconds / style seconds (and min/min as ``speedup_best``).
* **Checked before timed.** On the exact input shapes each metric times, every variant's output
  must equal the masked dense model's (``prune()`` of another copy of the dense model with the
  same arguments: the same masks) within :func:`allowed_error`; a wrong kernel stops the run
  instead of printing a fast row. NaN (an unwritten output) fails too.
* **Cold weights, stated.** The full Llama is ~860 MB in fp32 against a 32 MB L3, so each decode
  step streams its weights from memory as in serving; every row records the bytes of its model
  against the last-level cache, and ``weights`` is "cold" when they exceed twice the LLC.
* **The machine is named**: every row carries ``machine.run_metadata`` (CPU, ISA level, threads,
  load before/after, versions, dtype, date), like the layer benchmark.

Outputs in ``out_dir`` (default ``benchmarks/results/<machine label>/``): ``models-<dtype>.csv``,
``.txt`` (tables), ``.json`` (metadata, grid, per-variant conversion notes) and ``.png``
(speedup per style per model); ``--quick`` (small models, fewer rounds) writes
``models-<dtype>-quick.*``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import statistics
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..convert import convert
from ..modules import PackedModule
from ..prune import prune
from . import machine
from .models import resnet50
from .speed import DTYPES, explicit_backends, tolerance, write_csv
from .timing import COLD_FACTOR, compare

MODELS = ("llama", "resnet50")
BLOCK = (32, 32)


@dataclass(frozen=True)
class Style:
    label: str
    pattern: str  # convert()'s pattern
    sparsity: float | None  # convert()'s sparsity: fraction of blocks (block, hybrid) or of units (channel)
    overall: float  # fraction of a converted layer's weights that are zero (channel: of units removed)

    @property
    def kernels(self) -> bool:
        """Packed into our formats (2:4, block, hybrid), as opposed to shrunk dense modules (channel)."""
        return self.pattern != "channel"


STYLES = [
    Style("2:4", "2:4", None, 0.5),
    Style("block32 75%", "block", 0.75, 0.75),
    Style("block32 90%", "block", 0.9, 0.9),
    Style("hybrid 87.5%", "hybrid", 0.75, 0.875),
    Style("channel 25%", "channel", 0.25, 0.25),
    Style("channel 50%", "channel", 0.5, 0.5),
]


def resolve_styles(labels) -> list[Style]:
    by = {s.label: s for s in STYLES}
    labels = list(labels)
    bad = [s for s in labels if s not in by]
    if bad or not labels:
        raise ValueError(f"unknown style(s) {bad}; known: {list(by)}" if bad else "no styles given")
    return [by[s] for s in dict.fromkeys(labels)]


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    prefill_tokens: int  # prompt of the prefill row (batch 1)
    prompt_tokens: int  # prompt of each sequence in the decode rows
    new_tokens: int  # tokens generated per decode call; the first comes out of the prefill


@dataclass(frozen=True)
class ResNetSize:
    width: int  # 64 is torchvision's ResNet-50
    resolution: int


# Full: the shapes. Quick: every model, style and metric of the full run, small enough that
# the whole mode runs in well under a minute on 2 cores (and its weights fit a 32 MB L3: hot).
LLAMA_SIZES = {"full": LlamaSize(2048, 5632, 4, 16, 4, 8192, 256, 32, 16),
               "quick": LlamaSize(512, 1408, 2, 8, 2, 2048, 64, 8, 8)}
RESNET_SIZES = {"full": ResNetSize(64, 224), "quick": ResNetSize(32, 64)}
DECODE_BATCHES = [1, 8]
IMAGE_BATCHES = [1, 32]
# Rounds of each interleaved comparison (at least; calls shorter than the budget get more, up to it).
# A round of the full Llama's prefill is ~2-3 s on 2 cores, so rounds are what the run's length
# is made of: 5 keeps the full fp32 run within ~15 minutes there.
ROUNDS = {"full": 5, "quick": 3}
BUDGET_S = {"full": 3.0, "quick": 0.3}
# A variant's error against the masked model in fp32 may be this many times the error of the masked
# model itself run in the same dtype by PyTorch (bf16: rounding every activation dominates both),
# and never less than the layer benchmark's tolerance (fp32: ~1e-4 of the output's scale).
OWN_ERROR_FACTOR = 3.0


# --- decode timing --------------------------------------------------------------------------------

def decode_seconds(stamps: Sequence[float], new_tokens: int) -> float:
    """Seconds of the decode steps of one greedy ``generate`` call that made ``new_tokens`` tokens
    per sequence, from the clock read as each token came out (``stamps[i]``: token ``i + 1``).

    The first token comes out of the prefill forward over the whole prompt; each later one is a
    decode step (one token per sequence through the model, every weight read once, plus generate's
    own per-step work). ``stamps[-1] - stamps[0]`` is thus the time of ``new_tokens - 1`` decode
    steps: what ``t(n) - t(1)`` over two calls would estimate, read from one call, with neither
    the prefill nor generate's setup in it.
    """
    if new_tokens < 2:
        raise ValueError(f"decode timing needs at least 2 new tokens (the first comes from the prefill), "
                         f"got {new_tokens}")
    if len(stamps) != new_tokens:
        raise RuntimeError(f"generate produced {len(stamps)} tokens, expected {new_tokens}")
    if any(b < a for a, b in zip(stamps, stamps[1:])):
        raise RuntimeError("decode clock went backwards")
    seconds = stamps[-1] - stamps[0]
    if not seconds > 0:
        raise RuntimeError(f"decode steps took {seconds} s")
    return seconds


def decode_rate(batch: int, new_tokens: int, seconds: float) -> float:
    """Decode tokens/s: ``batch * (new_tokens - 1)`` tokens in ``seconds`` (from :func:`decode_seconds`)."""
    return batch * (new_tokens - 1) / seconds


def _decode_clock(device: torch.device):
    """A stopping criterion that never stops generation and reads the clock after every token."""
    from transformers import StoppingCriteria

    class DecodeClock(StoppingCriteria):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the token must exist before the clock is read
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return DecodeClock()


# --- the models and what is timed on them ---------------------------------------------------------

@dataclass
class Metric:
    name: str  # "prefill", "decode" (Llama), "images" (ResNet)
    batch: int
    seq: int  # prefill: prompt tokens; decode: new tokens per call; images: resolution
    items: int  # tokens or images a timed call counts
    unit: str
    call: Callable[[nn.Module], Callable[[], object]]  # model -> the timed function
    check: Callable[[nn.Module], torch.Tensor]  # model -> its output on the timed shapes (any dtype)
    self_timed: bool = False  # the timed function returns its own seconds (decode)

    @property
    def label(self) -> str:
        return {"prefill": f"prefill b{self.batch}x{self.seq}", "decode": f"decode b{self.batch}"}.get(
            self.name, f"b{self.batch}")


@dataclass
class ModelBench:
    name: str
    desc: str
    dense: nn.Module
    metrics: list[Metric]
    dtype: torch.dtype
    device: torch.device
    exclude: list[str] | None = None
    after_convert: Callable[[nn.Module], nn.Module] = lambda m: m
    info: dict = field(default_factory=dict)


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer: what a forward may read (auto's dense copies
    included)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(t.data_ptr(), t.nbytes)
    return sum(seen.values())


def count_layers(model: nn.Module) -> tuple[int, int]:
    """(GEMM layers: Linear, Conv2d and converted ones; converted ones: SparseLinear / SparseConv2d)."""
    mods = list(model.modules())
    packed = sum(isinstance(m, PackedModule) for m in mods)
    return packed + sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in mods), packed


def build_llama(size: LlamaSize, dtype: torch.dtype, device, batches: Sequence[int], seed: int = 0) -> ModelBench:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is in requirements-dev
        raise RuntimeError("the llama model needs transformers (pip install transformers)") from e
    if size.hidden % size.heads or size.heads % size.kv_heads:
        raise ValueError(f"hidden {size.hidden} must split into {size.heads} heads, and those into "
                         f"{size.kv_heads} KV groups")
    if size.new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (the first token comes from the prefill), got {size.new_tokens}")
    device = torch.device(device)
    cfg = transformers.LlamaConfig(
        hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, vocab_size=size.vocab,
        max_position_embeddings=max(size.prefill_tokens, size.prompt_tokens + size.new_tokens),
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    model.generation_config.pad_token_id = cfg.eos_token_id  # batch > 1 without the "setting pad" warning
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, size.vocab, (1, size.prefill_tokens), generator=gen).to(device)
    metrics = [Metric(
        "prefill", 1, size.prefill_tokens, size.prefill_tokens, "tokens/s",
        # as generate's prefill: the KV cache is built and only the last position's logits computed
        call=lambda m: (lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1)),
        check=lambda m: m(input_ids=ids).logits)]
    n = size.new_tokens
    for b in batches:
        prompt = torch.randint(0, size.vocab, (b, size.prompt_tokens), generator=gen).to(device)

        def call(m, prompt=prompt):
            from transformers import StoppingCriteriaList

            clock = _decode_clock(device)
            stop = StoppingCriteriaList([clock])
            mask = torch.ones_like(prompt)

            def run() -> float:
                clock.stamps.clear()
                # min_new_tokens = max_new_tokens: every sequence makes exactly n tokens (no early EOS)
                out = m.generate(input_ids=prompt, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, stopping_criteria=stop)
                if out.shape != (prompt.shape[0], prompt.shape[1] + n):
                    raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                                       f"{(prompt.shape[0], prompt.shape[1] + n)}")
                return decode_seconds(clock.stamps, n)
            return run

        # a decode step's layers see one token per sequence: check that very shape (the GEMV paths)
        metrics.append(Metric("decode", b, n, b * (n - 1), "tokens/s", call=call,
                              check=lambda m, prompt=prompt: m(input_ids=prompt[:, -1:]).logits, self_timed=True))
    desc = (f"LlamaForCausalLM hidden {size.hidden}, intermediate {size.intermediate}, {size.layers} layers, "
            f"{size.heads} heads / {size.kv_heads} KV heads, vocab {size.vocab}; prefill 1x{size.prefill_tokens}, "
            f"decode {size.prompt_tokens}-token prompts + {n} new tokens (greedy)")
    return ModelBench("llama", desc, model, metrics, dtype, device, exclude=["lm_head"], info={"size": asdict(size)})


def build_resnet50(size: ResNetSize, dtype: torch.dtype, device, batches: Sequence[int], seed: int = 0) -> ModelBench:
    device = torch.device(device)
    torch.manual_seed(seed)
    cl = torch.channels_last
    model = resnet50(width=size.width).eval()
    # No classifier bias: with random weights and most conv weights pruned, the features (and so the
    # logits' conv-dependent part) can be 100x smaller than a random bias, which would dilute the
    # relative error the check measures; without it the logits are a function of the convs alone.
    nn.init.zeros_(model.fc.bias)
    model = model.to(device=device, dtype=dtype).to(memory_format=cl)
    gen = torch.Generator().manual_seed(seed + 1)
    metrics = []
    for b in batches:
        x = torch.randn(b, 3, size.resolution, size.resolution, generator=gen).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=cl)
        metrics.append(Metric("images", b, size.resolution, b, "images/s", call=lambda m, x=x: (lambda: m(x)),
                              check=lambda m, x=x: m(x.to(_dtype_of(m)))))
    desc = f"ResNet-50 (torchvision layout) width {size.width}, {size.resolution}x{size.resolution} channels-last, eval"
    # channel pruning puts new (contiguous) conv weights in; channels-last again, as the dense model is
    return ModelBench("resnet50", desc, model, metrics, dtype, device,
                      after_convert=lambda m: m.to(memory_format=cl), info={"size": asdict(size)})


# --- variants, references, checks ----------------------------------------------------------------

@dataclass
class Variant:
    row: str  # backend named ("cpu", "cuda", "triton"), "auto", or "dense" (channel: smaller dense modules)
    impl: str  # "ours", "auto", "channel"
    model: nn.Module
    layers: int = 0
    packed: int = 0
    nbytes: int = 0
    skipped: dict = field(default_factory=dict)  # why convert() left layers dense: {reason: count}
    checks: dict = field(default_factory=dict)  # metric label -> (error, allowed, {backend: layers})


def _convert_args(bench: ModelBench, style: Style) -> dict:
    if style.kernels:
        return dict(sparsity=style.sparsity, block_size=BLOCK, exclude=bench.exclude, progress=False)
    return dict(sparsity=style.sparsity, exclude=bench.exclude, progress=False)


def build_variants(bench: ModelBench, style: Style, backends: Sequence[str]) -> list[Variant]:
    """The style's variants, each converted from its own deep copy of the dense model: one per
    backend named plus "auto" for a kernel style; one channel-pruned model otherwise. A backend
    that can run none of the layers here gives no row."""
    rows = ([(b, "ours") for b in backends] + [("auto", "auto")]) if style.kernels else [("dense", "channel")]
    out = []
    for row, impl in rows:
        m = copy.deepcopy(bench.dense)
        if style.kernels:
            convert(m, style.pattern, backend=row, **_convert_args(bench, style))
        else:
            convert(m, "channel", **_convert_args(bench, style))
        m = bench.after_convert(m).eval()
        layers, packed = count_layers(m)
        if style.kernels and packed == 0:
            continue
        skipped = Counter(lr.reason for lr in m.sparseprune_report.skipped) if style.kernels else Counter()
        out.append(Variant(row, impl, m, layers, packed, model_bytes(m), dict(skipped)))
    return out


def relative_error(got: torch.Tensor, want32: torch.Tensor, what: str) -> float:
    """max |got - want| / max |want| (NaN if ``got`` has NaNs); raises on a shape mismatch."""
    if got.shape != want32.shape:
        raise RuntimeError(f"{what}: output shape {tuple(got.shape)}, expected {tuple(want32.shape)}; "
                           f"refusing to time it")
    if not want32.numel():
        return 0.0
    scale = max(want32.abs().max().item(), 1e-30)
    return (got.float() - want32).abs().max().item() / scale


def allowed_error(dtype: torch.dtype, own_error: float) -> float:
    """What a variant may differ from the masked model in fp32: ``OWN_ERROR_FACTOR`` x the masked
    model's own error in ``dtype`` (PyTorch's dense ops), at least the layer benchmark's tolerance."""
    return max(OWN_ERROR_FACTOR * own_error, tolerance(dtype))


def reference_outputs(bench: ModelBench, style: Style) -> dict[str, tuple[torch.Tensor, float]]:
    """{metric label: (the masked dense model's output in fp32, its own relative error in the
    bench's dtype)}. The masked model is ``prune()`` of a copy of the dense model with the
    arguments convert() gets: the same masks (magnitude scores are deterministic)."""
    ref = copy.deepcopy(bench.dense)
    prune(ref, style.pattern, **_convert_args(bench, style))
    got = {m.label: m.check(ref) for m in bench.metrics}
    for label, out in got.items():
        if not out.abs().max().item() > 0:
            # magnitude pruning left no path through the network (a layer with fewer blocks than
            # 1 / (1 - sparsity) loses all of them): timing still runs every kernel, but the check
            # can then only catch a kernel that writes nonzero values
            warnings.warn(f"{bench.name} {style.label} {label}: the masked model's output is all zeros at this size; "
                          f"the check only catches kernels that write nonzero values", stacklevel=2)
    if bench.dtype == torch.float32:
        return {k: (v.float(), 0.0) for k, v in got.items()}
    ref = ref.float()  # the same masked weights, exactly, in fp32
    out = {}
    for m in bench.metrics:
        want = m.check(ref).float()
        out[m.label] = (want, relative_error(got[m.label], want, f"{bench.name} masked reference"))
    return out


@contextlib.contextmanager
def record_backends(model: nn.Module):
    """Yields {module name: set of backend names} that the model's SparseLinear / SparseConv2d
    modules ran while the block runs: read from each module's own dispatch (its ``_backend_for``,
    which "auto" resolves per batch bucket), so it is what the timed calls of the same shapes run."""
    seen: dict[str, set] = {}
    patched = []
    for name, mod in model.named_modules():
        if isinstance(mod, PackedModule):
            def record(x, rows, _orig=mod._backend_for, _name=name):
                backend = _orig(x, rows)
                seen.setdefault(_name, set()).add(backend.name)
                return backend
            mod._backend_for = record  # an instance attribute shadows the method, for this block only
            patched.append(mod)
    try:
        yield seen
    finally:
        for mod in patched:
            del mod._backend_for


def check_variant(bench: ModelBench, style: Style, v: Variant, refs: dict) -> None:
    """Runs every metric's check input through ``v`` and fills ``v.checks``; raises (refusing to
    time) on a wrong output, or when a layer of an "ours" row ran anything but the backend named."""
    for m in bench.metrics:
        what = f"{bench.name} {style.label} [{v.row}] {m.label}"
        with record_backends(v.model) as seen:
            got = m.check(v.model)
        want, own = refs[m.label]
        err = relative_error(got, want, what)
        allowed = allowed_error(bench.dtype, own)
        if not err <= allowed:
            raise RuntimeError(f"{what}: wrong result (max error {err:.3g} of the output scale, allowed {allowed:.3g}: "
                               f"{OWN_ERROR_FACTOR:g}x the masked model's own {own:.3g} in {bench.dtype}, at least "
                               f"{tolerance(bench.dtype):.3g}); refusing to time it")
        if len(seen) != v.packed:
            raise RuntimeError(f"{what}: {len(seen)} of {v.packed} converted layers ran; refusing to time it")
        used = Counter(b for names in seen.values() for b in names)
        if v.impl == "ours" and set(used) != {v.row}:
            raise RuntimeError(f"{what}: converted layers ran on {dict(used)}, not all on backend '{v.row}'; "
                               f"refusing to label that as ours")
        sparse = sum(1 for names in seen.values() if names - {"dense"})
        v.checks[m.label] = (err, allowed, dict(used), sparse)


# --- timing ----------------------------------------------------------------------------------------

def _weights(nbytes: int, llc: int) -> str:
    # more than twice the LLC: nothing of it survives in cache from one forward to the next
    return "cold" if nbytes > COLD_FACTOR * llc else "hot"


def time_style(bench: ModelBench, style: Style, variants: list[Variant], *, rounds: int, budget_s: float,
               llc: int, prep_s: float, log=print) -> tuple[list[dict], dict[str, list]]:
    """Rows of every (variant, metric), and per metric the dense timings of these comparisons."""
    rows, dense_times = [], {}
    dense_bytes = bench.info["dense_bytes"]
    for m in bench.metrics:
        t0 = time.perf_counter()
        res = compare(m.call(bench.dense), {v.row: m.call(v.model) for v in variants}, bench.device,
                      budget_s=budget_s, min_rounds=rounds, long_round_rounds=rounds, warmup=1,
                      self_timed=m.self_timed)
        load = machine.loadavg()[0]
        first = res[variants[0].row]
        dense_times[m.label] = [first["base_s"], first["base_min_s"], first["rounds"]]
        for v in variants:
            r = res[v.row]
            err, allowed, used, sparse = v.checks[m.label]
            rows.append({
                "model": bench.name, "style": style.label, "pattern": style.pattern, "sparsity": style.overall,
                "impl": v.impl, "backend": v.row,
                "backend_used": ",".join(f"{b}:{n}" for b, n in sorted(used.items())) or "dense modules",
                "layers": v.layers, "layers_packed": v.packed, "layers_sparse": sparse,
                "metric": m.name, "batch": m.batch, "seq": m.seq, "unit": m.unit,
                "s_dense": r["base_s"], "s_style": r["s"], "rate_dense": round(m.items / r["base_s"], 3),
                "rate": round(m.items / r["s"], 3), "speedup": round(r["speedup"], 3),
                "s_dense_min": r["base_min_s"], "s_style_min": r["min_s"], "speedup_best": round(r["speedup_best"], 3),
                "rounds": r["rounds"], "weights_mb": round(v.nbytes / 2**20, 2),
                "dense_weights_mb": round(dense_bytes / 2**20, 2), "bytes_ratio": round(v.nbytes / dense_bytes, 4),
                "weights_over_llc": round(v.nbytes / llc, 2), "weights": _weights(v.nbytes, llc),
                "max_rel_err": f"{err:.2e}", "allowed_err": f"{allowed:.2e}", "prep_s": round(prep_s, 1),
                "load_1m": load})
        log(f"    {m.label:16s} " + ", ".join(f"{v.row} {res[v.row]['speedup']:.2f}x" for v in variants)
            + f"  ({res[variants[0].row]['rounds']} rounds, {time.perf_counter() - t0:.0f} s)")
    return rows, dense_times


def dense_rows(bench: ModelBench, dense_times: dict[str, list[list]], llc: int) -> list[dict]:
    """One row per metric for the dense model: the median of its timings over every comparison
    of the run (each style's comparison timed it afresh), speedup 1 by definition."""
    layers, _ = count_layers(bench.dense)
    nbytes = bench.info["dense_bytes"]
    rows = []
    for m in bench.metrics:
        ts = dense_times[m.label]
        s = statistics.median(t[0] for t in ts)
        rows.append({
            "model": bench.name, "style": "dense", "pattern": "dense", "sparsity": 0.0, "impl": "dense",
            "backend": "dense", "backend_used": "dense modules", "layers": layers, "layers_packed": 0,
            "layers_sparse": 0, "metric": m.name, "batch": m.batch, "seq": m.seq, "unit": m.unit, "s_dense": s,
            "s_style": s, "rate_dense": round(m.items / s, 3), "rate": round(m.items / s, 3), "speedup": 1.0,
            "s_dense_min": min(t[1] for t in ts), "s_style_min": min(t[1] for t in ts), "speedup_best": 1.0,
            "rounds": sum(t[2] for t in ts), "weights_mb": round(nbytes / 2**20, 2),
            "dense_weights_mb": round(nbytes / 2**20, 2), "bytes_ratio": 1.0,
            "weights_over_llc": round(nbytes / llc, 2), "weights": _weights(nbytes, llc), "max_rel_err": "",
            "allowed_err": "", "prep_s": 0.0, "load_1m": machine.loadavg()[0]})
    return rows


def bench_model(bench: ModelBench, styles: Sequence[Style], backends: Sequence[str], *, rounds: int,
                budget_s: float, llc: int, log=print) -> list[dict]:
    bench.info.update(desc=bench.desc, params=sum(p.numel() for p in bench.dense.parameters()),
                      dense_bytes=model_bytes(bench.dense), variants={})
    nbytes = bench.info["dense_bytes"]
    log(f"{bench.name}: {bench.desc}; {bench.info['params'] / 1e6:.1f} M parameters, {nbytes / 2**20:.0f} MiB "
        f"= {nbytes / llc:.1f}x the {llc / 2**20:.0f} MiB LLC ({_weights(nbytes, llc)})")
    rows, dense_times = [], {m.label: [] for m in bench.metrics}
    for style in styles:
        t0 = time.perf_counter()
        refs = reference_outputs(bench, style)
        gc.collect()  # the masked copy is gone; its memory should be too before the variants are built
        variants = build_variants(bench, style, backends)
        if not variants:
            log(f"  {style.label}: no backend here can run any layer of {bench.name}; skipped")
            continue
        for v in variants:
            check_variant(bench, style, v, refs)
            bench.info["variants"][f"{style.label} [{v.row}]"] = {
                "layers": v.layers, "packed": v.packed, "bytes": v.nbytes, "skipped": v.skipped,
                "checks": {k: {"error": c[0], "allowed": c[1], "backends": c[2], "sparse_layers": c[3]}
                           for k, c in v.checks.items()}}
        del refs
        prep_s = time.perf_counter() - t0
        log(f"  {style.label}: " + "; ".join(f"[{v.row}] {v.packed}/{v.layers} layers converted, "
                                             f"{v.nbytes / nbytes:.2f} of the dense bytes" if v.impl != "channel" else
                                             f"[{v.row}] {v.nbytes / nbytes:.2f} of the dense bytes"
                                             for v in variants) + f" (built and checked in {prep_s:.0f} s)")
        got, times = time_style(bench, style, variants, rounds=rounds, budget_s=budget_s, llc=llc, prep_s=prep_s,
                                log=log)
        rows += got
        for k, t in times.items():
            dense_times[k].append(t)
        del variants, got
        gc.collect()
    if not rows:
        return []
    return dense_rows(bench, dense_times, llc) + rows


# --- output ----------------------------------------------------------------------------------------

def _row_name(r: dict) -> str:
    return {"ours": f"ours[{r['backend']}]", "auto": "auto", "channel": "dense modules", "dense": "-"}[r["impl"]]


def _metric_label(r: dict) -> str:
    b, seq = int(r["batch"]), int(r["seq"])
    return {"prefill": f"prefill b{b}x{seq}", "decode": f"decode b{b}"}.get(r["metric"], f"b{b}")


def _rate(v: float, unit: str) -> str:
    short = unit.replace("tokens/s", "tok/s").replace("images/s", "img/s")
    return f"{v:.3g} {short}" if v < 1000 else f"{v:.0f} {short}"


def format_table(rows: list[dict], meta: dict, info: dict) -> str:
    """Per model: a row per (style, row kind), a column per metric; dense shows its rates, the
    others their speedups (auto adds [layers that ran sparse / converted])."""
    if not rows:
        return "(no results)"
    llc = meta["llc_bytes"]
    lines = [machine.describe(meta),
             f"dtype {meta['dtype']}; speedup = median over interleaved rounds of dense seconds / style seconds "
             "(same run, same dtype; higher is better).",
             "ours[b]: every converted layer on our kernels, backend b named (checked). auto: backend='auto' "
             "([s/c]: layers that ran a sparse kernel at that shape / layers converted).",
             "dense modules: channel pruning, smaller ordinary layers on PyTorch's kernels. Decode counts the decode "
             "steps of greedy generate only (the prefill's token excluded)."]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        mi = info.get(model, {})
        nbytes = mi.get("dense_bytes", 0)
        lines += ["", f"{model}: {mi.get('desc', '')}",
                  f"  dense: {mi.get('params', 0) / 1e6:.1f} M parameters, {nbytes / 2**20:.0f} MiB = "
                  f"{nbytes / llc:.1f}x the {llc / 2**20:.0f} MiB LLC ({_weights(nbytes, llc)})"]
        metrics = list(dict.fromkeys(_metric_label(r) for r in sub))
        lines.append(f"{'style':14s} {'row':14s} {'MiB':>7s} " + " ".join(f"{m:>18s}" for m in metrics))
        for key in dict.fromkeys((r["style"], _row_name(r)) for r in sub):
            cells = {_metric_label(r): r for r in sub if (r["style"], _row_name(r)) == key}
            r0 = next(iter(cells.values()))
            out = []
            for m in metrics:
                r = cells.get(m)
                if r is None:
                    out.append(f"{'-':>18s}")
                elif r["impl"] == "dense":
                    out.append(f"{_rate(float(r['rate']), r['unit']):>18s}")
                elif r["impl"] == "auto":
                    out.append(f"{float(r['speedup']):.2f}x [{r['layers_sparse']}/{r['layers_packed']}]".rjust(18))
                else:
                    out.append(f"{float(r['speedup']):.2f}x".rjust(18))
            lines.append(f"{key[0]:14s} {key[1]:14s} {float(r0['weights_mb']):7.0f} " + " ".join(out))
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Speedup per style per model: a panel per model, a group of bars per style row, a bar per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows if r["impl"] != "dense"))
    if not models:
        return
    groups_of = {m: list(dict.fromkeys(_group(r) for r in rows if r["model"] == m and r["impl"] != "dense"))
                 for m in models}
    fig, axes = plt.subplots(1, len(models), squeeze=False,
                             figsize=(sum(max(4.0, 0.9 * len(g) + 1.5) for g in groups_of.values()), 4.6))
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model and r["impl"] != "dense"]
        groups = groups_of[model]
        metrics = list(dict.fromkeys(_metric_label(r) for r in sub))
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            ys = [next((float(r["speedup"]) for r in sub if _group(r) == g and _metric_label(r) == metric), math.nan)
                  for g in groups]
            xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, ys, width, label=metric)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("speedup vs dense (same run)")
        ax.set_title(model, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sparseprune, whole models: {machine.caption(rows[0])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _group(r: dict) -> str:
    """A bar group's name: the style, and the row kind unless it is our kernels on the CPU backend."""
    if r["impl"] == "auto":
        return r["style"] + " auto"
    return r["style"] + (f" [{r['backend']}]" if r["impl"] == "ours" and r["backend"] != "cpu" else "")


# --- the mode ------------------------------------------------------------------------------------

def _positive(name: str, values) -> list[int]:
    values = list(values)
    if not values or any(not isinstance(b, int) or b < 1 for b in values):
        raise ValueError(f"{name} must be positive integers, got {values}")
    return values


def run(out_dir: str | None = None, *, quick: bool = False, device: str = "cpu", dtype: str = "fp32",
        models: Sequence[str] = MODELS, styles: Sequence[str] | None = None, decode_batches=None, image_batches=None,
        rounds: int | None = None, budget_s: float | None = None, backends: Sequence[str] | None = None,
        llama_size: LlamaSize | None = None, resnet_size: ResNetSize | None = None, seed: int = 0,
        log=print) -> list[dict]:
    """Runs the whole-model benchmark; prints the tables and writes models-<dtype>[-quick].{csv,txt,json,png}.

    ``llama_size`` / ``resnet_size`` replace the full or quick shapes (tests use tiny ones).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    models = list(dict.fromkeys(models))
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"unknown model(s) {bad}; known: {list(MODELS)}" if bad else "no models given")
    style_list = resolve_styles(styles if styles is not None else [s.label for s in STYLES])
    decode_batches = _positive("decode batches", decode_batches or DECODE_BATCHES)
    image_batches = _positive("image batches", image_batches or IMAGE_BATCHES)
    grid = "quick" if quick else "full"
    rounds = ROUNDS[grid] if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    budget = BUDGET_S[grid] if budget_s is None else budget_s
    dev = torch.device(device)
    dt = DTYPES[dtype]
    backends = list(backends) if backends else explicit_backends(dev)
    llama_size = llama_size or LLAMA_SIZES[grid]
    resnet_size = resnet_size or RESNET_SIZES[grid]
    out_dir = out_dir or machine.default_results_dir(dev)
    stem = f"models-{dtype}" + ("-quick" if quick else "")
    meta = machine.run_metadata(dev, dtype=dtype)
    llc = meta["llc_bytes"]
    log(machine.describe(meta))
    t0 = time.perf_counter()
    rows: list[dict] = []
    info: dict[str, dict] = {}
    builders = {"llama": lambda: build_llama(llama_size, dt, dev, decode_batches, seed),
                "resnet50": lambda: build_resnet50(resnet_size, dt, dev, image_batches, seed)}
    with torch.no_grad():
        for name in models:
            bench = builders[name]()
            rows += bench_model(bench, style_list, backends, rounds=rounds, budget_s=budget, llc=llc, log=log)
            info[name] = bench.info
            del bench
            gc.collect()
    meta = machine.finish(meta)
    rows = [{**meta, **r} for r in rows]  # the run's metadata on every row, the load at the end included
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, stem + ".csv"))
    table = format_table(rows, meta, info)
    with open(os.path.join(out_dir, stem + ".txt"), "w") as f:
        f.write(table + "\n")
    machine.write_metadata(
        os.path.join(out_dir, stem + ".json"), meta, duration_s=round(time.perf_counter() - t0, 1),
        grid={"quick": quick, "models": models, "styles": [s.label for s in style_list], "backends": backends,
              "decode_batches": decode_batches, "image_batches": image_batches, "rounds": rounds, "budget_s": budget,
              "block_size": list(BLOCK), "method": "magnitude", "seed": seed},
        models=info)
    log(table)
    try:
        plot(rows, os.path.join(out_dir, stem + ".png"))
    except ImportError:
        log("matplotlib not installed: skipped the plot")
    log(f"took {time.perf_counter() - t0:.0f} s; wrote {out_dir}/{stem}.csv, .txt, .json, .png")
    return rows
