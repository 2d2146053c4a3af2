"""compressed-tensors "sparse-24-bitmask" interop: layout checked against an independent numpy
encoder/decoder (numpy.packbits, little bit order, as llm-compressor writes it), round trips with
real safetensors files and config.json, and malformed tensors refused by name."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparseprune
from sparseprune.compressed_tensors import (load_compressed_tensors, pack_bitmask, save_compressed_tensors,
                                            semi24_from_bitmask, unpack_bitmask)
from sparseprune.formats import FormatError, Semi24Weight
from sparseprune.modules import SparseLinear


def np_compress(w: torch.Tensor):
    """What llm-compressor stores for a 2:4 weight: top-2 |w| per group of 4, packbits little."""
    n, k = w.shape
    idx = w.reshape(-1, 4).abs().topk(2, dim=1).indices
    mask = torch.zeros(n * k // 4, 4, dtype=torch.bool).scatter_(1, idx, True).reshape(n, k)
    return {"shape": torch.tensor([n, k]).reshape(-1, 1), "compressed": w[mask].reshape(n, k // 2),
            "bitmask": torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))}


def np_decompress(shape, compressed, bitmask):
    n, k = shape.reshape(-1).tolist()
    mask = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=k, bitorder="little").astype(bool))
    out = torch.zeros(n, k, dtype=compressed.dtype)
    out[mask] = compressed.reshape(-1)
    return out


def masked_24(n, k, dtype=torch.float32):
    from tests.helpers import random_24_mask

    return (torch.randn(n, k) * random_24_mask(n, k)).to(dtype)


@pytest.mark.parametrize("k", [8, 12, 36, 64, 100])
def test_bitmask_matches_numpy_packbits(k):
    mask = torch.rand(7, k) < 0.5
    ref = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert torch.equal(pack_bitmask(mask), torch.from_numpy(ref))
    got, pad = unpack_bitmask(torch.from_numpy(ref), k)
    assert torch.equal(got, mask) and not pad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("k", [36, 64])
def test_layer_both_ways(dtype, k):
    w = masked_24(24, k, dtype)
    parts = np_compress(w)
    packed = semi24_from_bitmask(parts["shape"], parts["compressed"], parts["bitmask"], name="l")
    assert torch.equal(packed.to_dense(), w)
    from sparseprune.compressed_tensors import semi24_to_bitmask

    back = semi24_to_bitmask(Semi24Weight.from_dense(w))
    assert back["shape"].dtype == torch.int64 and tuple(back["shape"].shape) == (2, 1)
    assert back["bitmask"].dtype == torch.uint8 and back["compressed"].dtype == dtype
    assert torch.equal(np_decompress(**back), w)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def write_llm_compressor_checkpoint(model, out_dir, ignore=("lm_head",)):
    """A checkpoint as llm-compressor lays it out, written without sparseprune's exporter."""
    tensors = {}
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for key, t in model.state_dict().items():
        prefix = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and prefix in linear_names and prefix not in ignore:
            for part, v in np_compress(t).items():
                tensors[f"{prefix}.{part}"] = v.contiguous()
        else:
            tensors[key] = t.contiguous()
    out_dir.mkdir()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "sparsity_config": {
        "format": "sparse-24-bitmask", "global_sparsity": 0.4, "ignore": list(ignore),
        "registry_requires_subclass": False, "sparsity_structure": "2:4", "targets": ["Linear"]}}
    (out_dir / "config.json").write_text(json.dumps(cfg))


