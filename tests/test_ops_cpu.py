"""Every CPU op against its plain-torch reference, at every ISA level this CPU runs."""

import pytest
import torch

from sparseprune.ops import bsr, hybrid, semi24
from tests.conftest import cpu_isas
from tests.helpers import DTYPE_IDS, DTYPES, assert_matches_reference, call_op, random_weight

BATCHES = [0, 1, 2, 3, 5, 17, 64, 130]
# (N, K, block): odd but valid shapes alongside aligned ones
SHAPES = [(8, 16, (8, 8)), (48, 36, (16, 4)), (96, 200, (32, 8)), (128, 256, (32, 32)), (160, 384, (32, 64))]
# hybrid blocks need bw % 8 == 0
HYBRID_SHAPES = [(8, 16, (8, 8)), (48, 40, (16, 8)), (96, 200, (32, 8)), (128, 256, (32, 32)), (160, 384, (32, 64))]
CASES = [(k, s) for k in ("semi24", "bsr") for s in SHAPES] + [("hybrid", s) for s in HYBRID_SHAPES]


@pytest.fixture(params=cpu_isas(), ids=lambda i: f"isa={i}")
def isa(request, monkeypatch):
    monkeypatch.setenv("SPARSEPRUNE_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("kind,shape", CASES, ids=[f"{k}-{s[0]}x{s[1]}b{s[2][0]}x{s[2][1]}" for k, s in CASES])
def test_linear_matches_reference(isa, kind, shape, dtype):
    n, k, block = shape
    packed, wd = random_weight(kind, n, k, dtype, block=block, density=0.4)
    for b in BATCHES:
        x = torch.randn(b, k).to(dtype)
        bias = torch.randn(n).to(dtype) if b % 2 else None
        y = call_op(kind, packed, x, bias)
        assert_matches_reference(y, x, wd, bias)


@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_leading_batch_dims_and_large_batch(isa, kind):
    packed, wd = random_weight(kind, 64, 128, torch.float32, block=(16, 32), density=0.5)
    x = torch.randn(3, 5, 7, 128)
    bias = torch.randn(64)
    y = call_op(kind, packed, x, bias)
    assert y.shape == (3, 5, 7, 64)
    assert_matches_reference(y, x, wd, bias)
    x = torch.randn(4099, 128)  # large, not a multiple of any tile
    assert_matches_reference(call_op(kind, packed, x, bias), x, wd, bias)


@pytest.mark.parametrize("kind", ["bsr", "hybrid"])
def test_empty_block_rows_and_fully_empty_weight(isa, kind):
    packed, wd = random_weight(kind, 64, 64, torch.float32, block=(16, 16), density=0.0)
    assert packed.nnzb == 0
    x = torch.randn(5, 64)
    bias = torch.randn(64)
    y = call_op(kind, packed, x, bias)
    assert_matches_reference(y, x, wd, bias)
    assert torch.equal(y, bias.expand(5, 64))


def test_reference_functions_match_dense(isa):
    for kind, mod in (("semi24", semi24), ("bsr", bsr), ("hybrid", hybrid)):
        packed, wd = random_weight(kind, 64, 96, torch.float32, block=(32, 32))
        x = torch.randn(3, 96)
        args = [packed.tensors()[n] for n in type(packed).tensor_names()]
        extra = [] if kind == "semi24" else [96]
        ref = mod._reference(x, *args, *extra)
        torch.testing.assert_close(ref, x @ wd.T)


def test_non_contiguous_input(isa):
    packed, wd = random_weight("semi24", 32, 64)
    x = torch.randn(64, 10).T  # non-contiguous view
    assert_matches_reference(semi24.semi24_linear(x, packed.values, packed.meta), x, wd)


def test_errors_are_clear():
    packed, _ = random_weight("semi24", 32, 64)
    with pytest.raises(RuntimeError, match="features"):
        semi24.semi24_linear(torch.randn(2, 60), packed.values, packed.meta)
    with pytest.raises(RuntimeError, match="dtype"):
        semi24.semi24_linear(torch.randn(2, 64, dtype=torch.float64), packed.values.double(), packed.meta)
    with pytest.raises(RuntimeError, match="does not match"):
        semi24.semi24_linear(torch.randn(2, 64).bfloat16(), packed.values, packed.meta)
    b, _ = random_weight("bsr", 64, 64, block=(16, 16))
    bad_col = b.col.clone()
    if bad_col.numel():
        bad_col[-1] = 99
        with pytest.raises(RuntimeError, match="outside"):
            bsr.bsr_linear(torch.randn(2, 64), b.values, b.crow, bad_col, 64)
    bad_crow = b.crow.clone()
    bad_crow[-1] += 1
    with pytest.raises(RuntimeError, match="crow"):
        bsr.bsr_linear(torch.randn(2, 64), b.values, bad_crow, b.col, 64)
