"""Channel pruning: groups found on real graphs, shapes shrink, the shrunk model computes what the
masked one does, transformers models keep generating and loading, corrections do what they claim."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import sparseprune
from sparseprune.bench.models import Bottleneck, resnet50
from sparseprune.prune.stats import LayerStats
from sparseprune.prune.channel import ChannelStats, compensate_mean, least_squares
from sparseprune.prune.channel_graph import find_groups
from tests.helpers import DTYPE_IDS

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _randomize_bn(model: nn.Module) -> nn.Module:
    """BatchNorms with non-trivial statistics and affine parameters (fresh ones are the identity)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def _masked_and_shrunk(model, **kw):
    masked = copy.deepcopy(model)
    rep_mask = sparseprune.prune(masked, "channel", **kw)
    shrunk = sparseprune.convert(copy.deepcopy(model), "channel", **kw)
    return masked, rep_mask, shrunk


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _check_shrunk_is_masked_selection(original, masked, shrunk):
    """Each shrunk weight is the original weight at the rows and columns the masked model kept
    (found here from the masked weights' zeros, not from the library's bookkeeping)."""
    m_layers, s_layers = _layers(masked), _layers(shrunk)
    for name, orig in _layers(original).items():
        w0, wm, ws = orig.weight.detach(), m_layers[name].weight.detach(), s_layers[name].weight.detach()
        flat = wm.reshape(wm.shape[0], wm.shape[1], -1)
        rows = flat.ne(0).any(2).any(1).nonzero().flatten()
        cols = flat.ne(0).any(2).any(0).nonzero().flatten()
        assert ws.shape[:2] == (rows.numel(), cols.numel()), name
        assert torch.equal(ws, w0[rows][:, cols]), name


# --- nn.Sequential ---------------------------------------------------------------------------------

def _mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(32, 6)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_sequential_removes_the_weak_channels(dtype):
    model = _mlp(dtype)
    weak = {0: torch.randperm(40)[:20], 2: torch.randperm(32)[:16]}  # half of each hidden layer, made tiny
    with torch.no_grad():
        for prod, cons in ((0, 2), (2, 5)):
            model[prod].weight[weak[prod]] *= 1e-3
            model[prod].bias[weak[prod]] *= 1e-3
            model[cons].weight[:, weak[prod]] *= 1e-3
    ref = copy.deepcopy(model)  # the masked model, built here by hand
    with torch.no_grad():
        for prod, cons in ((0, 2), (2, 5)):
            ref[prod].weight[weak[prod]] = 0
            ref[prod].bias[weak[prod]] = 0
            ref[cons].weight[:, weak[prod]] = 0
    masked, rep, shrunk = _masked_and_shrunk(model, sparsity=0.5)
    assert [shrunk[i].weight.shape for i in (0, 2, 5)] == [(20, 24), (16, 20), (6, 16)]
    assert (shrunk[0].out_features, shrunk[2].in_features, shrunk[5].in_features) == (20, 20, 16)
    for a, b in zip(masked.parameters(), ref.parameters()):
        assert torch.equal(a, b)  # exactly the weak channels were zeroed
    _check_shrunk_is_masked_selection(model, masked, shrunk)
    assert {lr.name: lr.status for lr in shrunk.sparseprune_report.layers} == {"0": "converted", "2": "converted",
                                                                                "5": "converted"}
    assert {lr.status for lr in rep.layers} == {"pruned"}
    for b in (0, 1, 9):
        x = torch.randn(b, 24).to(dtype)
        torch.testing.assert_close(shrunk(x), ref(x), **TOL[dtype])
        assert shrunk(x).dtype == dtype


def test_prune_then_convert_removes_exactly_the_zeroed_channels():
    model = _mlp()
    masked = copy.deepcopy(model)
    sparseprune.prune(masked, "channel", sparsity=0.25)
    shrunk = sparseprune.convert(copy.deepcopy(masked), "channel")  # no sparsity: remove what is zero
    assert (shrunk[0].out_features, shrunk[2].out_features) == (30, 24)
    x = torch.randn(5, 24)
    torch.testing.assert_close(shrunk(x), masked(x), **TOL[torch.float32])
    _check_shrunk_is_masked_selection(model, masked, shrunk)


