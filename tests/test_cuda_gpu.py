"""CUDA backend kernels on a GPU, against the plain-torch references (skipped cleanly without CUDA).

benchmarks/gpu_suite.sh sets SPARSEPRUNE_REQUIRE_CUDA=1: there a GPU machine without a usable CUDA backend fails
these tests instead of skipping them, and it runs test_sanitizer_run under compute-sanitizer.
"""

import os

import pytest
import torch

from sparseprune.formats import BlockSparseWeight, HybridWeight, Semi24Weight
from sparseprune.modules import SparseLinear
from tests.helpers import DTYPE_IDS, assert_matches_reference, random_24_mask, random_block_mask, random_weight

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]
BATCHES = [0, 1, 3, 8, 37, 256, 4099]
SEMI_SHAPES = [(16, 32), (100, 36), (37, 4), (256, 1000), (4096, 512), (130, 4096)]
BSR_SHAPES = [(64, 64, (16, 32)), (96, 128, (32, 32)), (256, 512, (64, 64)), (48, 96, (16, 96))]
HYBRID_SHAPES = BSR_SHAPES + [(192, 320, (64, 64)), (64, 4096, (32, 64))]


def _cuda():
    import sparseprune.cuda as c

    why = c.CudaBackend().unavailable_reason(torch.device("cuda"))
    if why:
        if os.environ.get("SPARSEPRUNE_REQUIRE_CUDA") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return c


