"""2:4 channel permutation: more kept score, and the permuted sparse model computes the same
function as the masked dense model with the equivalent mask."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparseprune
from sparseprune.modules import SparseLinear
from sparseprune.prune.masks import nm_mask
from sparseprune.prune.permute import (PERM_ATTR, fold_permutations, foldable_pairs, inverse_permutation,
                                       kept_score, search_permutation)
from tests.helpers import has_pattern


def _col_scaled(out, k):
    """Scores with strong per-column structure (what makes permutation pay off)."""
    return torch.randn(out, k).abs() * torch.rand(k).pow(3)[None, :] * 10


@pytest.mark.parametrize("shape", [(16, 32), (37, 64), (8, 4), (64, 132)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_search_keeps_at_least_as_much(shape):
    sc = _col_scaled(*shape)
    perm = search_permutation(sc)
    assert torch.equal(perm.sort().values, torch.arange(shape[1]))
    base, got = kept_score(sc), kept_score(sc, perm=perm)
    assert got >= base
    if shape[1] >= 32:
        assert got > base * 1.001, "no gain found on strongly column-structured scores"
    # the kept score is what a 2:4 mask of the permuted scores keeps
    mask = nm_mask(sc[:, perm], 2, 4)
    assert abs((sc[:, perm] * mask).sum().item() - got) <= 1e-4 * got


def test_search_within_segments_stays_in_segments():
    sc = _col_scaled(24, 96)
    perm = search_permutation(sc, segment=32)
    assert torch.equal(perm.sort().values, torch.arange(96))
    assert torch.equal(perm // 32, torch.arange(96) // 32)  # every channel stays in its block column
    assert kept_score(sc, perm=perm) > kept_score(sc) * 1.001
    with pytest.raises(ValueError, match="segment"):
        search_permutation(sc, segment=40)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_hybrid_permutation_keeps_the_block_choice(method):
    """Permuting inputs across block columns would change which blocks exist; for hybrid the
    search stays inside each block column, so the same blocks are kept, with or without it."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    xs = [torch.randn(48, 64) * (1 + 5 * torch.rand(64)) for _ in range(2)]
    cal = xs if method != "magnitude" else None
    a, b = copy.deepcopy(lin), copy.deepcopy(lin)
    kw = dict(sparsity=0.5, block_size=(8, 16), method=method, calibration=cal)
    sparseprune.prune(a, "hybrid", **kw)
    sparseprune.prune(b, "hybrid", permute=True, **kw)
    perm = getattr(b, PERM_ATTR)
    assert not torch.equal(perm, torch.arange(64))
    assert torch.equal(perm // 16, torch.arange(64) // 16)

    def blocks(w):
        return (w != 0).reshape(4, 8, 4, 16).any(-1).any(1)

    assert torch.equal(blocks(a.weight), blocks(b.weight))
    assert has_pattern(b.weight[:, perm], "nm")


def test_search_on_already_optimal_scores_is_a_noop_in_score():
    sc = torch.zeros(4, 16)
    sc[:, ::2] = 1.0  # every group already keeps its two ones
    perm = search_permutation(sc)
    assert kept_score(sc, perm=perm) == kept_score(sc)


def test_inverse_permutation():
    p = torch.randperm(20)
    assert torch.equal(p[inverse_permutation(p)], torch.arange(20))


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_permuted_prune_is_pattern_under_perm_and_scores_more(method):
    model = _mlp()
    xs = [torch.randn(32, 32) * (1 + 5 * torch.rand(32)) for _ in range(2)]
    cal = xs if method != "magnitude" else None
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    sparseprune.prune(a, "2:4", method=method, calibration=cal)
    sparseprune.prune(b, "2:4", method=method, calibration=cal, permute=True)
    for (na, la), (_, lb) in zip(a.named_children(), b.named_children()):
        if not isinstance(la, nn.Linear):
            continue
        perm = getattr(lb, PERM_ATTR)
        assert has_pattern(lb.weight[:, perm], "nm"), f"layer {na} is not 2:4 under its perm"
    if method == "magnitude":  # the score the search maximizes is |W| itself
        for (la, lb, l0) in zip(a, b, model):
            if isinstance(l0, nn.Linear):
                kept_a = (l0.weight.abs() * (la.weight != 0)).sum().item()
                kept_b = (l0.weight.abs() * (lb.weight != 0)).sum().item()
                assert kept_b >= kept_a - 1e-5


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "hybrid"])
def test_converted_permuted_model_equals_masked_dense(method, pattern):
    model = _mlp()
    xs = [torch.randn(32, 32) for _ in range(2)]
    kw = dict(method=method, calibration=xs if method != "magnitude" else None, permute=True)
    if pattern == "hybrid":
        kw.update(sparsity=0.5, block_size=(16, 16))
    masked = copy.deepcopy(model)
    sparseprune.prune(masked, pattern, **kw)  # dense weights, pruned in the model's own input order
    conv = copy.deepcopy(model)
    sparseprune.convert(conv, pattern, backend="cpu", **kw)
    assert all(isinstance(m, SparseLinear) for m in conv if not isinstance(m, (nn.GELU, nn.ReLU)))
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), masked(x), rtol=1e-4, atol=1e-5)
    notes = [lr.reason for lr in conv.sparseprune_report.layers]
    if pattern == "2:4":
        # Linear -> act -> Linear inside nn.Sequential: consumers' permutations fold into producers
        assert "folded into 0" in notes[1] and "folded into 2" in notes[2]
        assert conv[2].in_perm is None and conv[4].in_perm is None and conv[0].in_perm is not None
    else:  # hybrid producers would lose their block structure: every layer gathers x
        assert all(m.in_perm is not None for m in conv if isinstance(m, SparseLinear))
    # prune() then convert(): the remembered permutation packs the pruned weights as they are
    conv2 = copy.deepcopy(masked)
    sparseprune.convert(conv2, pattern, sparsity=kw.get("sparsity"), block_size=kw.get("block_size", (32, 32)),
                        backend="cpu")
    assert all(lr.status == "packed-as-is" for lr in conv2.sparseprune_report.layers)
    with torch.no_grad():
        torch.testing.assert_close(conv2(x), masked(x), rtol=1e-4, atol=1e-5)


