"""Triton kernels against their plain-torch references: every op, every autotune config.

Without CUDA (CI) the kernels run on CPU tensors under the Triton interpreter: this module sets
TRITON_INTERPRET=1 before triton is imported (it must be set before the first `import triton` in
the process; tests/test_triton_aot.py compiles in subprocesses, so it is unaffected). bf16 runs
with the kernels' interpreter-only UPCAST flag (Triton 3.9's interpreter returns garbage for
tl.dot on bf16 operands). On a CUDA machine the same tests run on the GPU (marked `gpu`), plus
CUDA-graph capture and torch.compile(fullgraph=True) of SparseLinear(backend="triton").
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from sparseprune.modules import SparseLinear  # noqa: E402
from sparseprune.triton import _common, bsr, hybrid, semi24  # noqa: E402
from tests.helpers import DTYPE_IDS, assert_matches_reference, random_weight  # noqa: E402

DEVICES = [pytest.param("cpu", id="dev=interp"), pytest.param("cuda", id="dev=cuda", marks=pytest.mark.gpu)]
TEST_DTYPES = [torch.float16, torch.float32, torch.bfloat16]
KINDS = ("semi24", "bsr", "hybrid")
MODULES = {"semi24": semi24, "bsr": bsr, "hybrid": hybrid}


@pytest.fixture(params=DEVICES)
def device(request):
    dev = request.param
    if dev == "cpu":
        why = _common.unavailable_reason("cpu")
        if why is not None:
            if torch.cuda.is_available():  # GPU machine running without the interpreter: CPU path not under test
                pytest.skip(why)
            pytest.fail(f"interpreter tests cannot run: {why}")
    return dev


def _forward(kind, packed, x, bias, config=None):
    if kind == "semi24":
        return semi24.semi24_forward(x, packed.values, packed.meta, bias, config=config)
    if kind == "bsr":
        return bsr.bsr_forward(x, packed.values, packed.crow, packed.col, packed.shape[1], bias, config=config)
    return hybrid.hybrid_forward(x, packed.values, packed.meta, packed.crow, packed.col, packed.shape[1], bias,
                                 config=config)


def _op(kind, packed, x, bias):
    ops = torch.ops.sparseprune
    if kind == "semi24":
        return ops.triton_semi24(x, packed.values, packed.meta, bias)
    if kind == "bsr":
        return ops.triton_bsr(x, packed.values, packed.crow, packed.col, packed.shape[1], bias)
    return ops.triton_hybrid(x, packed.values, packed.meta, packed.crow, packed.col, packed.shape[1], bias)


def _to(packed, device):
    return type(packed)(shape=packed.shape, **{k: v.to(device) for k, v in packed.tensors().items()})


def _check(y, x, wd, bias):
    assert_matches_reference(y.cpu(), x.cpu(), wd, None if bias is None else bias.cpu())


# (N, K, block): odd but valid sizes next to aligned ones. Semi24 K % 8 == 4 exercises the pad nibble.
CASES = {
    "semi24": [(40, 76, None), (16, 32, None), (33, 200, None)],
    "bsr": [(64, 96, (16, 32)), (48, 36, (16, 4)), (96, 144, (48, 48)), (128, 256, (64, 64))],
    "hybrid": [(48, 40, (16, 8)), (96, 144, (48, 48)), (128, 256, (64, 64))],
}
ALL_CASES = [(k, c) for k in KINDS for c in CASES[k]]


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=[f"{k}-{c[0]}x{c[1]}" + (f"b{c[2][0]}x{c[2][1]}" if c[2] else "")
                                                      for k, c in ALL_CASES])
def test_kernel_matches_reference(device, kind, case, dtype):
    n, k, block = case
    packed, wd = random_weight(kind, n, k, dtype, block=block or (32, 32), density=0.5)
    packed = _to(packed, device)
    batches = [0, 1, 3, 37] + ([16, 129, 4099] if device == "cuda" else [])
    for b in batches:
        x = torch.randn(b, k).to(dtype).to(device)
        bias = torch.randn(n).to(dtype).to(device) if b % 2 else None
        y = _forward(kind, packed, x, bias)
        assert y.dtype == dtype and y.device.type == device
        _check(y, x, wd, bias)


@pytest.mark.parametrize("kind", KINDS)
def test_op_matches_reference_function(device, kind):
    """The registered torch op, with a leading batch shape, against the file's own `_reference`."""
    n, k, block = CASES[kind][0]
    packed, wd = random_weight(kind, n, k, torch.float16, block=block or (32, 32), density=0.5)
    packed = _to(packed, device)
    x = torch.randn(2, 3, 5, k).half().to(device)
    bias = torch.randn(n).half().to(device)
    y = _op(kind, packed, x, bias)
    assert y.shape == (2, 3, 5, n) and y.dtype == torch.float16
    t = packed.tensors()
    args = {"semi24": lambda: (t["values"], t["meta"]), "bsr": lambda: (t["values"], t["crow"], t["col"], k),
            "hybrid": lambda: (t["values"], t["meta"], t["crow"], t["col"], k)}[kind]()
    ref = MODULES[kind]._reference(x, *args, bias)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    _check(y.reshape(-1, n), x.reshape(-1, k), wd, bias)


