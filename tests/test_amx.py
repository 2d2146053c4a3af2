"""The bf16 AMX tile kernels (csrc/cpu/amx_kernels.cpp) against the plain-torch reference.

They run twice where the CPU has AMX: on the real tiles (level `amx`) and on the scalar model of the
tiles (`amx_emulated`, any x86-64 CPU, so CI covers the kernel source without AMX hardware). The model
checks every tile shape rule the hardware enforces and traps on a violation; it also counts the
TDPBF16PS it runs, so the tests can see that a call really went through the tiles (or, where the
tiles must decline, that it did not). SPARSEPRUNE_AMX_MIN_BATCH=1 puts every batch on the tiles.

Edges covered: single-panel layout (batch <= 16, double-buffered tiles) and panel pairs (odd panel
counts leave a lone panel), a second x super-tile (batch > 128), strips of 1 or 2 row tiles (N % 32,
block heights with an odd number of row tiles), K not a multiple of the 32-input step (Semi24 zero
padding), K longer than one chunk of 128 steps (C tiles go through memory), tile shapes below 16 x 32
(block heights/widths that are not multiples of 16/32), empty block rows, malformed 2:4 codes (the
correction tile), non-finite x (2:4 formats decline), non-bf16 dtypes (decline).
"""

import pytest
import torch

import sparseprune
from sparseprune import _native
from sparseprune.ops import hybrid, semi24
from tests.conftest import amx_isas
from tests.helpers import assert_matches_reference, call_op, random_weight
from tests.test_cpu_kernels_paths import raw_semi24_reference

BF16 = torch.bfloat16
# 1 panel (single layout), 2 (a pair), 3 (pair + lone panel), 9 panels = 2 super-tiles of 8 + 1.
BATCHES = [1, 2, 15, 16, 17, 33, 129]


@pytest.fixture(params=amx_isas(), ids=lambda i: f"isa={i}")
def amx_isa(request, monkeypatch):
    monkeypatch.setenv("SPARSEPRUNE_CPU_ISA", request.param)
    monkeypatch.setenv("SPARSEPRUNE_AMX_MIN_BATCH", "1")
    assert sparseprune.build_info()["cpu_isa_active"] == request.param
    return request.param


class Tiles:
    """Context: counts the emulated TDPBF16PS run inside (None on real tiles, which cannot be counted)."""

    def __init__(self, isa):
        self.isa = isa

    def __enter__(self):
        self.start = _native._C._amx_emulated_dots()
        return self

    def __exit__(self, *exc):
        self.dots = _native._C._amx_emulated_dots() - self.start

    def ran(self, expected: bool):
        if self.isa == "amx_emulated":
            assert (self.dots > 0) == expected, f"tiles ran {self.dots} dot products, expected {'some' if expected else 'none'}"


def _check(kind, packed, wd, k, isa, batches=BATCHES, on_tiles=True):
    n = wd.shape[0]
    for b in batches:
        x = torch.randn(b, k).to(BF16)
        bias = torch.randn(n).to(BF16) if b % 2 else None
        with Tiles(isa) as t:
            y = call_op(kind, packed, x, bias)
        t.ran(on_tiles)
        assert_matches_reference(y, x, wd, bias)


# K % 32 in {4, 12, 28, 0, 8}: the last step is padded with zero pairs; N % 32 leaves 1..31-row strips.
SEMI_SHAPES = [(5, 4), (7, 12), (3, 28), (40, 96), (33, 136), (17, 200), (70, 264)]


@pytest.mark.parametrize("n,k", SEMI_SHAPES, ids=[f"{n}x{k}" for n, k in SEMI_SHAPES])
def test_semi24_tiles(amx_isa, n, k):
    packed, wd = random_weight("semi24", n, k, BF16)
    _check("semi24", packed, wd, k, amx_isa)


