"""Every branch of the tuned CPU kernels (csrc/cpu/kernels_isa.cpp, kern_*.h) against the reference.

The kernels switch between a GEMV path (small batch) and a transposed-tile path (larger batch), use
batch tiles of 4 vectors (tails of 1..4 vectors), register-block 4 (AVX-512) or 2 rows, process
2:4 rows in SIMD chunks of 8 (AVX-512) / 4 (AVX2) groups with a scalar tail (AVX2: 4 or 2 chunks per
step, then pairs, then one), tile semi24 into 128-row chunks and K tiles of 64 / 128 / 256 inputs
(AVX-512 / AVX2 / generic), and split rows between threads. The shapes below hit each of those
edges at every ISA level this CPU runs.

At avx512bf16 the bf16 tiled path multiplies bf16 pairs with vdpbf16ps: x as pair words (BSR: adjacent
inputs, odd block widths fall back to the widening path) or, for 2:4, a per-group table of the 6
position pairs plus 4 diagonal pairs for malformed codes; weights prepared 16 groups at a time, 4
batch tiles per synchronisation.
"""

import pytest
import torch

from sparseprune.ops import semi24
from tests.conftest import cpu_isas
from tests.helpers import DTYPE_IDS, DTYPES, assert_matches_reference, call_op, random_weight

# GEMV limits (AVX-512: 2 / 4; AVX2: 4 / 6 / 8 / 12 by op and dtype) and their neighbours, and tile
# tails of every vector count at vector widths 4, 8 and 16 (batch tiles of 16, 32, 64 rows).
BATCHES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 15, 16, 17, 31, 33, 48, 63, 64, 65, 100, 129]


@pytest.fixture(params=cpu_isas(), ids=lambda i: f"isa={i}")
def isa(request, monkeypatch):
    monkeypatch.setenv("SPARSEPRUNE_CPU_ISA", request.param)
    return request.param


def _check_batches(kind, packed, wd, k, dtype, batches=BATCHES):
    n = wd.shape[0]
    for b in batches:
        x = torch.randn(b, k).to(dtype)
        bias = torch.randn(n).to(dtype) if b % 2 else None
        assert_matches_reference(call_op(kind, packed, x, bias), x, wd, bias)