# ------------------------------------------------------------------------------------------------
# Every autotune config, launched directly (bypassing autotune), against the reference.
# ------------------------------------------------------------------------------------------------
SEMI24_CFGS = [(b, i) for b, cs in semi24.SEMI24_CONFIGS.items() for i in range(len(cs))]


@pytest.mark.parametrize("bucket,idx", SEMI24_CFGS, ids=[f"{b}[{i}]" for b, i in SEMI24_CFGS])
def test_semi24_every_config(device, bucket, idx):
    cfg = semi24.SEMI24_CONFIGS[bucket][idx]
    bn, bm, bk, gm = (cfg.kwargs[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "GROUP_M"))
    # Several weight tiles, a ragged last K chunk (K % 8 == 4) and, with GROUP_M > 1, two groups of
    # token tiles, the second one partial.
    n, k = 2 * bn + 8, bk + 76
    packed, wd = random_weight("semi24", n, k, torch.float16)
    packed = _to(packed, device)
    for m in sorted({1, 37, gm * bm + 37 if gm > 1 else 2 * bm + 5}):
        x = torch.randn(m, k).half().to(device)
        bias = torch.randn(n).half().to(device)
        _check(semi24.semi24_forward(x, packed.values, packed.meta, bias, config=cfg), x, wd, bias)


BLOCK_CFGS = [(kind, b, i, blk)
              for kind, mod, lists in (("bsr", bsr, bsr.BSR_CONFIGS), ("hybrid", hybrid, hybrid.HYBRID_CONFIGS))
              for blk in [(64, 64), (16, 16), (128, 32), (32, 128), (48, 40)]
              for b in lists for i in range(len(mod.configs_for(b, blk)))]


@pytest.mark.parametrize("kind,bucket,idx,block", BLOCK_CFGS,
                         ids=[f"{k}-{b}[{i}]-{bl[0]}x{bl[1]}" for k, b, i, bl in BLOCK_CFGS])
def test_block_every_config(device, kind, bucket, idx, block):
    mod = MODULES[kind]
    cfg = mod.configs_for(bucket, block)[idx]
    bh, bw = block
    n, k = 3 * bh, 3 * bw
    packed, wd = random_weight(kind, n, k, torch.float16, block=block, density=0.6)
    packed = _to(packed, device)
    for m in (1, 2 * cfg.kwargs["BLOCK_M"] + 5):
        x = torch.randn(m, k).half().to(device)
        bias = torch.randn(n).half().to(device)
        _check(_forward(kind, packed, x, bias, config=cfg), x, wd, bias)


def test_config_lists_cover_every_bucket():
    for lists in (semi24.SEMI24_CONFIGS, bsr.BSR_CONFIGS, hybrid.HYBRID_CONFIGS):
        assert set(lists) == {"gemv", "small", "large"} and all(lists.values())
    assert [_common.token_bucket(m) for m in (1, 16, 17, 128, 129, 8192)] == ["gemv"] * 2 + ["small"] * 2 + ["large"] * 2
    assert [_common.token_key(m) for m in (0, 1, 3, 16, 17, 8192, 10**6)] == [1, 1, 4, 16, 32, 8192, 16384]


# ------------------------------------------------------------------------------------------------
# Module path, structure edge cases, refusals
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_linear_triton_backend(device, kind, dtype):
    packed, wd = random_weight(kind, 64, 128, dtype, block=(16, 32), density=0.5)
    bias = torch.randn(64).to(dtype)
    mod = SparseLinear(_to(packed, device), bias.to(device), backend="triton")
    assert mod.backend == "triton"
    x = torch.randn(3, 5, 128).to(dtype).to(device)
    y = mod(x)
    assert y.shape == (3, 5, 64) and y.dtype == dtype
    _check(y.reshape(15, 64), x.reshape(15, 128), wd, bias)


