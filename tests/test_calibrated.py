"""Calibrated pruning (Wanda, SparseGPT) against small plain-torch references, and the runner."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

import sparseprune
from sparseprune.prune.calibrate import find_block_stack, prune_layers
from sparseprune.prune.stats import LayerStats
from sparseprune.prune.methods import Magnitude, get_method
from sparseprune.prune.patterns import Pattern, parse_pattern
from sparseprune.prune.permute import PERM_ATTR
from sparseprune.prune.select import select_layers
from sparseprune.prune.sparsegpt import SparseGPT
from tests.helpers import has_pattern, pattern_of

PATTERNS = [
    ("2:4", {}),
    ("4:8", {}),
    ("unstructured", {"sparsity": 0.5}),
    ("block", {"sparsity": 0.5, "block_size": (8, 8)}),
    ("hybrid", {"sparsity": 0.5, "block_size": (8, 8)}),
]
PATTERN_IDS = [p for p, _ in PATTERNS]


def _outlier_inputs(tokens: int, k: int) -> torch.Tensor:
    """Inputs with a few large-scale features, as trained LMs have (what makes Wanda matter)."""
    scale = torch.ones(k)
    scale[torch.randperm(k)[: max(1, k // 16)]] = 20.0
    return torch.randn(tokens, k) * scale


def _parse(pattern: str, kw: dict):
    """The Pattern of one PATTERNS entry."""
    return parse_pattern(pattern, sparsity=kw.get("sparsity"), block_size=kw.get("block_size", (32, 32)))


def _stats(x: torch.Tensor, hessian: bool) -> LayerStats:
    st = LayerStats(x.shape[-1], x.device, hessian)
    for chunk in x.split(37):  # odd chunks: the running means must not depend on the split
        st.add(chunk)
    return st


# --- reference implementations (plain torch, no shared code) -------------------------------------

def ref_wanda_mask(w, x, pattern: Pattern, sparsity):
    score = w.abs() * x.double().pow(2).sum(0).sqrt().float()[None, :]
    out, k = w.shape
    if pattern.kind == "nm":
        g = score.reshape(out, k // pattern.m, pattern.m)
        keep = torch.zeros_like(g, dtype=torch.bool)
        for r in range(out):
            for j in range(k // pattern.m):
                keep[r, j, g[r, j].argsort(descending=True)[: pattern.n]] = True
        return keep.reshape(out, k)
    if pattern.kind == "unstructured":
        keep = torch.ones_like(w, dtype=torch.bool)
        n_prune = int(round(sparsity * k))
        for r in range(out):
            keep[r, score[r].argsort()[:n_prune]] = False
        return keep
    bh, bw = pattern.block_size
    bs = torch.zeros(out // bh, k // bw)
    for i in range(out // bh):
        for j in range(k // bw):
            bs[i, j] = score[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].pow(2).sum().sqrt()
    order = bs.reshape(-1).argsort()
    bkeep = torch.ones(bs.numel(), dtype=torch.bool)
    bkeep[order[: int(round(sparsity * bs.numel()))]] = False
    keep = bkeep.reshape(bs.shape).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    if pattern.kind == "hybrid":
        keep &= ref_wanda_mask(w, x, Pattern("nm", 2, 4), None)
    return keep


def ref_obs_nm(w, x, n, m, percdamp=0.01):
    """Textbook sequential OBS for N:M, one column at a time with explicit inverses (fp64).

    With F = the columns not processed yet (j..k-1) and Hinv_F = inv(H[F, F]): at the first column
    of each group, prune the m - n weights with the lowest saliency w^2 / inv(H[c:, c:])[0, 0]
    (c = each column of the group; SparseGPT's w^2 / U_cc^2 with U the upper Cholesky factor of
    H^-1); then fix column j (kept or zeroed) and move its error onto the remaining columns:
    W[:, F] -= (w_j - q_j) / Hinv_F[0, 0] * Hinv_F[0, :].
    """
    W = w.double().clone()
    H = 2 * x.double().t() @ x.double() / x.shape[0]
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out, k = W.shape
    prune = torch.zeros(out, k, dtype=torch.bool)
    for j in range(k):
        Hinv = torch.linalg.inv(H[j:, j:])  # inverse over the columns not processed yet
        if j % m == 0:
            d = torch.stack([torch.linalg.inv(H[j + t:, j + t:])[0, 0] for t in range(m)])
            sal = W[:, j:j + m].pow(2) / d[None, :]
            idx = sal.argsort(dim=1)[:, : m - n]
            prune[:, j:j + m].scatter_(1, idx, True)
        q = torch.where(prune[:, j], torch.zeros_like(W[:, j]), W[:, j])
        err = (W[:, j] - q) / Hinv[0, 0]
        W[:, j:] -= err[:, None] * Hinv[0, :][None, :]
        W[:, j] = q
    return ~prune, W


# --- Wanda ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,kw", PATTERNS, ids=PATTERN_IDS)
def test_wanda_matches_direct_computation(pattern, kw):
    w = torch.randn(16, 32)
    x = _outlier_inputs(300, 32)
    pat = _parse(pattern, kw)
    mask, new_w = get_method("wanda").prune_layer(w, pat, kw.get("sparsity"), stats=_stats(x, False))
    want = ref_wanda_mask(w, x, pat, kw.get("sparsity"))
    assert torch.equal(mask, want)
    assert torch.equal(new_w, w * want)


def test_wanda_refuses_without_calibration():
    with pytest.raises(ValueError, match="calibration"):
        sparseprune.prune(nn.Sequential(nn.Linear(16, 16)), "2:4", method="wanda")


# --- SparseGPT ----------------------------------------------------------------------------------------

def _recon_err(x, w, w2):
    return (x @ w.t() - x @ w2.t()).norm().item()


@pytest.mark.parametrize("pattern,kw", PATTERNS, ids=PATTERN_IDS)
def test_sparsegpt_reconstructs_better_than_magnitude(pattern, kw):
    w = torch.randn(32, 64)
    x = _outlier_inputs(512, 64)
    pat = _parse(pattern, kw)
    st = _stats(x, True)
    mask, w_sg = get_method("sparsegpt").prune_layer(w, pat, kw.get("sparsity"), stats=st)
    _, w_mag = Magnitude().prune_layer(w, pat, kw.get("sparsity"))
    assert torch.equal(w_sg != 0, (w_sg != 0) & mask), "SparseGPT kept a weight its mask prunes"
    assert has_pattern(w_sg * mask, **pattern_of(pat, kw.get("sparsity")))
    assert abs((~mask).float().mean().item() - pat.overall_sparsity(kw.get("sparsity"))) < 1e-6
    e_sg, e_mag = _recon_err(x, w, w_sg), _recon_err(x, w, w_mag)
    assert e_sg < 0.8 * e_mag, f"SparseGPT error {e_sg:.4g} not well below magnitude's {e_mag:.4g}"


def test_sparsegpt_matches_reference_obs():
    """Exact comparison with a column-by-column OBS using explicit inverses (fp64), 2:4 and 1:4."""
    for n in (2, 1):
        w = torch.randn(6, 16)
        x = _outlier_inputs(200, 16)
        keep, w_sg = SparseGPT(blocksize=8).prune_layer(w, Pattern("nm", n, 4), None, stats=_stats(x, True))
        want_keep, want_w = ref_obs_nm(w, x, n, 4)
        assert torch.equal(keep, want_keep)
        torch.testing.assert_close(w_sg.double(), want_w, rtol=1e-4, atol=1e-4)


def test_sparsegpt_blocksize_does_not_change_the_result():
    """Lazy batch updates are an exact reordering of the same arithmetic."""
    w = torch.randn(8, 48)
    st = _stats(_outlier_inputs(300, 48), True)
    a = SparseGPT(blocksize=8).prune_layer(w, Pattern("nm", 2, 4), None, stats=st)
    b = SparseGPT(blocksize=128).prune_layer(w, Pattern("nm", 2, 4), None, stats=st)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)


def test_stats_accumulate_exactly():
    x = torch.randn(500, 24)
    st = _stats(x, True)
    torch.testing.assert_close(st.H, 2 * x.t() @ x / 500, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.col_norm(), x.pow(2).sum(0).sqrt(), rtol=1e-4, atol=1e-5)


def test_dead_inputs_do_not_break_sparsegpt():
    w = torch.randn(8, 16)
    x = torch.randn(100, 16)
    x[:, 3] = 0
    keep, w2 = get_method("sparsegpt").prune_layer(w, Pattern("nm", 2, 4), None, stats=_stats(x, True))
    assert torch.isfinite(w2).all() and (w2[:, 3] == 0).all()


# --- calibration input forms and the plain-module fallback ------------------------------------------

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x, scale=1.0):
        return self.b(torch.relu(self.a(x * scale)))


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict", "forward_loop"])
def test_calibration_forms(form):
    xs = [torch.randn(8, 16) for _ in range(3)]
    cal = {"tensor": xs, "tuple": [(x, 2.0) for x in xs], "dict": [{"x": x, "scale": 2.0} for x in xs],
           "forward_loop": lambda m: [m(x, scale=2.0) for x in xs]}[form]
    model = TwoInputs()
    ref = copy.deepcopy(model)
    sparseprune.prune(model, "2:4", method="wanda", calibration=cal)
    # reference: direct Wanda on each layer with the activations it sees (layer a first, then b)
    scale = 1.0 if form == "tensor" else 2.0
    xa = torch.cat(xs) * scale
    ma = ref_wanda_mask(ref.a.weight.detach(), xa, Pattern("nm", 2, 4), None)
    assert torch.equal(model.a.weight != 0, ma & (ref.a.weight != 0))
    xb = torch.relu(ref.a(xa))  # fallback: one pass, all layers see the dense model's activations
    mb = ref_wanda_mask(ref.b.weight.detach(), xb.detach(), Pattern("nm", 2, 4), None)
    assert torch.equal(model.b.weight != 0, mb & (ref.b.weight != 0))


# --- transformers models, block by block -----------------------------------------------------------------

def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=256, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(cfg).eval()


def _record_inputs(model, names):
    """{layer: concatenated inputs over a run}: for checking what calibration saw."""
    seen, hs = {}, []
    for n in names:
        hs.append(model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    return seen, hs


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_transformers_block_by_block(arch, method):
    model = _tiny_llama() if arch == "llama" else _tiny_bert()
    ids = [torch.randint(0, 256, (2, 12)) for _ in range(3)]
    if arch == "llama":
        cal = [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]
        stack = "model.layers"
        probe0, probe1 = "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"
    else:
        cal = [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]
        stack = "bert.encoder.layer"
        probe0, probe1 = "bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.self.query"
    dense = copy.deepcopy(model)
    plans, _ = select_layers(model, Pattern("nm", 2, 4))
    assert find_block_stack(model, [p.name for p in plans])[0] == stack
    # Capture what each probe layer sees during calibration.
    captured = {}

    class Spy(type(get_method(method))):
        def prune_layer(self, weight, pattern, sparsity, *, stats=None, block_keep=None):
            for name in (probe0, probe1):
                if weight.data_ptr() == model.get_submodule(name).weight.data_ptr():
                    captured[name] = stats.col_norm().clone()
            return super().prune_layer(weight, pattern, sparsity, stats=stats, block_keep=block_keep)

    masks = prune_layers(model, plans, Spy(), cal)
    assert set(masks) == {p.name for p in plans}
    for p in plans:
        assert has_pattern(p.module.weight, **pattern_of(p.pattern)), p.name
    # Block 1's statistics come from the outputs of the already-pruned block 0: replay the pruned
    # model and compare with the dense model (which would give different norms).
    seen, hs = _record_inputs(model, [probe1])
    with torch.no_grad():
        for c in cal:
            model(**c)
    for h in hs:
        h.remove()
    want = torch.cat(seen[probe1]).pow(2).sum(0).sqrt()
    torch.testing.assert_close(captured[probe1], want, rtol=1e-4, atol=1e-4)
    seen_d, hs = _record_inputs(dense, [probe1])
    with torch.no_grad():
        for c in cal:
            dense(**c)
    for h in hs:
        h.remove()
    assert not torch.allclose(captured[probe1], torch.cat(seen_d[probe1]).pow(2).sum(0).sqrt(), rtol=1e-3)
    # Within a block the statistics come from the block's input (the layers of block 0 see dense data).
    seen0, hs = _record_inputs(dense, [probe0])
    with torch.no_grad():
        for c in cal:
            dense(**c)
    for h in hs:
        h.remove()
    torch.testing.assert_close(captured[probe0], torch.cat(seen0[probe0]).pow(2).sum(0).sqrt(), rtol=1e-4, atol=1e-4)
    # The model still runs.
    out = model(**cal[0])
    assert torch.isfinite(out.logits).all()


def test_llama_calibration_forms_agree():
    """tensor, dict and forward_loop calibration give the same pruned Llama."""
    model = _tiny_llama()
    ids = [torch.randint(0, 256, (2, 12)) for _ in range(2)]
    results = []
    for cal in (ids, [{"input_ids": i} for i in ids], lambda m: [m(input_ids=i) for i in ids]):
        m = copy.deepcopy(model)
        sparseprune.prune(m, "2:4", method="sparsegpt", calibration=cal, include="model.layers.*")
        results.append(m.model.layers[1].mlp.down_proj.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def test_global_budget_with_calibration():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    xs = [_outlier_inputs(64, 32) for _ in range(2)]
    sparseprune.prune(model, "block", sparsity=0.5, block_size=(8, 8), method="wanda", calibration=xs,
                      global_budget=True)
    total = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    zeros = sum((m.weight == 0).sum().item() for m in model if isinstance(m, nn.Linear))
    assert abs(zeros / total - 0.5) < 0.02


@torch.no_grad()
def _scale_features(model, channels, s: float) -> None:
    """LLM-style outlier features, function preserved: every linear layer of the Llama's blocks reads
    ``channels`` s times larger through weights s times smaller (norm gains feed q/k/v and gate/up,
    v_proj rows feed o_proj, up_proj rows feed down_proj)."""
    for b in model.model.layers:
        at, mlp = b.self_attn, b.mlp
        for norm, consumers in ((b.input_layernorm, (at.q_proj, at.k_proj, at.v_proj)),
                                (b.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            norm.weight[channels] *= s
            for lin in consumers:
                lin.weight[:, channels] /= s
        # v row r (kv head r // hd) is read by every query head sharing that kv head (GQA)
        hd, rep = at.head_dim, at.num_key_value_groups
        o_cols = torch.tensor([(c // hd * rep + g) * hd + c % hd for c in channels.tolist() for g in range(rep)])
        at.v_proj.weight[channels] *= s
        at.o_proj.weight[:, o_cols] /= s
        mlp.up_proj.weight[channels] *= s
        mlp.down_proj.weight[:, channels] /= s


def test_wanda_is_blind_to_outlier_reparametrization_magnitude_is_not():
    """The reason Wanda beats magnitude on large LLMs: their inputs carry a few features far larger
    than the rest, read through small weights. Re-parametrizing a Llama that way (x8, a power of
    two, so every product is bit-identical) must leave Wanda's masks exactly unchanged, block by
    block through the already-pruned blocks, while magnitude now prunes the small-weight columns."""
    model = _tiny_llama()
    ids = [torch.randint(0, 256, (2, 12)) for _ in range(3)]
    scaled = copy.deepcopy(model)
    channels = torch.tensor([3, 17])
    _scale_features(scaled, channels, 8.0)
    with torch.no_grad():
        torch.testing.assert_close(scaled(input_ids=ids[0]).logits, model(input_ids=ids[0]).logits,
                                   rtol=1e-5, atol=1e-5)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    masks = {}
    for key, m in (("plain", model), ("scaled", scaled)):
        for meth in ("wanda", "magnitude"):
            mm = copy.deepcopy(m)
            sparseprune.prune(mm, "2:4", method=meth, include="model.layers.*",
                              calibration=ids if meth == "wanda" else None)
            masks[key, meth] = {n: mm.get_submodule(n).weight != 0 for n in names}
    for n in names:
        assert torch.equal(masks["plain", "wanda"][n], masks["scaled", "wanda"][n]), n
    changed = [n for n in names if not torch.equal(masks["plain", "magnitude"][n], masks["scaled", "magnitude"][n])]
    assert len(changed) == len(names)  # every layer reads scaled inputs, so magnitude's choice moves in each
    # and magnitude now drops the scaled (important) inputs: their columns keep far fewer weights
    q = "model.layers.0.self_attn.q_proj"
    assert masks["scaled", "magnitude"][q][:, channels].float().mean() < 0.1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_generator_calibration_on_a_llama_equals_a_list(method):
    """A one-shot generator works where pruning needs two passes (block 0's inputs, then lm_head)."""
    model = _tiny_llama()
    ids = [torch.randint(0, 256, (2, 12)) for _ in range(3)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    sparseprune.prune(a, "2:4", method=method, calibration=ids)  # lm_head too: outside the stack
    sparseprune.prune(b, "2:4", method=method, calibration=(i for i in ids))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_generator_calibration_streams_when_one_pass_is_enough():
    """Raw activations can be large (128 x 2048 tokens of a 4096-wide layer: 4 GB); a generator is
    consumed item by item, never held in full, when one pass does."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    alive, peak = weakref.WeakSet(), [0]

    def gen():
        for _ in range(6):
            x = _outlier_inputs(16, 32)
            alive.add(x)
            peak[0] = max(peak[0], len(alive))
            yield x
            del x

    ref = copy.deepcopy(model)
    sparseprune.prune(model, "2:4", method="sparsegpt", calibration=gen())
    assert peak[0] <= 2  # the item being used and the next one
    assert all(has_pattern(m.weight, "nm") for m in model if isinstance(m, nn.Linear))
    assert not torch.equal(model[0].weight, ref[0].weight)
    with pytest.raises(ValueError, match="empty"):
        sparseprune.prune(ref, "2:4", method="wanda", calibration=iter([]))


# --- on a GPU (skipped cleanly without one) -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("pattern,kw", PATTERNS, ids=PATTERN_IDS)
def test_sparsegpt_on_cuda_reconstructs_like_on_cpu(pattern, kw):
    """SparseGPT runs where the layer is (H, Cholesky and updates on the GPU) and does as well as on CPU."""
    w = torch.randn(64, 128)
    x = _outlier_inputs(1024, 128)
    pat = _parse(pattern, kw)
    mask_c, w_c = get_method("sparsegpt").prune_layer(w, pat, kw.get("sparsity"), stats=_stats(x, True))
    xg, wg = x.cuda(), w.cuda()
    mask_g, w_g = get_method("sparsegpt").prune_layer(wg, pat, kw.get("sparsity"), stats=_stats(xg, True))
    assert w_g.is_cuda and mask_g.is_cuda
    assert has_pattern(w_g * mask_g, **pattern_of(pat, kw.get("sparsity")))
    e_c, e_g = _recon_err(x, w, w_c), _recon_err(x, w, w_g.cpu())
    _, w_mag = Magnitude().prune_layer(w, pat, kw.get("sparsity"))
    assert e_g < 0.8 * _recon_err(x, w, w_mag)
    assert e_g == pytest.approx(e_c, rel=0.05)  # same algorithm; masks may differ only at near-ties
    assert (mask_g.cpu() == mask_c).float().mean() > 0.98


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_llama_block_by_block_on_cuda(method):
    model = _tiny_llama()
    ids = [torch.randint(0, 256, (2, 12)) for _ in range(3)]
    cpu, gpu = copy.deepcopy(model), copy.deepcopy(model).cuda()
    sparseprune.prune(cpu, "2:4", method=method, calibration=ids, include="model.layers.*")
    sparseprune.prune(gpu, "2:4", method=method, calibration=ids, include="model.layers.*")
    for (n, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert b.is_cuda
        if n.endswith("proj.weight"):
            assert ((a != 0) == (b.cpu() != 0)).float().mean() > 0.98, n
    # with permutation (searched on the GPU; a near-tie may steer it elsewhere than on CPU, so
    # only the result's shape is compared): 2:4 in each layer's own input order
    perm_gpu = copy.deepcopy(model).cuda()
    sparseprune.prune(perm_gpu, "2:4", method=method, calibration=ids, include="model.layers.*", permute=True)
    for n, m in perm_gpu.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in n:
            assert has_pattern(m.weight[:, getattr(m, PERM_ATTR)], "nm"), n
    with torch.no_grad():
        out = perm_gpu(input_ids=ids[0].cuda()).logits
    assert torch.isfinite(out).all()


def test_progress_bar_counts_the_layers(capsys):
    pytest.importorskip("tqdm")
    model = _tiny_llama()
    ids = [torch.randint(0, 256, (2, 12)) for _ in range(2)]
    sparseprune.prune(copy.deepcopy(model), "2:4", method="wanda", calibration=ids, include="model.layers.*",
                      progress=True)
    err = capsys.readouterr().err
    assert "pruning layers" in err and "14/14" in err  # 2 blocks x 7 projections
    sparseprune.prune(copy.deepcopy(model), "2:4", method="wanda", calibration=ids, include="model.layers.*")
    assert "pruning layers" not in capsys.readouterr().err  # default: only on a terminal