def test_import_llm_compressor_llama(tmp_path):
    pruned = tiny_llama()
    sparseprune.prune(pruned, "2:4", exclude=["lm_head"])
    write_llm_compressor_checkpoint(pruned, tmp_path / "ct")
    fresh = tiny_llama()
    load_compressed_tensors(tmp_path / "ct", fresh, backend="cpu")
    assert isinstance(fresh.model.layers[0].mlp.up_proj, SparseLinear)
    assert isinstance(fresh.lm_head, nn.Linear)
    assert len(fresh.sparseprune_report.layers) == 14
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, pruned(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_then_import_round_trip(tmp_path):
    model = tiny_llama()
    sparseprune.convert(model, "2:4", exclude=["lm_head"], backend="cpu")
    sc = save_compressed_tensors(model, tmp_path / "out")
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    assert sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"] and 0 < sc["global_sparsity"] <= 0.5
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["quantization_config"]["sparsity_config"] == sc and cfg["model_type"] == "llama"
    # layout an llm-compressor reader decodes: dense weight == our layer's dense weight
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.1.self_attn.k_proj"
        dense = np_decompress(*(f.get_tensor(f"{prefix}.{p}") for p in ("shape", "compressed", "bitmask")))
    assert torch.equal(dense, model.get_submodule(prefix).to_dense())
    assert "lm_head.weight" in keys and f"{prefix}.weight" not in keys
    assert not any(k.endswith((".values", ".meta")) for k in keys)

    fresh = tiny_llama()
    load_compressed_tensors(tmp_path / "out", fresh, backend="cpu")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_export_hybrid_and_bsr_layers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    sparseprune.convert(model, "hybrid", sparsity=0.5, block_size=(16, 16), backend="cpu", include=["0"])
    sparseprune.convert(model, "block", sparsity=0.5, block_size=(16, 16), backend="cpu", include=["1"])
    sc = save_compressed_tensors(model, tmp_path / "o", config={})
    assert sc["ignore"] == ["1"]  # hybrid is 2:4 inside: exported compressed; bsr stays dense
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    load_compressed_tensors(tmp_path / "o", fresh, backend="cpu")
    assert isinstance(fresh[0], SparseLinear) and isinstance(fresh[1], nn.Linear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), model(x))


def _layer_files(tmp_path, mutate):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(36, 16))
    with torch.no_grad():
        model[0].weight.copy_(masked_24(16, 36))
    tensors = {f"0.{p}": v for p, v in np_compress(model[0].weight.detach()).items()}
    tensors["0.bias"] = model[0].bias.detach().clone()
    mutate(tensors)
    d = tmp_path / "ck"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"quantization_config": {"sparsity_config": {
        "format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": []}}}))
    return d, nn.Sequential(nn.Linear(36, 16))


def _flip(key, idx, bit):
    def m(t):
        t[key][idx] ^= bit
    return m


BAD = [
    ("three-bits-in-group", lambda t: t["0.bitmask"].__setitem__((0, 0), 0b0111), r"0\.bitmask row 0, group 0 marks 3"),
    ("pad-bits", lambda t: t["0.bitmask"].__setitem__((0, 4), t["0.bitmask"][0, 4] | 0x80), r"0\.bitmask has bits set past"),
    ("compressed-truncated", lambda t: t.__setitem__("0.compressed", t["0.compressed"][:, :-1].clone()),
     r"0\.compressed has shape"),
    ("compressed-int", lambda t: t.__setitem__("0.compressed", t["0.compressed"].to(torch.int32)), r"0\.compressed must be"),
    ("bitmask-wrong-shape", lambda t: t.__setitem__("0.bitmask", t["0.bitmask"][:-1].clone()), r"0\.bitmask has shape"),
    ("bitmask-float", lambda t: t.__setitem__("0.bitmask", t["0.bitmask"].float()), r"0\.bitmask must be uint8"),
    ("shape-mismatch", lambda t: t.__setitem__("0.shape", torch.tensor([[16], [40]])), r"0\.shape = \(16, 40\)"),
    ("shape-float", lambda t: t.__setitem__("0.shape", torch.tensor([[16.0], [36.0]])), r"0\.shape must be an integer"),
    ("missing-bitmask-part", lambda t: t.pop("0.compressed"), r"0\.compressed: missing"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_malformed_layers_are_refused(tmp_path, case):
    _, mutate, msg = case
    d, fresh = _layer_files(tmp_path, mutate)
    with pytest.raises(ValueError, match=msg):
        load_compressed_tensors(d, fresh)
    assert isinstance(fresh[0], nn.Linear)


def test_good_layer_and_config_errors(tmp_path):
    d, fresh = _layer_files(tmp_path, lambda t: None)
    load_compressed_tensors(d, fresh, backend="cpu")
    assert isinstance(fresh[0], SparseLinear)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["sparsity_config"]["format"] = "sparse-bitmask"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'sparse-bitmask' is not supported"):
        load_compressed_tensors(d, nn.Sequential(nn.Linear(36, 16)))
    (d / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(ValueError, match="no sparsity_config"):
        load_compressed_tensors(d, nn.Sequential(nn.Linear(36, 16)))
    with pytest.raises(FormatError):
        semi24_from_bitmask(torch.tensor([4, 6]), torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.uint8))
