"""What the vLLM plugin stands on, without vLLM: tensor-parallel cuts of packed weights
(sparseprune.integrations.sharding) and the save_pretrained() directory that load() reads back."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import sparseprune
from sparseprune.formats import FormatError
from sparseprune.integrations import sharding
from sparseprune.modules import SparseLinear
from tests.helpers import assert_matches_reference, call_op, random_weight

KINDS = ["semi24", "bsr", "hybrid"]


# --- sharding ----------------------------------------------------------------------------------------
def _cuts(size, align, parts):
    step = size // parts
    assert step % align == 0
    return [(i * step, (i + 1) * step) for i in range(parts)]


@pytest.mark.parametrize("kind", KINDS)
def test_take_rows_and_cols_match_dense_slices(kind):
    # 96 x 208: rows split in 3 (32 = 2 blocks of 16); columns in 13 (16 = one block) and, for 2:4,
    # in 2 and 4 (52 columns: cuts at 52 and 156 fall inside a metadata byte, 2 groups per byte).
    packed, dense = random_weight(kind, 96, 208, block=(16, 16), density=0.5)
    align_c = sharding.alignment(kind, (16, 16), "cols")
    for parts in (1, 13) if kind != "semi24" else (2, 4, 13):
        for start, stop in _cuts(208, align_c, parts):
            piece = sharding.take_cols(packed, start, stop)
            piece.validate()
            assert torch.equal(piece.to_dense().float(), dense[:, start:stop])
            x = torch.randn(3, stop - start)
            assert_matches_reference(call_op(kind, piece, x), x, dense[:, start:stop])
    for start, stop in _cuts(96, sharding.alignment(kind, (16, 16), "rows"), 3):
        piece = sharding.take_rows(packed, start, stop)
        piece.validate()
        assert torch.equal(piece.to_dense().float(), dense[start:stop])


@pytest.mark.parametrize("kind", KINDS)
def test_cat_rows_is_the_inverse_of_take_rows(kind):
    a, da = random_weight(kind, 48, 64, block=(16, 16))
    b, db = random_weight(kind, 32, 64, block=(16, 16))
    both = sharding.cat_rows([sharding.take_rows(a, 16, 48), b])
    both.validate()
    assert torch.equal(both.to_dense().float(), torch.cat([da[16:48], db]))


@pytest.mark.parametrize("kind", KINDS)
def test_misaligned_cuts_raise(kind):
    packed, _ = random_weight(kind, 64, 64, block=(16, 16))
    bad_col = 2 if kind == "semi24" else 8
    with pytest.raises(FormatError, match="multiples of"):
        sharding.take_cols(packed, 0, bad_col)
    if kind != "semi24":  # any row works for 2:4
        with pytest.raises(FormatError, match="multiples of 16"):
            sharding.take_rows(packed, 8, 64)
    assert sharding.can_split(kind, (16, 16), "rows", 64, 4) == (kind == "semi24" or 64 // 4 % 16 == 0)
    assert not sharding.can_split(kind, (16, 16), "cols", 64, 3)  # 64 does not split in 3


# --- save_pretrained / load(dir) -------------------------------------------------------------------
def tiny_tokenizer(vocab_size):
    """An offline word-level tokenizer ("w0".."w<n-1>"), as transformers would ship one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2",
                                   pad_token="w0")


def small_llama(layers=2, tie=False, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("pattern,kw", [("2:4", dict(permute=True)), ("block", dict(sparsity=0.5, block_size=(16, 16))),
                                        ("hybrid", dict(sparsity=0.5, block_size=(16, 16)))],
                         ids=["2:4", "block", "hybrid"])
def test_save_pretrained_round_trip(tmp_path, pattern, kw):
    model = small_llama()
    sparseprune.convert(model, pattern, exclude=["lm_head"], backend="cpu", **kw)
    tok = tiny_tokenizer(96)
    qc = sparseprune.save_pretrained(model, tmp_path, tokenizer=tok)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == json.loads(json.dumps(qc))
    assert qc["quant_method"] == "sparseprune" and qc["format"] == "sparseprune" and qc["version"] == 1
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    name = "model.layers.0.mlp.up_proj"
    assert qc["layers"][name]["kind"] == {"2:4": "semi24", "block": "bsr", "hybrid": "hybrid"}[pattern]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt"
    assert f"{name}.values" in keys and f"{name}.weight" not in keys and "lm_head.weight" in keys

    loaded = sparseprune.load(tmp_path)  # builds the model from config.json
    assert isinstance(loaded.get_submodule(name), SparseLinear)
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path)("w5 w7").input_ids == [5, 7]


def test_shards_tied_weights_and_stale_files(tmp_path):
    model = small_llama(layers=2, tie=True)
    sparseprune.convert(model, "2:4", backend="cpu")
    (tmp_path / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    qc = sparseprune.save_pretrained(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == shards
    assert "lm_head.weight" in qc["aliases"] and "lm_head.weight" not in index["weight_map"]
    loaded = sparseprune.load(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tokenizer_files_come_with_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    src, out = tmp_path / "src", tmp_path / "out"
    model = small_llama(layers=1)
    model.save_pretrained(src)
    tiny_tokenizer(96).save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    sparseprune.convert(model, "2:4", exclude=["lm_head"], backend="cpu")
    sparseprune.save_pretrained(model, out)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_bad_directories_are_refused(tmp_path):
    model = small_llama(layers=1)
    sparseprune.convert(model, "2:4", exclude=["lm_head"], backend="cpu")
    sparseprune.save_pretrained(model, tmp_path)
    with pytest.raises(TypeError, match="save_pretrained needs a transformers model"):
        sparseprune.save_pretrained(torch.nn.Linear(4, 4), tmp_path / "x")
    with pytest.raises(TypeError, match="single-file checkpoint"):
        sparseprune.load(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        sparseprune.load(tmp_path)
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no quantization_config with quant_method='sparseprune'"):
        sparseprune.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        sparseprune.load(tmp_path / "empty")