# semi24: K/4 odd (odd group count, pad nibble), K below / not a multiple of the SIMD chunk (32 or
# 16 inputs; AVX2 GEMV steps of 64, 32 and 16 inputs: K = 264, 100, 28), several K tiles with a partial
# last one, N above one row chunk (128) and not a multiple of the register block.
SEMI_SHAPES = [(5, 4), (7, 12), (3, 28), (9, 36), (6, 100), (33, 132), (17, 200), (261, 264)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("n,k", SEMI_SHAPES, ids=[f"{n}x{k}" for n, k in SEMI_SHAPES])
def test_semi24_paths(isa, n, k, dtype):
    packed, wd = random_weight("semi24", n, k, dtype)
    _check_batches("semi24", packed, wd, k, dtype)


# BSR: block widths 4..128 incl. widths that are not a multiple of any vector width (12, 20),
# bh = 1 and bh not a multiple of the row block (3, 5).
BSR_BLOCKS = [(1, 4), (1, 32), (3, 12), (4, 8), (5, 20), (8, 16), (16, 32), (32, 32), (8, 64), (2, 128), (3, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("block", BSR_BLOCKS, ids=[f"{a}x{b}" for a, b in BSR_BLOCKS])
def test_bsr_paths(isa, block, dtype):
    bh, bw = block
    n, k = bh * 7, bw * 5
    packed, wd = random_weight("bsr", n, k, dtype, block=block, density=0.5)
    _check_batches("bsr", packed, wd, k, dtype)


# Hybrid: block widths 8..128 (one 2:4 SIMD chunk needs 32 inputs on AVX-512, 16 on AVX2), bh = 1,
# bh not a multiple of the row block.
HYBRID_BLOCKS = [(1, 8), (1, 32), (3, 16), (4, 8), (5, 40), (16, 32), (32, 32), (8, 64), (2, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("block", HYBRID_BLOCKS, ids=[f"{a}x{b}" for a, b in HYBRID_BLOCKS])
def test_hybrid_paths(isa, block, dtype):
    bh, bw = block
    n, k = bh * 7, bw * 5
    packed, wd = random_weight("hybrid", n, k, dtype, block=block, density=0.5)
    _check_batches("hybrid", packed, wd, k, dtype)


@pytest.mark.parametrize("limit", [1, 1000], ids=["tiled-from-2", "gemv-always"])
@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_gemv_limit_override(isa, monkeypatch, kind, limit):
    """SPARSEPRUNE_GEMV_MAX_BATCH moves the GEMV/tiled switch (to measure it on another CPU): the tiled
    path at tiny batches and the GEMV at many groups of 4 rows are then reachable, and must be right."""
    monkeypatch.setenv("SPARSEPRUNE_GEMV_MAX_BATCH", str(limit))
    for dtype in (torch.float32, torch.bfloat16):
        packed, wd = random_weight(kind, 96, 160, dtype, block=(16, 32), density=0.5)
        _check_batches(kind, packed, wd, 160, dtype, batches=[2, 3, 17, 70])


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_thread_splits(isa, kind, threads):
    """More threads than block rows / row chunks leaves some threads without rows."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        packed, wd = random_weight(kind, 64, 96, torch.float32, block=(16, 32), density=0.5)
        _check_batches(kind, packed, wd, 96, torch.float32, batches=[1, 2, 5, 70])
        packed, wd = random_weight(kind, 544, 128, torch.float32, block=(32, 32), density=0.3)
        _check_batches(kind, packed, wd, 128, torch.float32, batches=[1, 3, 65])
    finally:
        torch.set_num_threads(old)


def raw_semi24_reference(x, values, meta, k):
    """y = sum over groups of v0 * x[4g + (nib & 3)] + v1 * x[4g + (nib >> 2)], for ANY nibble."""
    g = k // 4
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)[:, :g].to(torch.int64)
    pos = torch.stack([nib & 3, nib >> 2], dim=-1).reshape(meta.shape[0], g * 2)  # [N, K/2] within group
    cols = pos + 4 * torch.arange(g).repeat_interleave(2)  # [N, K/2] input index per stored value
    xs = x.double()[:, cols]  # [B, N, K/2]
    return (xs * values.double()).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("k", [12, 64, 200])
def test_semi24_any_meta_bytes(isa, k, dtype):
    """Malformed codes (p0 >= p1) are memory-safe and computed literally, on both paths (bf16 tiles:
    swapped pairs and the diagonal table rows)."""
    n = 9
    values = torch.randn(n, k // 2).to(dtype)
    meta = torch.randint(0, 256, (n, (k + 7) // 8), dtype=torch.uint8)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: one output rounding (2^-8 relative)
    for b in (1, 3, 70):
        x = torch.randn(b, k).to(dtype)
        y = semi24.semi24_linear(x, values, meta)
        ref = raw_semi24_reference(x, values, meta, k)
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_bf16_super_tiles(isa, kind):
    """Batches over 4 and 8 tiles of 64 (bf16 pair tables are built 4 tiles at a time, fp32 xT 8)."""
    packed, wd = random_weight(kind, 96, 256, torch.bfloat16, block=(16, 32), density=0.5)
    _check_batches(kind, packed, wd, 256, torch.bfloat16, batches=[257, 300, 577])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_tile_splits_few_rows_many_batch_tiles(isa, kind, dtype):
    """Few row pieces per thread (an im2col'd conv: N = 40, thousands of patches): the tiled drivers hand
    out (piece, batch tile) pairs and widen super-tiles by 4096 / K; at K = 4096 a batch of 600 still
    spans several super-tiles. With 1 thread and many pieces the usual split runs on the same shapes."""
    old = torch.get_num_threads()
    try:
        for threads, n in ((2, 40), (3, 40), (1, 544)):
            torch.set_num_threads(threads)
            packed, wd = random_weight(kind, n, 4096 if n < 100 else 512, dtype, block=(8, 32), density=0.25)
            _check_batches(kind, packed, wd, wd.shape[1], dtype, batches=[600] if n < 100 else [300])
        torch.set_num_threads(2)
        packed, wd = random_weight(kind, 64, 40, dtype, block=(8, 8), density=0.5)
        _check_batches(kind, packed, wd, 40, dtype, batches=[3000])  # K = 40: super-tiles of 8 * 4096 / 40 tiles
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_nan_and_inf_in_x_propagate(isa, kind):
    """A NaN (or Inf) input reaches exactly the outputs whose stored weights touch that input."""
    n, k = 64, 128
    packed, wd = random_weight(kind, n, k, torch.float32, block=(16, 32), density=0.6)
    if kind == "bsr":
        stored = packed.to_dense() != 0  # random normal values: stored <=> nonzero
    else:
        stored = wd != 0
    for b in (1, 2, 5, 70):
        x = torch.randn(b, k)
        ks = torch.randint(0, k, (b,))
        x[torch.arange(b), ks] = float("nan")
        y = call_op(kind, packed, x)
        expect_nan = stored[:, ks].T  # [b, n]
        assert torch.equal(torch.isnan(y), expect_nan)
        x = torch.randn(b, k)
        x[torch.arange(b), ks] = float("inf")
        y = call_op(kind, packed, x)
        assert torch.equal(~torch.isfinite(y), expect_nan)