# (kind, block, taken by the tiles). BSR: mr = largest divisor of bh <= 16, kc = largest even divisor of
# bw <= 32; hybrid: kc = largest multiple of 8 dividing bw, <= 32 (a whole meta byte per 8 inputs). Tiles
# below 128 elements (10 x 10, 8 x 8) and odd widths decline to the vector path.
BLOCK_CASES = [("bsr", b, t) for b, t in [((16, 32), True), ((32, 32), True), ((12, 24), True), ((8, 16), True),
                                          ((48, 64), True), ((32, 96), True), ((64, 8), True), ((4, 64), True),
                                          ((20, 10), False), ((3, 7), False)]]
BLOCK_CASES += [("hybrid", b, t) for b, t in [((16, 32), True), ((32, 32), True), ((16, 16), True), ((16, 40), True),
                                              ((48, 64), True), ((4, 32), True), ((8, 8), False)]]


@pytest.mark.parametrize("kind,block,on_tiles", BLOCK_CASES, ids=[f"{k}-{b[0]}x{b[1]}" for k, b, _ in BLOCK_CASES])
def test_block_tiles(amx_isa, kind, block, on_tiles):
    bh, bw = block
    n, k = bh * 5, bw * 4
    packed, wd = random_weight(kind, n, k, BF16, block=block, density=0.6)
    _check(kind, packed, wd, k, amx_isa, batches=[1, 16, 17, 33], on_tiles=on_tiles)


@pytest.mark.parametrize("kind", ["bsr", "hybrid"])
def test_empty_block_rows(amx_isa, kind):
    packed, wd = random_weight(kind, 96, 128, BF16, block=(16, 32), density=0.0)
    bias = torch.randn(96).to(BF16)
    x = torch.randn(20, 128).to(BF16)
    y = call_op(kind, packed, x, bias)
    assert torch.equal(y, bias.expand(20, 96))
    # some block rows empty, others not
    packed, wd = random_weight(kind, 96, 128, BF16, block=(16, 32), density=0.3)
    _check(kind, packed, wd, 128, amx_isa, batches=[5, 20], on_tiles=packed.nnzb > 0)


def test_k_longer_than_one_chunk(amx_isa):
    """More than 128 K steps per strip: C tiles are stored and reloaded between chunks."""
    packed, wd = random_weight("semi24", 20, 4160, BF16)  # 130 steps
    _check("semi24", packed, wd, 4160, amx_isa, batches=[3, 20])
    packed, wd = random_weight("bsr", 16, 1040, BF16, block=(16, 8), density=1.0)  # 130 blocks x 1 step
    _check("bsr", packed, wd, 1040, amx_isa, batches=[3, 20])
    packed, wd = random_weight("hybrid", 16, 1056, BF16, block=(16, 8), density=1.0)  # 132 blocks
    _check("hybrid", packed, wd, 1056, amx_isa, batches=[3])