def test_layernorm_follows_and_is_reported_inexact():
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4)).eval()
    shrunk = sparseprune.convert(model, "channel", sparsity=0.5)
    assert shrunk[1].normalized_shape == (16,) and shrunk[1].weight.shape == (16,) and shrunk[1].bias.shape == (16,)
    assert "re-normalise" in shrunk.sparseprune_report["0"].reason
    assert shrunk(torch.randn(3, 16)).shape == (3, 4)


def test_include_exclude_keep_a_group_whole():
    model = _mlp()
    rep = sparseprune.prune(model, "channel", sparsity=0.5, exclude=["5"])
    by = {lr.name: lr for lr in rep.layers}
    assert by["0"].status == "pruned" and "5" not in by  # 0 -> 2 pruned; 2 -> 5 needs 5, which is excluded
    assert by["2"].reason.startswith("in 40->20; outputs kept: its group also holds 5")  # only its inputs
    assert not (model[2].weight == 0).all(1).any()  # no output row of layer 2 zeroed
    # {glob: sparsity}, matched against a group's name and layers; a group no glob matches stays whole
    rep = sparseprune.convert(_mlp(), "channel", sparsity={"0": 0.25, "5": 0.5}).sparseprune_report
    assert rep["0"].reason.startswith("out 40->30") and rep["5"].reason.startswith("in 32->16")
    rep = sparseprune.convert(_mlp(), "channel", sparsity={"0": 0.25}).sparseprune_report
    assert rep["2"].reason == "in 40->30; outputs kept: no sparsity given for its group"


# --- convolutional networks ------------------------------------------------------------------------

