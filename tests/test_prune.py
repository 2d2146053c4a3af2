"""Mask makers, pattern parsing, layer selection and budgets."""

import pytest
import torch
from torch import nn

import sparseprune
from sparseprune.prune import make_mask, nm_mask, parse_pattern, satisfies
from sparseprune.prune.masks import block_scores


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_mask_keeps_top_n_of_each_group(n, m):
    s = torch.rand(13, 6 * m)
    mask = nm_mask(s, n, m)
    for r in range(13):
        for g in range(6):
            grp = s[r, g * m:(g + 1) * m]
            kept = mask[r, g * m:(g + 1) * m]
            assert kept.sum() == n
            assert grp[kept].min() >= grp[~kept].max()


def test_block_mask_prunes_lowest_norm_blocks():
    s = torch.rand(64, 96)
    pat = parse_pattern("block", sparsity=0.5, block_size=(16, 32))
    mask = make_mask(s, pat)
    bs = block_scores(s, (16, 32))
    kept = mask.reshape(4, 16, 3, 32).any(dim=(1, 3))
    assert kept.sum() == 6  # 12 blocks, half pruned
    assert bs[kept].min() >= bs[~kept].max()
    assert torch.equal(mask, kept.repeat_interleave(16, 0).repeat_interleave(32, 1))


@pytest.mark.parametrize("kind", ["block", "hybrid"])
def test_block_rounding_never_prunes_a_whole_layer(kind):
    """4 blocks at 90%: round(3.6) = 4 would zero the layer (ResNet-50's 64x64 1x1 convs); one block stays,
    the strongest."""
    s = torch.rand(64, 64) + 0.01
    s[32:, :32] += 5.0  # block (1, 0) is the strongest
    mask = make_mask(s, parse_pattern(kind, sparsity=0.9, block_size=(32, 32)))
    kept = mask.reshape(2, 32, 2, 32).any(dim=(1, 3))
    assert kept.tolist() == [[False, False], [True, False]]
    model = nn.Sequential(nn.Linear(64, 64, bias=False))  # no bias: the output is the kept block's alone
    sparseprune.convert(model, kind, sparsity=0.9, block_size=(32, 32))
    assert model(torch.randn(3, 64)).abs().sum() > 0


def test_hybrid_mask_is_blocks_then_24():
    s = torch.rand(64, 64)
    mask = make_mask(s, parse_pattern("hybrid", sparsity=0.75, block_size=(16, 16)))
    assert abs((1 - mask.float().mean().item()) - (1 + 0.75) / 2) < 1e-6
    assert satisfies(mask.float(), parse_pattern("2:4"), None)


def test_unstructured_mask_exact_fraction():
    mask = make_mask(torch.rand(50, 40), parse_pattern("unstructured", sparsity=0.3))
    assert (~mask).sum() == 600


def test_parse_pattern_errors():
    with pytest.raises(ValueError, match="unknown pattern"):
        parse_pattern("diagonal")
    with pytest.raises(ValueError, match="0 < N < M"):
        parse_pattern("4:4")
    with pytest.raises(ValueError, match="sparsity"):
        parse_pattern("block", sparsity=1.5)


def _mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 10))


def test_prune_include_exclude_and_report():
    m = _mlp()
    rep = sparseprune.prune(m, "2:4", exclude=["2"])
    assert [lr.name for lr in rep.converted] == ["0", "3"]
    assert satisfies(m[0].weight, parse_pattern("2:4"), None)
    assert not satisfies(m[2].weight, parse_pattern("2:4"), None)
    m = _mlp()
    rep = sparseprune.prune(m, "2:4", include=["[02]"])
    assert [lr.name for lr in rep.converted] == ["0", "2"]


def test_unservable_layers_are_skipped_with_reason_or_raise_when_strict():
    m = _mlp()
    w3 = m[3].weight.detach().clone()
    rep = sparseprune.prune(m, "block", sparsity=0.5, block_size=(32, 32))
    assert rep["3"].status == "skipped" and "not divisible" in rep["3"].reason
    assert torch.equal(m[3].weight, w3)  # left dense, untouched
    with pytest.raises(ValueError, match="strict=True.*3: shape 10x64"):
        sparseprune.prune(_mlp(), "block", sparsity=0.5, block_size=(32, 32), strict=True)
    m = _mlp().double()
    rep = sparseprune.prune(m, "2:4")
    assert all(lr.status == "skipped" and "float64" in lr.reason for lr in rep.layers)


def test_per_layer_sparsity_dict():
    m = _mlp()
    rep = sparseprune.prune(m, "block", sparsity={"0": 0.25, "2": 0.75}, block_size=(16, 16))
    assert abs(rep["0"].sparsity - 0.25) < 1e-6 and abs(rep["2"].sparsity - 0.75) < 1e-6
    assert rep["3"].status == "skipped"


def test_global_budget_spreads_unevenly_but_meets_total():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        m[0].weight[:, :16] *= 10  # one block column of layer 0 matters much more than the rest of it
    sparseprune.prune(m, "block", sparsity=0.5, block_size=(16, 16), global_budget=True)
    zero_blocks = [(lin.weight.reshape(4, 16, 4, 16).abs().sum(dim=(1, 3)) == 0) for lin in m]
    assert sum(z.sum().item() for z in zero_blocks) == 16  # half of 32 blocks overall
    # layer 0 loses its 12 minor blocks, layer 1 (uniform) only 4: the budget moved between layers
    assert zero_blocks[0].sum() == 12 and not zero_blocks[0][:, 0].any()
    assert zero_blocks[1].sum() == 4


def test_already_sparse_weights_are_packed_as_they_are():
    m = _mlp()
    sparseprune.prune(m, "2:4")
    before = m[0].weight.detach().clone()
    rep = sparseprune.prune(m, "2:4")
    assert rep["0"].status == "packed-as-is"
    assert torch.equal(m[0].weight, before)


def test_block_pattern_needs_sparsity_for_dense_weights():
    with pytest.raises(ValueError, match="needs sparsity"):
        sparseprune.prune(_mlp(), "block")


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown pruning method"):
        sparseprune.prune(_mlp(), "2:4", method="lottery")