@pytest.mark.parametrize("kind", ["bsr", "hybrid"])
def test_empty_block_rows_and_empty_weight(device, kind):
    packed, wd = random_weight(kind, 64, 64, torch.float16, block=(16, 16), density=0.0)
    assert packed.nnzb == 0
    packed = _to(packed, device)
    x = torch.randn(5, 64).half().to(device)
    bias = torch.randn(64).half().to(device)
    _check(_forward(kind, packed, x, bias), x, wd, bias)
    _check(_forward(kind, packed, x, None), x, wd, None)


def test_refusals_name_the_problem(device):
    packed, _ = random_weight("semi24", 16, 32, torch.float16)
    packed = _to(packed, device)
    x = torch.randn(2, 32, device=device)
    with pytest.raises(TypeError, match="float16"):
        semi24.semi24_forward(x, packed.values, packed.meta)  # fp32 x, fp16 weight
    with pytest.raises(ValueError, match="input features"):
        semi24.semi24_forward(torch.randn(2, 30, device=device).half(), packed.values, packed.meta)
    with pytest.raises(ValueError, match="bias"):
        semi24.semi24_forward(x.half(), packed.values, packed.meta, torch.zeros(3, device=device).half())
    with pytest.raises(TypeError, match="supported"):
        semi24.semi24_forward(x.double(), packed.values.double(), packed.meta)
    b, _ = random_weight("bsr", 32, 32, torch.float16, block=(16, 16))
    with pytest.raises(ValueError, match="int32"):
        bsr.bsr_forward(x.half(), b.values.to(device), b.crow.long().to(device), b.col.to(device), 32)
    big = torch.zeros(1, 16, 256, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="block shape"):
        bsr.bsr_forward(torch.zeros(1, 256, dtype=torch.float16, device=device), big,
                        torch.tensor([0, 1], dtype=torch.int32, device=device),
                        torch.tensor([0], dtype=torch.int32, device=device), 256)


def test_unavailable_reasons():
    assert "cpu" not in (_common.unavailable_reason("meta") or "cpu").split()  # a reason for meta
    assert "not meta" in _common.unavailable_reason("meta")
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available" in _common.unavailable_reason("cuda")


def test_fake_tensor_shapes():
    """The op's fake (the launcher run on FakeTensors) gives shape/dtype without launching."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed, _ = random_weight("hybrid", 64, 128, torch.float16, block=(16, 32))
    with FakeTensorMode() as mode:
        f = {k: mode.from_tensor(v) for k, v in packed.tensors().items()}
        x = torch.empty(4, 7, 128, dtype=torch.float16)
        y = torch.ops.sparseprune.triton_hybrid(x, f["values"], f["meta"], f["crow"], f["col"], 128, None)
    assert y.shape == (4, 7, 64) and y.dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# GPU only: CUDA graphs and torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_capture(kind):
    packed, wd = random_weight(kind, 256, 512, torch.float16, block=(64, 64), density=0.3, device="cuda")
    bias = torch.randn(256, device="cuda").half()
    mod = SparseLinear(packed, bias, backend="triton")
    x = torch.randn(8, 512, device="cuda").half()
    mod(x)  # autotune outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mod(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    _check(y, x, wd.cpu(), bias)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind):
    packed, wd = random_weight(kind, 256, 512, torch.float16, block=(64, 64), density=0.3, device="cuda")
    bias = torch.randn(256, device="cuda").half()
    mod = SparseLinear(packed, bias, backend="triton")
    x = torch.randn(2, 9, 512, device="cuda").half()
    compiled = torch.compile(mod, fullgraph=True)
    y = compiled(x)
    _check(y.reshape(18, 256), x.reshape(18, 512), wd.cpu(), bias)
    torch.testing.assert_close(y, mod(x), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    packed, _ = random_weight(kind, 64, 128, torch.float16, block=(16, 32), device="cuda")
    x = torch.randn(3, 128, device="cuda").half()
    bias = torch.randn(64, device="cuda").half()
    t = packed.tensors()
    args = {"semi24": lambda: (x, t["values"], t["meta"], bias),
            "bsr": lambda: (x, t["values"], t["crow"], t["col"], 128, bias),
            "hybrid": lambda: (x, t["values"], t["meta"], t["crow"], t["col"], 128, bias)}[kind]()
    torch.library.opcheck(getattr(torch.ops.sparseprune, f"triton_{kind}").default, args)
