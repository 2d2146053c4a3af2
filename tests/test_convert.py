"""convert(): outputs equal the masked dense model's, on an MLP and on real transformers models."""

import copy

import pytest
import torch
from torch import nn

import sparseprune
from sparseprune import SparseLinear
from tests.helpers import DTYPE_IDS, has_pattern

PATTERNS = [("2:4", {}), ("block", dict(sparsity=0.5, block_size=(16, 16))),
            ("hybrid", dict(sparsity=0.5, block_size=(16, 16))), ("1:4", {})]


def _mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 32)).to(dtype)


def _pruned_and_converted(model, pattern, kw, backend="cpu", **extra):
    # backend="cpu" pins our kernels; "auto" may measure and keep dense compute for tiny layers
    dense = copy.deepcopy(model)
    sparseprune.prune(dense, pattern, **kw, **extra)
    conv = sparseprune.convert(copy.deepcopy(model), pattern, **kw, backend=backend, **extra)
    return dense, conv


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("pattern,kw", PATTERNS, ids=[p for p, _ in PATTERNS])
def test_mlp_converted_equals_masked_dense(pattern, kw, dtype):
    dense, conv = _pruned_and_converted(_mlp(dtype), pattern, kw)
    rep = conv.sparseprune_report
    assert len(rep.converted) == 3 and all(isinstance(conv[i], SparseLinear) for i in (0, 2, 3))
    for lr in rep.converted:
        assert lr.backend == "cpu" and lr.bytes_ratio < 0.6
    for b in (0, 1, 7):
        x = torch.randn(b, 64).to(dtype)
        torch.testing.assert_close(conv(x), dense(x), **TOL[dtype])
        assert conv(x).dtype == dtype


# Every backend through the public convert(): block shapes the CUDA backend accepts (bh % 16, bw % 32).
BACKEND_PATTERNS = [("2:4", {}), ("block", dict(sparsity=0.75, block_size=(32, 32))),
                    ("hybrid", dict(sparsity=0.5, block_size=(16, 32)))]
BACKENDS = [pytest.param("cpu", "cpu", id="backend=cpu"), pytest.param("triton", "cpu", id="backend=triton-interp"),
            pytest.param("triton", "cuda", id="backend=triton-cuda", marks=pytest.mark.gpu),
            pytest.param("cuda", "cuda", id="backend=cuda", marks=pytest.mark.gpu)]
BACKEND_DTYPES = {"cpu": [torch.float32, torch.bfloat16, torch.float16], "triton": [torch.float16, torch.float32],
                  "cuda": [torch.float16, torch.bfloat16]}


def _inputs(b, k, dtype, device):
    """A contiguous batch, a strided (every other column) one and a 3-d transposed view."""
    yield torch.randn(b, k, dtype=dtype, device=device)
    yield torch.randn(b, 2 * k, dtype=dtype, device=device)[:, ::2]
    yield torch.randn(k, 3, max(b, 1), dtype=dtype, device=device).permute(2, 1, 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("pattern,kw", BACKEND_PATTERNS, ids=[p for p, _ in BACKEND_PATTERNS])
def test_convert_through_every_backend(backend, device, pattern, kw):
    if backend == "triton":
        pytest.importorskip("triton")
    for dtype in BACKEND_DTYPES[backend]:
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 96)).to(device, dtype)
        dense, conv = _pruned_and_converted(model, pattern, kw, backend=backend)
        assert [lr.backend for lr in conv.sparseprune_report.converted] == [backend] * 3
        for i in (0, 2, 3):
            assert isinstance(conv[i], SparseLinear) and conv[i].values.device.type == device
            kind = "nm" if pattern == "2:4" else pattern
            assert has_pattern(dense[i].weight, kind, block=kw.get("block_size"), sparsity=kw.get("sparsity"))
        for b in (0, 1, 5):
            for x in _inputs(b, 64, dtype, device):
                with torch.no_grad():
                    got, want = conv(x), dense(x)
                assert got.dtype == dtype and got.shape == want.shape
                torch.testing.assert_close(got, want, **TOL[dtype])


def test_report_contents_and_text():
    conv = sparseprune.convert(_mlp(), "hybrid", sparsity=0.75, block_size=(32, 32), backend="cpu")
    rep = conv.sparseprune_report
    assert rep["0"].status == "converted" and abs(rep["0"].sparsity - 0.875) < 1e-6
    assert rep["3"].status == "converted"
    text = str(rep)
    assert "hybrid" in text and "0.875" in text


def test_strict_and_bad_arguments():
    m = nn.Sequential(nn.Linear(64, 30), nn.Linear(30, 8))
    conv = sparseprune.convert(copy.deepcopy(m), "2:4")
    assert isinstance(conv[0], SparseLinear) and isinstance(conv[1], nn.Linear)
    assert "not a multiple of 4" in conv.sparseprune_report["1"].reason
    with pytest.raises(ValueError, match="strict=True"):
        sparseprune.convert(copy.deepcopy(m), "2:4", strict=True)
    with pytest.raises(ValueError, match="has no kernels"):
        sparseprune.convert(copy.deepcopy(m), "4:8")
    with pytest.raises(ValueError, match="unknown backend"):
        sparseprune.convert(copy.deepcopy(m), "2:4", backend="fpga")


def test_already_24_weights_are_packed_exactly():
    m = _mlp()
    sparseprune.prune(m, "2:4")
    w = m[0].weight.detach().clone()
    conv = sparseprune.convert(m, "2:4", method="magnitude")
    assert conv.sparseprune_report["0"].status == "packed-as-is"
    assert torch.equal(conv[0].to_dense(), w)


def test_explicit_cpu_backend_and_device_dtype_errors():
    conv = sparseprune.convert(_mlp(), "2:4", backend="cpu")
    assert conv[0].backend == "cpu"
    with pytest.raises(RuntimeError, match="dtype"):
        conv(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="features"):
        conv[0](torch.randn(2, 63))


def test_model_half_converts_packed_values_only():
    conv = sparseprune.convert(_mlp(), "2:4", backend="cpu").to(torch.bfloat16)
    assert conv[0].values.dtype == torch.bfloat16 and conv[0].meta.dtype == torch.uint8
    assert conv(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


transformers = pytest.importorskip("transformers")


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=120, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("pattern,kw", PATTERNS[:3], ids=[p for p, _ in PATTERNS[:3]])
def test_bert_hidden_states_equal_masked_dense(pattern, kw):
    dense, conv = _pruned_and_converted(_bert(), pattern, kw)
    n_lin = sum(isinstance(m, nn.Linear) for m in _bert().modules())
    assert len(conv.sparseprune_report.converted) == n_lin
    ids = torch.randint(0, 120, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        a = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        b = conv(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_llama_logits_equal_and_lm_head_excluded():
    dense, conv = _pruned_and_converted(_llama(), "2:4", {}, exclude=["lm_head"])
    rep = conv.sparseprune_report
    names = [lr.name for lr in rep.converted]
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names
    assert len(names) == 14  # 7 projections x 2 layers
    assert isinstance(conv.model.layers[1].mlp.down_proj, SparseLinear)
    assert isinstance(conv.lm_head, nn.Linear)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


def test_llama_include_glob_on_real_names():
    conv = sparseprune.convert(_llama(), "block", sparsity=0.5, block_size=(16, 16), include=["*.mlp.*"])
    names = {lr.name for lr in conv.sparseprune_report.converted}
    assert names == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
