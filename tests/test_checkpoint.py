"""save()/load() of converted models: round trips, file size, and corrupted files refused by name."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparseprune
from sparseprune.checkpoint import META_KEY
from sparseprune.modules import SparseLinear


def mlp(dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128, bias=bias), nn.GELU(), nn.Linear(128, 96, bias=bias),
                         nn.LayerNorm(96), nn.Linear(96, 64, bias=bias)).to(dtype)


CASES = [("2:4", {}), ("block", dict(sparsity=0.5, block_size=(16, 16))),
         ("hybrid", dict(sparsity=0.5, block_size=(16, 16)))]


@pytest.mark.parametrize("pattern,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip(tmp_path, pattern, kw, dtype):
    model = mlp(dtype)
    fresh = copy.deepcopy(model)
    sparseprune.convert(model, pattern, exclude=["4"], backend="cpu", **kw)
    path = tmp_path / "m.safetensors"
    sparseprune.save(model, path)
    loaded = sparseprune.load(path, fresh)
    assert loaded is fresh
    assert isinstance(fresh[0], SparseLinear) and isinstance(fresh[2], SparseLinear)
    assert isinstance(fresh[4], nn.Linear)  # excluded layer stays dense
    for a, b in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    x = torch.randn(5, 64).to(dtype)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert fresh.sparseprune_report["0"].status == "loaded"


def test_config_in_metadata(tmp_path):
    model = mlp()
    sparseprune.convert(model, "block", sparsity=0.5, block_size=(16, 32), backend="cpu", exclude=["4"])
    path = tmp_path / "m.safetensors"
    sparseprune.save(model, path)
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()[META_KEY])
        keys = set(f.keys())
    assert cfg["pattern"] == "block" and cfg["method"] == "magnitude"
    assert cfg["layers"]["0"] == {"kind": "bsr", "shape": [128, 64], "dtype": "float32", "block_size": [16, 32],
                                  "backend": "cpu", "bias": True, "in_perm": False}
    assert {"0.values", "0.crow", "0.col", "0.bias", "4.weight", "3.weight"} <= keys
    assert "0.weight" not in keys and not any(k.endswith("dense_weight") for k in keys)


def test_in_perm_and_backend_override(tmp_path):
    from tests.helpers import random_weight

    packed, _ = random_weight("semi24", 32, 64)
    perm = torch.randperm(64)
    model = nn.Sequential(SparseLinear(packed, torch.randn(32), backend="cpu", in_perm=perm))
    path = tmp_path / "p.safetensors"
    cfg = sparseprune.save(model, path)
    assert cfg["layers"]["0"]["in_perm"] is True
    fresh = nn.Sequential(nn.Linear(64, 32))
    sparseprune.load(path, fresh, backend="dense")
    assert fresh[0].backend == "dense" and torch.equal(fresh[0].in_perm, perm)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), model(x))


def test_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 64)
            self.mid = nn.Linear(64, 64)
            self.head = nn.Linear(64, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    model = Tied()
    fresh = Tied()
    sparseprune.convert(model, "2:4", backend="cpu")  # head is tied: left dense
    assert isinstance(model.head, nn.Linear)
    path = tmp_path / "t.safetensors"
    cfg = sparseprune.save(model, path)
    assert cfg["aliases"] in ({"head.weight": "emb.weight"}, {"emb.weight": "head.weight"})
    sparseprune.load(path, fresh)
    assert fresh.head.weight is fresh.emb.weight
    ids = torch.randint(0, 32, (2, 5))
    torch.testing.assert_close(fresh(ids), model(ids))


def test_fp16_24_checkpoint_is_at_most_0_6_of_dense(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512)).half()
    from safetensors.torch import save_model

    dense_path = tmp_path / "dense.safetensors"
    save_model(dense, str(dense_path))
    sparse = copy.deepcopy(dense)
    sparseprune.convert(sparse, "2:4", backend="cpu")
    sparse_path = tmp_path / "sparse.safetensors"
    sparseprune.save(sparse, sparse_path)
    ratio = sparse_path.stat().st_size / dense_path.stat().st_size
    assert ratio <= 0.6, ratio


def test_shape_mismatch_and_missing_layer(tmp_path):
    model = mlp()
    sparseprune.convert(model, "2:4", backend="cpu")
    path = tmp_path / "m.safetensors"
    sparseprune.save(model, path)
    wrong = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 96), nn.LayerNorm(96), nn.Linear(96, 64))
    with pytest.raises(ValueError, match="0: checkpoint layer is 128x64"):
        sparseprune.load(path, wrong)
    with pytest.raises(ValueError, match="lacks"):
        sparseprune.load(path, nn.Sequential(nn.Linear(64, 128)))


# --- corrupted files -------------------------------------------------------------------------------
def _saved(tmp_path, pattern="2:4", **kw):
    model = mlp()
    fresh = copy.deepcopy(model)
    sparseprune.convert(model, pattern, backend="cpu", **kw)
    path = tmp_path / "good.safetensors"
    sparseprune.save(model, path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return path, tensors, meta, fresh


def _write(tmp_path, tensors, meta):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _corrupt(tmp_path, pattern, kw, key, fn):
    _, tensors, meta, fresh = _saved(tmp_path, pattern, **kw)
    tensors[key] = fn(tensors[key].clone())
    return _write(tmp_path, tensors, meta), fresh


BSR = dict(sparsity=0.5, block_size=(16, 16))


def _set(i, v):
    def f(t):
        t[i] = v
        return t
    return f


CORRUPTIONS = [
    ("col-out-of-range", "block", BSR, "2.col", _set(0, 1000), r"2\.col\[0\] = 1000 is out of range"),
    ("col-negative", "hybrid", BSR, "0.col", _set(-1, -3), r"0\.col\[\d+\] = -3 is out of range"),
    ("crow-decreasing", "block", BSR, "0.crow", lambda t: torch.cat([t[:1], t[1:].flip(0)]),
     r"0\.crow must (be non-decreasing|run from 0)"),
    ("crow-end", "block", BSR, "0.crow", _set(-1, 10**6), r"0\.crow must run from 0 to nnzb"),
    ("bad-meta-nibble", "2:4", {}, "2.meta", _set((0, 0), 0xFF), r"2\.meta: malformed 2:4 position code 0xf"),
    ("bad-hybrid-meta", "hybrid", BSR, "0.meta", lambda t: t.fill_(0x33), r"0\.meta: malformed 2:4 position code 0x3"),
    ("truncated-values-24", "2:4", {}, "0.values", lambda t: t[:-1].clone(), r"0\.values has shape"),
    ("truncated-values-bsr", "block", BSR, "0.values", lambda t: t[:-1].clone(), r"0\.(col has|crow must)"),
    ("wrong-dtype-col", "block", BSR, "0.col", lambda t: t.float(), r"0\.col must be int32"),
    ("wrong-dtype-meta", "2:4", {}, "0.meta", lambda t: t.to(torch.int16), r"0\.meta must be uint8"),
    ("wrong-dtype-values", "2:4", {}, "0.values", lambda t: t.double(), r"0\.values has dtype torch.float64"),
    ("int-values", "2:4", {}, "0.values", lambda t: t.to(torch.int32), r"0\.values has dtype torch.int32"),
    ("meta-shape", "2:4", {}, "0.meta", lambda t: t[:, :-1].clone(), r"0\.meta has shape"),
]


@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_packed_tensor_is_refused_by_name(tmp_path, case):
    _, pattern, kw, key, fn, msg = case
    path, fresh = _corrupt(tmp_path, pattern, kw, key, fn)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=msg):
        sparseprune.load(path, fresh)
    # nothing was swapped in before validation finished
    assert all(isinstance(m, (nn.Linear, nn.GELU, nn.LayerNorm)) for m in fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_missing_tensor_and_bad_config(tmp_path):
    _, tensors, meta, fresh = _saved(tmp_path)
    t2 = dict(tensors)
    del t2["2.meta"]
    with pytest.raises(ValueError, match=r"2\.meta: missing"):
        sparseprune.load(_write(tmp_path, t2, meta), fresh)
    for bad, msg in [("{not json", "not valid JSON"), (json.dumps({"format": "x"}), "malformed"),
                     (json.dumps({"format": "sparseprune", "version": 99, "layers": {}}), "version 99")]:
        with pytest.raises(ValueError, match=msg):
            sparseprune.load(_write(tmp_path, tensors, {META_KEY: bad}), fresh)
    cfg = json.loads(meta[META_KEY])
    cfg["layers"]["0"]["kind"] = "evil"
    with pytest.raises(ValueError, match="0: unknown packed format 'evil'"):
        sparseprune.load(_write(tmp_path, tensors, {META_KEY: json.dumps(cfg)}), fresh)
    cfg = json.loads(meta[META_KEY])
    cfg["layers"]["0"]["shape"] = [128, -64]
    with pytest.raises(ValueError, match="0: layer shape"):
        sparseprune.load(_write(tmp_path, tensors, {META_KEY: json.dumps(cfg)}), fresh)
    with pytest.raises(ValueError, match="no sparseprune config"):
        sparseprune.load(_write(tmp_path, tensors, {}), fresh)


def test_truncated_and_non_safetensors_files(tmp_path):
    path, _, _, fresh = _saved(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sparseprune.load(cut, fresh)
    pickled = tmp_path / "model.pt"
    torch.save({"x": torch.ones(1)}, pickled)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sparseprune.load(pickled, fresh)


@pytest.mark.gpu
def test_load_onto_gpu_model(tmp_path):
    model = mlp(torch.float16)
    fresh = copy.deepcopy(model).cuda()
    sparseprune.convert(model, "2:4", backend="auto")
    path = tmp_path / "m.safetensors"
    sparseprune.save(model, path)
    sparseprune.load(path, fresh)  # validated on CPU, then moved to the layer's device
    assert fresh[0].values.is_cuda and fresh[0].backend != "cpu"
    x = torch.randn(4, 64, dtype=torch.float16)
    torch.testing.assert_close(fresh(x.cuda()).cpu(), model(x), rtol=2e-2, atol=2e-2)


def test_permuted_llama_round_trip(tmp_path):
    """convert(permute=True) folds channel orders into producers or keeps in_perm: both survive save/load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    fresh = copy.deepcopy(model)
    sparseprune.convert(model, "2:4", exclude=["lm_head"], permute=True, backend="cpu")
    path = tmp_path / "llama.safetensors"
    config = sparseprune.save(model, path)
    assert len(config["layers"]) == 14
    sparseprune.load(path, fresh)
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            other = fresh.get_submodule(name)
            assert (m.in_perm is None) == (other.in_perm is None), name
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