def _semi(n, k, dtype):
    w = (torch.randn(n, k, device="cuda") * random_24_mask(n, k, "cuda")).to(dtype)
    return w


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("n,k", SEMI_SHAPES, ids=lambda v: str(v))
def test_semi24_matches_reference(n, k, dtype):
    c = _cuda()
    w = _semi(n, k, dtype)
    v, m = c.pack_semi24_sm80(w)
    for b in BATCHES:
        x = torch.randn(b, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype) if b % 2 else None
        y = c.cuda_semi24_linear(x, v, m, k, n, bias)
        assert_matches_reference(y.cpu(), x.cpu(), w.float().cpu(), None if bias is None else bias.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
def test_gpu_packer_matches_cpu_packer(dtype):
    c = _cuda()
    for n, k in SEMI_SHAPES:
        w = _semi(n, k, dtype)
        vg, mg = c.pack_semi24_sm80(w)
        vc, mc = c.pack_semi24_sm80(w.cpu())
        assert torch.equal(vg.cpu().view(torch.int16), vc.view(torch.int16)) and torch.equal(mg.cpu(), mc)
    with pytest.raises(RuntimeError, match="not 2:4"):
        c.pack_semi24_sm80(torch.ones(16, 32, device="cuda", dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("n,k,block", BSR_SHAPES, ids=lambda v: str(v))
def test_bsr_matches_reference(n, k, block, dtype):
    c = _cuda()
    for density in (0.0, 0.3, 1.0):
        w = torch.randn(n, k).to(dtype)
        p = BlockSparseWeight.from_dense(w, block, random_block_mask(n, k, block, density))
        wd = p.to_dense().float()
        vals, crow, col = p.values.cuda(), p.crow.cuda(), p.col.cuda()
        for b in BATCHES:
            x = torch.randn(b, k).to(dtype)
            bias = torch.randn(n).to(dtype) if b % 2 else None
            y = c.cuda_bsr_linear(x.cuda(), vals, crow, col, k, None if bias is None else bias.cuda())
            assert_matches_reference(y.cpu(), x, wd, bias)


@pytest.fixture
def poisoned(monkeypatch):
    # unwritten output elements stay NaN and fail assert_matches_reference
    monkeypatch.setenv("SPARSEPRUNE_POISON", "1")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("n,k,block", HYBRID_SHAPES, ids=lambda v: str(v))
def test_hybrid_matches_reference(n, k, block, dtype, poisoned):
    c = _cuda()
    for density in (0.0, 0.25, 1.0):
        p, wd = random_weight("hybrid", n, k, dtype, block=block, density=density)
        v, m = c.pack_hybrid_sm80(p)
        vg, mg = c.pack_hybrid_sm80(HybridWeight(shape=p.shape, values=p.values.cuda(), meta=p.meta.cuda(),
                                                 crow=p.crow.cuda(), col=p.col.cuda()))
        assert torch.equal(vg.cpu().view(torch.int16), v.view(torch.int16)) and torch.equal(mg.cpu(), m)
        crow, col = p.crow.cuda(), p.col.cuda()
        for b in BATCHES:
            x = torch.randn(b, k).to(dtype)
            bias = torch.randn(n).to(dtype) if b % 2 else None
            y = c.cuda_hybrid_linear(x.cuda(), vg, mg, crow, col, k, None if bias is None else bias.cuda())
            assert_matches_reference(y.cpu(), x, wd, bias)


@pytest.mark.parametrize("kind", ["bsr", "hybrid"])
def test_corrupt_indices_never_read_out_of_bounds(kind):
    # crow/col that slipped past validation: the kernels clamp crow and skip bad col without a host sync.
    c = _cuda()
    n, k, block = 128, 256, (32, 64)
    p, _ = random_weight(kind, n, k, torch.float16, block=block, density=1.0)
    crow, col = p.crow.clone(), p.col.clone()
    col[0], col[1] = -3, k // block[1] + 7  # outside [0, K/bw)
    crow[2] = 10**6  # past nnzb: clamped
    x = torch.randn(4, k, device="cuda").half()
    if kind == "bsr":
        y = c.cuda_bsr_linear(x, p.values.cuda(), crow.cuda(), col.cuda(), k)
    else:
        v, m = c.pack_hybrid_sm80(p)
        y = c.cuda_hybrid_linear(x, v.cuda(), m.cuda(), crow.cuda(), col.cuda(), k)
    torch.cuda.synchronize()  # an out-of-bounds read would surface here (run under compute-sanitizer too)
    assert y.shape == (4, n) and torch.isfinite(y).all()


def test_refusals_name_what_is_missing():
    c = _cuda()
    w = _semi(32, 64, torch.float16)
    v, m = c.pack_semi24_sm80(w)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        c.cuda_semi24_linear(torch.randn(2, 64, device="cuda"), v, m, 64, 32)
    with pytest.raises(RuntimeError, match="values must be"):
        c.cuda_semi24_linear(torch.randn(2, 128, device="cuda").half(), v, m, 128, 32)
    # in_features is checked, not just ceil(K/32): 60 and 64 features pack to the same 2 tiles of 32
    with pytest.raises(RuntimeError, match="x has 60 features, the weight expects 64"):
        c.cuda_semi24_linear(torch.randn(2, 60, device="cuda").half(), v, m, 64, 32)
    # cp.async sources must be 16-byte aligned: a view at an odd offset is refused, not read misaligned
    v_odd = torch.empty(v.numel() + 1, device="cuda", dtype=v.dtype)[1:].view_as(v).copy_(v)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        c.cuda_semi24_linear(torch.randn(2, 64, device="cuda").half(), v_odd, m, 64, 32)
    s = Semi24Weight.from_dense(torch.randn(32, 64) * random_24_mask(32, 64))
    assert "dtype" in c.CudaBackend().unsupported_reason(s, torch.device("cuda"))
    p = BlockSparseWeight.from_dense(torch.randn(32, 64).half(), (8, 8))
    assert "bh % 16" in c.CudaBackend().unsupported_reason(p, torch.device("cuda"))
    h, _ = random_weight("hybrid", 32, 64, torch.float16, block=(16, 16))
    assert "bw % 32" in c.CudaBackend().unsupported_reason(h, torch.device("cuda"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_sparse_linear_compile_and_graph(kind, dtype):
    _cuda()
    n, k = 256, 512
    w = torch.randn(n, k).to(dtype)
    if kind == "semi24":
        p = Semi24Weight.from_dense(w * random_24_mask(n, k))
    elif kind == "bsr":
        p = BlockSparseWeight.from_dense(w, (64, 64), random_block_mask(n, k, (64, 64), 0.3))
    else:
        p = HybridWeight.from_dense(w * random_24_mask(n, k), (64, 64), random_block_mask(n, k, (64, 64), 0.3))
    wd = p.to_dense().float()
    bias = torch.randn(n).to(dtype)
    mod = SparseLinear(p, bias, backend="cpu").cuda().set_backend("cuda")
    assert mod.backend == "cuda"
    x = torch.randn(5, 7, k, device="cuda").to(dtype)
    assert_matches_reference(mod(x).cpu(), x.cpu(), wd, bias)
    comp = torch.compile(mod, fullgraph=True)
    assert_matches_reference(comp(x).cpu(), x.cpu(), wd, bias)
    xs = torch.randn(3, k, device="cuda").to(dtype)  # small batch: split-K path and its workspace
    mod(xs)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ys = mod(xs)
    xs.copy_(torch.randn(3, k, device="cuda").to(dtype))
    g.replay()
    torch.cuda.synchronize()
    assert_matches_reference(ys.cpu(), xs.cpu(), wd, bias)


def test_opcheck():
    c = _cuda()
    w = _semi(64, 128, torch.float16)
    v, m = c.pack_semi24_sm80(w)
    x = torch.randn(4, 128, device="cuda").half()
    torch.library.opcheck(torch.ops.sparseprune.cuda_semi24_linear.default, (x, v, m, 128, 64, None))
    p = BlockSparseWeight.from_dense(torch.randn(64, 128).half(), (32, 32))
    torch.library.opcheck(torch.ops.sparseprune.cuda_bsr_linear.default,
                          (x, p.values.cuda(), p.crow.cuda(), p.col.cuda(), 128, None))
    h, _ = random_weight("hybrid", 64, 128, torch.float16, block=(32, 64), density=0.5)
    hv, hm = c.pack_hybrid_sm80(h)
    torch.library.opcheck(torch.ops.sparseprune.cuda_hybrid_linear.default,
                          (x, hv.cuda(), hm.cuda(), h.crow.cuda(), h.col.cuda(), 128, None))


def test_sanitizer_run():
    # the short run benchmarks/gpu_suite.sh puts under compute-sanitizer memcheck and racecheck: every kernel family
    # with split-K (decode on a long K) and without (a batch whose CTAs fill the GPU), and the GPU packer
    c = _cuda()
    dt = torch.float16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b, n, k in ((3, 256, 2048), (64 * sms, 64, 64)):
        w = _semi(n, k, dt)
        v, m = c.pack_semi24_sm80(w)
        x = torch.randn(b, k, device="cuda").to(dt)
        assert_matches_reference(c.cuda_semi24_linear(x, v, m, k, n).cpu(), x.cpu(), w.float().cpu())
    for kind in ("bsr", "hybrid"):
        for b, n, k, density in ((2, 128, 2048, 1.0), (16 * sms, 64, 128, 0.5)):
            p, wd = random_weight(kind, n, k, dt, block=(64, 64), density=density)
            x = torch.randn(b, k).to(dt)
            if kind == "bsr":
                y = c.cuda_bsr_linear(x.cuda(), p.values.cuda(), p.crow.cuda(), p.col.cuda(), k)
            else:
                hv, hm = c.pack_hybrid_sm80(p)
                y = c.cuda_hybrid_linear(x.cuda(), hv.cuda(), hm.cuda(), p.crow.cuda(), p.col.cuda(), k)
            assert_matches_reference(y.cpu(), x, wd)
    torch.cuda.synchronize()