class _TwoBottlenecks(nn.Module):
    """A stem and two bottlenecks: the first with a downsample branch, the second with the identity."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.b1 = Bottleneck(16, 8, stride=2, downsample=down)
        self.b2 = Bottleneck(32, 8)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.b2(self.b1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_residual_block_with_downsample():
    model = _randomize_bn(_TwoBottlenecks())
    groups = {g.name: g for g in find_groups(model).groups}
    res = groups["b1.conv3"]  # the residual add ties both conv3, the downsample conv and their BNs
    assert {m.module for m in res.of_role("out")} == {"b1.conv3", "b1.downsample.0", "b2.conv3"}
    assert {m.module for m in res.of_role("follow")} == {"b1.bn3", "b1.downsample.1", "b2.bn3"}
    assert {m.module for m in res.of_role("in")} == {"b2.conv1", "head"}
    assert res.scales["b1.conv3"] == "b1.bn3" and res.problem is None
    masked, _, shrunk = _masked_and_shrunk(model, sparsity=0.5)
    assert shrunk.b1.conv3.out_channels == shrunk.b1.downsample[0].out_channels == shrunk.b2.conv3.out_channels == 16
    assert shrunk.b1.bn3.num_features == shrunk.b1.downsample[1].num_features == 16
    assert shrunk.b1.bn3.running_mean.shape == (16,) and shrunk.head.in_features == 16
    assert shrunk.stem[0].out_channels == 8 and shrunk.b1.conv1.in_channels == 8
    _check_shrunk_is_masked_selection(model, masked, shrunk)
    with torch.no_grad():
        for b in (0, 1, 3):
            x = torch.randn(b, 3, 12, 12)
            torch.testing.assert_close(shrunk(x), masked(x), **TOL[torch.float32])


def test_resnet50_layout_shrinks_and_round_trips(tmp_path):
    model = _randomize_bn(resnet50(num_classes=7, width=8))
    masked, _, shrunk = _masked_and_shrunk(model, sparsity=0.5)
    rep = shrunk.sparseprune_report
    assert len(rep.converted) == 54 and not rep.skipped  # 53 convs + fc (its inputs)
    assert shrunk.fc.out_features == 7 and shrunk.fc.in_features == 128
    assert shrunk.layer4[0].conv3.out_channels == 128 and shrunk.layer4[2].bn3.num_features == 128
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, shrunk))
    assert n1 < 0.3 * n0  # about a quarter of the weights of a conv remain at half the channels
    _check_shrunk_is_masked_selection(model, masked, shrunk)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked(x), **TOL[torch.float32])
        sparseprune.save(shrunk, tmp_path / "r50.safetensors")
        fresh = sparseprune.load(tmp_path / "r50.safetensors", resnet50(num_classes=7, width=8).eval())
        assert torch.equal(fresh(x), shrunk(x))
        assert fresh.layer2[1].conv1.in_channels == 32 and fresh.layer2[1].bn1.running_var.shape == (8,)


def test_flattened_conv_map_and_depthwise_conv():
    model = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    model = _randomize_bn(model)
    g = {g.name: g for g in find_groups(model).groups}
    assert [(m.module, m.role, m.width) for m in g["5"].members if m.role == "in"] == [("8", "in", 16)]
    assert {m.module for m in g["0"].of_role("follow")} == {"2", "3"}
    masked, _, shrunk = _masked_and_shrunk(model, sparsity=0.5)
    assert shrunk[2].groups == shrunk[2].in_channels == shrunk[2].out_channels == 6
    assert shrunk[8].in_features == 4 * 16 and shrunk[5].in_channels == 6
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked(x), **TOL[torch.float32])


class _ViewNet(nn.Module):
    """Classic CNN code: x.view(x.size(0), -1) is a flatten; a hard-coded view(-1, 96) is not known."""

    def __init__(self, hard_coded: bool):
        super().__init__()
        self.hard_coded = hard_coded
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 6, 3), nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.view(-1, 96) if self.hard_coded else x.view(x.size(0), -1))


@pytest.mark.parametrize("hard_coded", [False, True], ids=["view-batch", "view-hard-coded"])
def test_view_as_flatten(hard_coded):
    model = _ViewNet(hard_coded).eval()
    masked, _, shrunk = _masked_and_shrunk(model, sparsity=0.5)
    assert shrunk.c1.out_channels == 4
    assert (shrunk.c2.out_channels, shrunk.fc.in_features) == ((6, 96) if hard_coded else (3, 48))
    if hard_coded:
        assert ".view()" in shrunk.sparseprune_report["c2"].reason
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(shrunk(x), masked(x), **TOL[torch.float32])


# --- what the analysis cannot follow -----------------------------------------------------------------

class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) if x.sum() > 0 else x


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(16, 8), nn.Linear(16, 8)
        self.out = nn.Linear(16, 3)

    def forward(self, h):
        return self.out(torch.cat([self.left(h), self.right(h)], -1))


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
        self.odd = _Branchy()
        self.cat = _Concat()

    def forward(self, x):
        return self.cat(self.odd(self.mlp(x)))


def test_untraceable_and_unknown_ops_are_reported_and_strict_raises():
    model = _Mixed().eval()
    ref = copy.deepcopy(model)
    rep = sparseprune.prune(model, "channel", sparsity=0.5)
    by = {lr.name: lr for lr in rep.layers}
    assert by["mlp.0"].status == "pruned"  # traced on its own: its inner channels still go
    for n in ("odd.a", "odd.b"):
        assert by[n].status == "skipped" and "cannot be traced by torch.fx" in by[n].reason
    assert by["cat.left"].status == "skipped" and "torch.cat" in by["cat.left"].reason
    x = torch.randn(4, 8).abs()
    assert model(x).shape == ref(x).shape
    with pytest.raises(ValueError, match="strict=True.*odd.a"):
        sparseprune.prune(copy.deepcopy(ref), "channel", sparsity=0.5, strict=True)
    # channels fixed by the model itself (its outputs) are no reason to raise
    rep = sparseprune.prune(_mlp(), "channel", sparsity=0.5, strict=True)
    assert rep["5"].reason == "in 32->16; outputs kept: an output of the model"


def test_bad_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match="needs sparsity"):
        sparseprune.prune(model, "channel")
    with pytest.raises(ValueError, match="methods are"):
        sparseprune.prune(model, "channel", sparsity=0.5, method="taylor2")
    with pytest.raises(ValueError, match="needs calibration"):
        sparseprune.convert(model, "channel", sparsity=0.5, method="flap")
    with pytest.raises(ValueError, match="permute"):
        sparseprune.convert(model, "channel", sparsity=0.5, permute=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparseprune.convert(model, "channel", sparsity=1.0)


# --- calibrated scores and corrections ---------------------------------------------------------------

def test_least_squares_is_the_calibration_optimum_and_flap_keeps_the_mean():
    # the removed inputs are (noisy) linear functions of the kept ones, with an offset: the kept
    # columns and the bias can take over most of what the removed ones did
    kept_x = torch.randn(400, 6) * (0.5 + torch.rand(6)) + torch.randn(6)
    x = torch.empty(400, 12)
    keep, gone = torch.arange(0, 12, 2), torch.arange(1, 12, 2)
    x[:, keep] = kept_x
    x[:, gone] = kept_x @ torch.randn(6, 6) + 0.1 * torch.randn(400, 6) + torch.randn(6)
    lin = nn.Linear(12, 5)
    st = LayerStats(12, "cpu", hessian=True)
    for chunk in x.split(37):  # odd chunks: the running statistics must not depend on the split
        st.add(chunk)
    y = lin(x).detach()
    ls = copy.deepcopy(lin)
    least_squares(ls, keep, gone, st)
    ls.weight.data[:, gone] = 0
    plain = copy.deepcopy(lin)
    plain.weight.data[:, gone] = 0
    # reference: the best [W_K, b] on the calibration data, by lstsq in fp64 (SparseGPT's 1% damping
    # of H costs a little of that optimum)
    a = torch.cat([x[:, keep], torch.ones(400, 1)], 1).double()
    best = (a @ torch.linalg.lstsq(a, y.double()).solution - y.double()).pow(2).mean().item()
    err = lambda m: (m(x) - y).pow(2).mean().item()  # noqa: E731
    assert best - 1e-6 <= err(ls) <= best + 0.02 * err(plain)
    assert err(ls) < 0.1 * err(plain)
    fl = copy.deepcopy(lin)
    compensate_mean("fl", fl, gone, st, {}, {})
    fl.weight.data[:, gone] = 0
    torch.testing.assert_close(fl(x).mean(0), y.mean(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_bn", [True, False], ids=["conv+bn", "conv"])
def test_flap_compensation_of_a_conv(with_bn):
    # Exact where every image's channel is constant over the map: then a removed channel added
    # mean * kernel sum at every position (borders and padding make it approximate in general).
    # No padding here, so every position sees only the constants.
    conv = nn.Conv2d(6, 4, 3, bias=False)
    bn = _randomize_bn(nn.Sequential(nn.BatchNorm2d(4)))[0] if with_bn else nn.Identity()
    x = (torch.randn(8, 6).abs() + torch.rand(6))[:, :, None, None].expand(8, 6, 7, 7)
    st = ChannelStats(6, "cpu", False)
    st.add(x)
    gone = torch.tensor([1, 4])
    with torch.no_grad():
        want = bn(conv(x)).mean((0, 2, 3))
        compensate_mean("c", conv, gone, st, {"c": "bn"} if with_bn else {}, {"bn": bn})
        conv.weight[:, gone] = 0
        assert (conv.bias is None) == with_bn  # folded into the BatchNorm's running mean, else a new bias
        torch.testing.assert_close(bn(conv(x)).mean((0, 2, 3)), want, atol=1e-4, rtol=1e-4)


def test_calibrated_methods_on_a_conv_net():
    model = _randomize_bn(_TwoBottlenecks())
    calib = [torch.randn(4, 3, 10, 10) for _ in range(2)]
    x = torch.randn(2, 3, 10, 10)
    for method in ("wanda", "flap", "sparsegpt"):
        masked, rep, shrunk = _masked_and_shrunk(model, sparsity=0.5, method=method, calibration=calib)
        assert rep.method == method and shrunk.b1.conv2.out_channels == 4
        assert shrunk.b1.conv2.bias is None and shrunk.head.bias is not None
        with torch.no_grad():
            torch.testing.assert_close(shrunk(x), masked(x), **TOL[torch.float32])


# --- transformers -----------------------------------------------------------------------------------

def _llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=16, vocab_size=97, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_llama_heads_and_neurons(tmp_path):
    from transformers import LlamaForCausalLM

    model = _llama()
    masked, _, shrunk = _masked_and_shrunk(model, sparsity=0.5)
    att, mlp = shrunk.model.layers[1].self_attn, shrunk.model.layers[1].mlp
    assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features, att.o_proj.in_features) == \
        (64, 32, 32, 64)
    assert att.num_key_value_groups == 2 and mlp.gate_proj.out_features == mlp.down_proj.in_features == 48
    cfg = shrunk.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (48, 4, 2, 16)
    # GQA: a removed KV head takes its two query heads with it (rows found from the masked model)
    q0, k0 = model.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.k_proj.weight
    kept_kv = masked.model.layers[1].self_attn.k_proj.weight.reshape(4, 16, 64).ne(0).any(2).any(1).nonzero().flatten()
    kept_q = masked.model.layers[1].self_attn.q_proj.weight.reshape(8, 16, 64).ne(0).any(2).any(1).nonzero().flatten()
    assert torch.equal(kept_q, torch.stack([2 * kept_kv, 2 * kept_kv + 1], 1).flatten())
    assert torch.equal(att.k_proj.weight, k0.reshape(4, 16, 64)[kept_kv].reshape(32, 64))
    assert torch.equal(att.q_proj.weight, q0.reshape(8, 16, 64)[kept_q].reshape(64, 64))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(shrunk(ids).logits, masked(ids).logits, **TOL[torch.float32])
    prompt = ids[:1, :5]
    out = shrunk.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, masked.generate(prompt, max_new_tokens=6, do_sample=False))
    # the config now describes the shrunk model: transformers' own save/load reproduces it
    shrunk.save_pretrained(tmp_path / "hf")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, shrunk(ids).logits)


def test_llama_per_layer_widths_round_trip_through_sparseprune_load(tmp_path):
    model = _llama()
    calib = [torch.randint(0, 97, (2, 16)) for _ in range(3)]
    masked, _, shrunk = _masked_and_shrunk(model, sparsity=0.4, method="flap", calibration=calib,
                                           global_budget=True)
    widths = [layer.mlp.down_proj.in_features for layer in shrunk.model.layers]
    heads = [layer.self_attn.k_proj.out_features // 16 for layer in shrunk.model.layers]
    assert widths[0] != widths[1] or heads[0] != heads[1]  # the global budget made them differ
    assert shrunk.model.layers[0].mlp.down_proj.bias is not None  # flap's compensation
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(shrunk(ids).logits, masked(ids).logits, **TOL[torch.float32])
    path = tmp_path / "llama.safetensors"
    sparseprune.save(shrunk, path)
    fresh = sparseprune.load(path, _llama())
    assert [layer.mlp.down_proj.in_features for layer in fresh.model.layers] == widths
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, shrunk(ids).logits)
    out = fresh.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert torch.equal(out, shrunk.generate(ids[:1, :4], max_new_tokens=5, do_sample=False))
    # channel pruning, then 2:4 on the smaller layers: one checkpoint holds both
    sparseprune.convert(shrunk, "2:4", backend="cpu", exclude=["lm_head"])
    sparseprune.save(shrunk, path)
    both = sparseprune.load(path, _llama())
    with torch.no_grad():
        torch.testing.assert_close(both(ids).logits, shrunk(ids).logits, **TOL[torch.float32])


def test_bert_heads_and_intermediate(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=101, max_position_embeddings=32)
    model = BertForSequenceClassification(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 101, (2, 12))} for _ in range(2)]
    masked, rep, shrunk = _masked_and_shrunk(model, sparsity=0.5, method="wanda", calibration=calib)
    layer = shrunk.bert.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.all_head_size == 32
    assert layer.attention.self.query.out_features == layer.attention.output.dense.in_features == 32
    assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 64
    assert shrunk.config.intermediate_size == 64 and shrunk.config.num_attention_heads == 4  # see the group note
    assert "hidden size" in shrunk.sparseprune_report["classifier"].reason
    ids = torch.randint(0, 101, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(shrunk(input_ids=ids, attention_mask=mask).logits,
                                   masked(input_ids=ids, attention_mask=mask).logits, **TOL[torch.float32])
    path = tmp_path / "bert.safetensors"
    sparseprune.save(shrunk, path)
    fresh = sparseprune.load(path, BertForSequenceClassification(cfg).eval())
    assert fresh.bert.encoder.layer[1].attention.self.num_attention_heads == 2
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, shrunk(input_ids=ids).logits)


def test_load_refuses_a_bad_channel_record(tmp_path):
    from safetensors.torch import load_file, save_file

    shrunk = sparseprune.convert(_mlp(), "channel", sparsity=0.5)
    path = tmp_path / "m.safetensors"
    config = sparseprune.save(shrunk, path)
    tensors = load_file(path)
    for bad, match in ((dict(config["channel"], modules={"9": {}}), "lacks"),
                       (dict(config["channel"], modules={"0": {"attrs": {"forward": 3}}}), "may not set"),
                       (dict(config["channel"], modules={"0": {"params": {"weight": [-1, 2]}}}), "non-negative"),
                       (dict(config["channel"], config={"vocab_size": 3}), "may not set"),
                       (dict(config["channel"], modules={"0": {"attrs": {"out_features": 7}}}), "inconsistent")):
        save_file(tensors, tmp_path / "bad.safetensors", metadata={"sparseprune": json.dumps(dict(config, channel=bad))})
        with pytest.raises(ValueError, match=match):
            sparseprune.load(tmp_path / "bad.safetensors", _mlp())