def test_llama_mlp_fold_and_equivalence():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    pairs = foldable_pairs(model)
    assert pairs["model.layers.0.mlp.down_proj"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    ids = [torch.randint(0, 256, (2, 12)) for _ in range(2)]
    masked = copy.deepcopy(model)
    sparseprune.prune(masked, "2:4", method="wanda", calibration=ids, include="model.layers.*", permute=True)
    # prune-then-convert: weights pack as they are, in their remembered order (folded where known)
    conv = copy.deepcopy(masked)
    sparseprune.convert(conv, "2:4", include="model.layers.*", backend="cpu")
    assert all(lr.status == "packed-as-is" for lr in conv.sparseprune_report.layers)
    assert conv.model.layers[0].mlp.down_proj.in_perm is None
    assert conv.model.layers[0].self_attn.q_proj.in_perm is not None
    with torch.no_grad():
        torch.testing.assert_close(conv(ids[0]).logits, masked(ids[0]).logits, rtol=1e-4, atol=1e-4)


def test_explicit_pairs_and_refusals():
    model = _mlp()
    results_model = copy.deepcopy(model)
    sparseprune.prune(results_model, "2:4", permute=True)
    # explicit pairs: only what the user names is folded
    conv = copy.deepcopy(model)
    sparseprune.convert(conv, "2:4", permute={"2": ["0"]}, backend="cpu")
    assert conv[2].in_perm is None and conv[4].in_perm is not None
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), results_model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="N:4"):
        sparseprune.prune(copy.deepcopy(model), "4:8", permute=True)
    with pytest.raises(ValueError, match="global_budget"):
        sparseprune.prune(copy.deepcopy(model), "hybrid", sparsity=0.5, block_size=(16, 16), permute=True,
                          global_budget=True)
    assert fold_permutations(model, {}) == {}