def _raw_hybrid_reference(x, values, meta, crow, col, bw, n, k):
    """Hybrid with any meta bytes: every stored block row computed literally (raw_semi24_reference)."""
    bh = values.shape[1]
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for br in range(n // bh):
        for i in range(int(crow[br]), int(crow[br + 1])):
            c = int(col[i])
            y[:, br * bh:(br + 1) * bh] += raw_semi24_reference(x[:, c * bw:(c + 1) * bw], values[i], meta[i], bw)
    return y


def test_malformed_codes(amx_isa):
    """Any meta byte: p0 > p1 (swapped) and p0 == p1 (both values on one input, the second through
    the correction tile) are computed literally, like every other level."""
    for k in (12, 64, 200):
        n = 19
        values = torch.randn(n, k // 2).to(BF16)
        meta = torch.randint(0, 256, (n, (k + 7) // 8), dtype=torch.uint8)
        for b in (1, 17):
            x = torch.randn(b, k).to(BF16)
            with Tiles(amx_isa) as t:
                y = semi24.semi24_linear(x, values, meta)
            t.ran(True)
            ref = raw_semi24_reference(x, values, meta, k)
            torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * max(1.0, ref.abs().max().item()))
    bh, bw, n, k = 16, 32, 48, 128
    packed, _ = random_weight("hybrid", n, k, BF16, block=(bh, bw), density=0.6)
    meta = torch.randint(0, 256, packed.meta.shape, dtype=torch.uint8)
    x = torch.randn(18, k).to(BF16)
    with Tiles(amx_isa) as t:
        y = hybrid.hybrid_linear(x, packed.values, meta, packed.crow, packed.col, k)
    t.ran(packed.nnzb > 0)
    ref = _raw_hybrid_reference(x, packed.values, meta, packed.crow, packed.col, bw, n, k)
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_nonfinite_x(amx_isa, kind):
    """A NaN/Inf input reaches exactly the outputs whose stored weights touch it. A dense tile would
    multiply it by a 2:4 row's zeros, so the 2:4 formats decline the tiles for such x; BSR blocks are
    dense anyway and stay on the tiles."""
    n, k = 64, 128
    packed, wd = random_weight(kind, n, k, BF16, block=(16, 32), density=0.6)
    stored = packed.to_dense() != 0 if kind == "bsr" else wd != 0
    for bad in (float("nan"), float("inf")):
        x = torch.randn(20, k).to(BF16)
        ks = torch.randint(0, k, (20,))
        x[torch.arange(20), ks] = bad
        with Tiles(amx_isa) as t:
            y = call_op(kind, packed, x)
        t.ran(kind == "bsr")
        assert torch.equal(~torch.isfinite(y), stored[:, ks].T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_other_dtypes_decline(amx_isa, kind, dtype):
    packed, wd = random_weight(kind, 64, 128, dtype, block=(16, 32), density=0.6)
    x = torch.randn(20, 128).to(dtype)
    with Tiles(amx_isa) as t:
        y = call_op(kind, packed, x)
    t.ran(False)
    assert_matches_reference(y, x, wd)


@pytest.mark.parametrize("kind,first", [("semi24", 5), ("hybrid", 5), ("bsr", 3)])
def test_default_min_batch(amx_isa, monkeypatch, kind, first):
    """Without SPARSEPRUNE_AMX_MIN_BATCH the tiles start where the vector GEMV stops."""
    monkeypatch.delenv("SPARSEPRUNE_AMX_MIN_BATCH")
    packed, wd = random_weight(kind, 64, 128, BF16, block=(16, 32), density=0.6)
    for b, on_tiles in ((first - 1, False), (first, True)):
        x = torch.randn(b, 128).to(BF16)
        with Tiles(amx_isa) as t:
            y = call_op(kind, packed, x)
        t.ran(on_tiles)
        assert_matches_reference(y, x, wd)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_splits(amx_isa, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for kind in ("semi24", "bsr", "hybrid"):
            packed, wd = random_weight(kind, 544, 128, BF16, block=(32, 32), density=0.3)
            _check(kind, packed, wd, 128, amx_isa, batches=[4, 40])
    finally:
        torch.set_num_threads(old)


def test_leading_dims(amx_isa):
    packed, wd = random_weight("semi24", 48, 64, BF16)
    x = torch.randn(2, 3, 7, 64).to(BF16)
    with Tiles(amx_isa) as t:
        y = semi24.semi24_linear(x, packed.values, packed.meta)
    t.ran(True)
    assert y.shape == (2, 3, 7, 48)
    assert_matches_reference(y, x, wd)


def test_build_info_reports_amx(monkeypatch):
    info = sparseprune.build_info()
    assert isinstance(info["cpu_amx"], str) and info["cpu_amx"]
    assert ("amx" in info["cpu_isas"]) or info["cpu_amx"].startswith("not built")
    if info["cpu_amx"] == "enabled":  # the OS granted the tiles: amx is the default level
        assert info["cpu_isa_active"] == "amx"
    else:
        assert info["cpu_isa_active"] != "amx"
        monkeypatch.setenv("SPARSEPRUNE_CPU_ISA", "amx")  # never a level the CPU lacks
        assert sparseprune.build_info()["cpu_isa_active"] == info["cpu_isa_active"]
    monkeypatch.setenv("SPARSEPRUNE_CPU_ISA", "amx_emulated")
    assert sparseprune.build_info()["cpu_isa_active"] == "amx_emulated"
    monkeypatch.setenv("SPARSEPRUNE_CPU_ISA", "generic")  # lower levels can still be forced
    assert sparseprune.build_info()["cpu_isa_active"] == "generic"
