"""A converted model in serving code: opcheck, torch.compile(fullgraph=True), transformers
generate()/hidden states, several threads at once, and (GPU) CUDA graph capture."""

import copy
import threading

import pytest
import torch
from torch import nn

import sparseprune
from sparseprune import backends
from sparseprune.modules import SparseLinear
from tests.helpers import DTYPE_IDS, random_weight

KINDS = ["semi24", "bsr", "hybrid"]


# --- opcheck -----------------------------------------------------------------------------------
def _op_args(kind, packed, x, bias):
    if kind == "semi24":
        return torch.ops.sparseprune.semi24_linear.default, (x, packed.values, packed.meta, bias)
    if kind == "bsr":
        return torch.ops.sparseprune.bsr_linear.default, (x, packed.values, packed.crow, packed.col, packed.shape[1], bias)
    return torch.ops.sparseprune.hybrid_linear.default, (x, packed.values, packed.meta, packed.crow, packed.col,
                                                         packed.shape[1], bias)


@pytest.mark.parametrize("batch", [0, 1, 5], ids=lambda b: f"batch={b}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind, dtype, with_bias, batch):
    packed, _ = random_weight(kind, 48, 64, dtype, block=(16, 16))
    x = torch.randn(batch, 64).to(dtype)
    bias = torch.randn(48).to(dtype) if with_bias else None
    op, args = _op_args(kind, packed, x, bias)
    torch.library.opcheck(op, args)
    # leading batch dims too
    op, args = _op_args(kind, packed, torch.randn(2, 3, 64).to(dtype), bias)
    torch.library.opcheck(op, args)


# --- torch.compile -----------------------------------------------------------------------------
def small_mlp(pattern, dtype=torch.float32, backend="cpu", device="cpu"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64)).to(device, dtype)
    kw = {} if pattern == "2:4" else dict(sparsity=0.5, block_size=(16, 16))
    return sparseprune.convert(m, pattern, backend=backend, **kw)


PATTERNS = ["2:4", "block", "hybrid"]


@pytest.mark.parametrize("backend", ["cpu", "auto"], ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compile_fullgraph_matches_eager(pattern, backend):
    torch._dynamo.reset()
    model = small_mlp(pattern, backend=backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for b in (1, 7, 100):  # several batch buckets: recompiles guard on the bucket, no graph break
            x = torch.randn(b, 64)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
        x = torch.randn(2, 3, 64)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    model = small_mlp("2:4", backend="cpu")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        x = torch.randn(9, 64)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_compile_auto_dense_buckets_no_graph_break():
    """A layer whose plan mixes sparse and dense buckets still compiles to one graph per bucket."""
    torch._dynamo.reset()
    packed, _ = random_weight("semi24", 32, 64)
    m = SparseLinear(packed, torch.randn(32))
    m._set_plan([backends.get_backend(n) for n in ("cpu", "cpu", "dense", "dense", "dense")])
    m._plan_dtype, m.auto_plan = m.dtype, {}  # a hand-made plan: keep forward from re-measuring
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for b in (1, 3, 20, 600):
            x = torch.randn(b, 64)
            torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)


# --- transformers ------------------------------------------------------------------------------
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", ["cpu", "auto"], ids=lambda b: f"backend={b}")
def test_llama_generate_matches_masked_dense(backend):
    base = tiny_llama()
    masked, sparse = copy.deepcopy(base), copy.deepcopy(base)
    sparseprune.prune(masked, "2:4", exclude=["lm_head"])
    sparseprune.convert(sparse, "2:4", exclude=["lm_head"], backend=backend)
    assert isinstance(sparse.lm_head, nn.Linear)
    assert isinstance(sparse.model.layers[1].mlp.down_proj, SparseLinear)
    assert len(sparse.sparseprune_report.converted) == 14
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-4)
        out_m = masked.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
        out_s = sparse.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(out_s, out_m)


def test_exclude_globs_on_real_module_names():
    model = tiny_llama()
    sparseprune.convert(model, "2:4", exclude=["lm_head", "model.layers.*.self_attn.*"], backend="cpu")
    names = {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert names == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}


def test_llama_generate_under_torch_compile():
    torch._dynamo.reset()
    model = tiny_llama()
    sparseprune.convert(model, "2:4", exclude=["lm_head"], backend="cpu")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        eager_forward = model.forward
        model.forward = torch.compile(model.forward, backend="aot_eager", dynamic=True)
        try:
            out = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        finally:
            model.forward = eager_forward
    assert torch.equal(out, ref)
    # sparseprune's own modules never break the graph, whatever transformers does around them
    mlp = model.model.layers[0].mlp
    explain = torch._dynamo.explain(mlp)(torch.randn(1, 5, 64))
    assert explain.graph_break_count == 0, explain.break_reasons


def test_bert_hidden_states_match_masked_dense():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=128, max_position_embeddings=64)
    base = BertModel(cfg).eval()
    masked, sparse = copy.deepcopy(base), copy.deepcopy(base)
    sparseprune.prune(masked, "2:4", exclude=["pooler.*"])
    sparseprune.convert(sparse, "2:4", exclude=["pooler.*"], backend="cpu")
    assert isinstance(sparse.encoder.layer[0].attention.self.query, SparseLinear)
    assert isinstance(sparse.pooler.dense, nn.Linear)
    ids = torch.randint(0, 128, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        a = masked(ids, attention_mask=mask, output_hidden_states=True)
        b = sparse(ids, attention_mask=mask, output_hidden_states=True)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(hb, ha, rtol=1e-4, atol=1e-4)


# --- threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "auto"], ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_threads_get_single_thread_outputs(pattern, backend):
    model = small_mlp(pattern, backend=backend)
    if backend == "auto":  # untuned modules: the threads race to the first (measuring) call
        for m in model.modules():
            if isinstance(m, SparseLinear):
                m._set_plan(None)
    inputs = [torch.randn(b, 64) for b in (1, 3, 8, 17, 64, 130)] * 3
    with torch.no_grad():
        if backend == "cpu":
            expected = [model(x) for x in inputs]
        errors, results = [], {}

        def work(tid):
            try:
                for i in range(tid % 3, len(inputs)):
                    results[(tid, i)] = model(inputs[i])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        if backend == "auto":
            expected = [model(x) for x in inputs]
    for (tid, i), y in results.items():
        assert torch.equal(y, expected[i]), (tid, i)


# --- GPU ---------------------------------------------------------------------------------------
def gpu_backends():
    if not torch.cuda.is_available():
        return ["cuda-backend"]
    return [b for b in backends.available_backends("cuda") if b != "dense"] or ["none"]


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_graph_capture(pattern):
    model = small_mlp(pattern, torch.float16, backend="auto", device="cuda")
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 2
    static_x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(static_x)  # warm-up (and auto measurement) outside capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = model(static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            g.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(static_y, model(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_compile_fullgraph(pattern, backend):
    if backend == "none":
        pytest.skip("no GPU backend in this build")
    torch._dynamo.reset()
    model = small_mlp(pattern, torch.float16, backend=backend, device="cuda")
    report = model.sparseprune_report
    if not report.converted:
        pytest.skip(f"backend {backend} serves no {pattern} layer here: {report.skipped[0].reason}")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for b in (1, 37, 300):
            x = torch.randn(b, 64, device="cuda", dtype=torch.float16)
            torch.testing.assert_close(compiled(x), model(x), rtol=2e-3, atol=2e-3)
