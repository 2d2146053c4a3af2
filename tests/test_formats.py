"""Packed formats: exact round trips, byte budgets, and clear errors on malformed tensors."""

import pytest
import torch

from sparseprune.formats import BlockSparseWeight, FormatError, HybridWeight, Semi24Weight
from sparseprune.formats.semi24 import VALID_NIBBLES
from tests.helpers import DTYPE_IDS, DTYPES, random_24_mask, random_block_mask


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("n,k", [(1, 4), (7, 12), (64, 200), (33, 4096)])
def test_semi24_round_trip(n, k, dtype):
    w = (torch.randn(n, k) * random_24_mask(n, k)).to(dtype)
    s = Semi24Weight.from_dense(w)
    s.validate()
    assert torch.equal(s.to_dense(), w)
    assert s.values.shape == (n, k // 2) and s.meta.shape == (n, (k + 7) // 8)


def test_semi24_groups_with_fewer_than_two_kept_round_trip():
    w = torch.randn(4, 16)
    w[0, :] = 0  # all groups empty
    w[1, 1::4] = 0
    w[1, 2::4] = 0
    w[1, 3::4] = 0  # one kept per group
    w[2:] *= random_24_mask(2, 16)
    s = Semi24Weight.from_dense(w)
    assert torch.equal(s.to_dense(), w)


def test_semi24_byte_budget():
    n, k = 256, 4096
    for dtype, budget in ((torch.float16, 9 / 16), (torch.bfloat16, 9 / 16), (torch.float32, 0.55)):
        s = Semi24Weight.from_dense((torch.randn(n, k) * random_24_mask(n, k)).to(dtype))
        assert s.nbytes / s.dense_nbytes <= budget + 1e-9, (dtype, s.nbytes / s.dense_nbytes)


def test_semi24_rejects_non_24():
    w = torch.randn(4, 8)
    with pytest.raises(FormatError, match="not 2:4"):
        Semi24Weight.from_dense(w)
    with pytest.raises(FormatError, match="multiple of 4"):
        Semi24Weight.from_dense(torch.zeros(4, 6))


@pytest.mark.parametrize("code", [c for c in range(16) if c not in VALID_NIBBLES])
def test_semi24_malformed_positions(code):
    s = Semi24Weight.from_dense(torch.randn(3, 16) * random_24_mask(3, 16))
    meta = s.meta.clone()
    meta[1, 1] = (meta[1, 1] & 0xF0) | code
    with pytest.raises(FormatError, match="malformed 2:4 position code") as e:
        Semi24Weight.from_tensors({"values": s.values, "meta": meta}, s.shape, name="layers.0.q")
    assert "layers.0.q.meta" in str(e.value)


def test_semi24_bad_shapes_and_dtypes():
    s = Semi24Weight.from_dense(torch.randn(3, 16) * random_24_mask(3, 16))
    with pytest.raises(FormatError, match="values has shape"):
        Semi24Weight.from_tensors({"values": s.values[:, :-1], "meta": s.meta}, s.shape)
    with pytest.raises(FormatError, match="meta must be uint8"):
        Semi24Weight.from_tensors({"values": s.values, "meta": s.meta.to(torch.int32)}, s.shape)
    with pytest.raises(FormatError, match="missing"):
        Semi24Weight.from_tensors({"values": s.values}, s.shape)
    odd = Semi24Weight.from_dense(torch.randn(2, 12) * random_24_mask(2, 12))  # 3 groups: pad nibble
    meta = odd.meta.clone()
    meta[0, -1] |= 0x40
    with pytest.raises(FormatError, match="pad nibble"):
        Semi24Weight.from_tensors({"values": odd.values, "meta": meta}, odd.shape)


@pytest.mark.parametrize("block", [(16, 16), (32, 8), (1, 64), (64, 32)])
def test_bsr_round_trip(block):
    n, k = 128, 192
    bm = random_block_mask(n, k, block, 0.3)
    w = torch.randn(n, k)
    b = BlockSparseWeight.from_dense(w, block, bm)
    b.validate()
    assert b.nnzb == int(bm.sum())
    expanded = bm.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    assert torch.equal(b.to_dense(), w * expanded)
    assert torch.equal(BlockSparseWeight.from_dense(b.to_dense(), block, bm).to_dense(), w * expanded)


def test_bsr_from_dense_zero_blocks():
    w = torch.randn(64, 64)
    w[:32, 32:] = 0
    b = BlockSparseWeight.from_dense(w, (32, 32))
    assert b.nnzb == 3 and torch.equal(b.to_dense(), w)


def _bsr():
    return BlockSparseWeight.from_dense(torch.randn(64, 96), (16, 32), random_block_mask(64, 96, (16, 32), 0.6))


@pytest.mark.parametrize("corrupt,match", [
    (lambda t: t["col"].__setitem__(0, 3), "out of range"),
    (lambda t: t["col"].__setitem__(0, -1), "out of range"),
    (lambda t: t["crow"].__setitem__(-1, t["crow"][-1] + 1), "crow must run"),
    (lambda t: t.__setitem__("crow", t["crow"].to(torch.int64)), "int32"),
    (lambda t: t.__setitem__("col", t["col"][:-1]), "col has"),
    (lambda t: t.__setitem__("crow", t["crow"][:-1]), "crow has"),
])
def test_bsr_validation(corrupt, match):
    b = _bsr()
    assert b.nnzb >= 2
    t = {k: v.clone() for k, v in b.tensors().items()}
    corrupt(t)
    with pytest.raises(FormatError, match=match):
        BlockSparseWeight.from_tensors(t, b.shape, name="fc")


def test_bsr_validation_unsorted_and_decreasing():
    b = BlockSparseWeight.from_dense(torch.randn(32, 96), (16, 32), torch.tensor([[1, 1, 1], [1, 0, 1]]).bool())
    t = {k: v.clone() for k, v in b.tensors().items()}
    t["col"][[0, 1]] = t["col"][[1, 0]]
    with pytest.raises(FormatError, match="strictly increasing"):
        BlockSparseWeight.from_tensors(t, b.shape)
    t = {k: v.clone() for k, v in b.tensors().items()}
    t["crow"] = torch.tensor([0, 6, 5], dtype=torch.int32)  # decreasing (and beyond nnzb in the middle)
    with pytest.raises(FormatError, match="non-decreasing"):
        BlockSparseWeight.from_tensors(t, b.shape)
    with pytest.raises(FormatError, match="not divisible"):
        BlockSparseWeight.from_dense(torch.randn(30, 64), (16, 32))


def test_hybrid_round_trip_and_validation():
    n, k, block = 96, 128, (32, 32)
    w = torch.randn(n, k) * random_24_mask(n, k)
    bm = random_block_mask(n, k, block, 0.5)
    h = HybridWeight.from_dense(w, block, bm)
    h.validate()
    expect = w * bm.repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert torch.equal(h.to_dense(), expect)
    assert torch.equal(HybridWeight.from_dense(expect, block).to_dense(), expect)
    with pytest.raises(FormatError, match="not 2:4"):
        HybridWeight.from_dense(torch.randn(n, k), block, bm)
    t = {kk: v.clone() for kk, v in h.tensors().items()}
    t["meta"].view(-1)[0] = 0xFF
    with pytest.raises(FormatError, match="malformed"):
        HybridWeight.from_tensors(t, h.shape, name="mlp.up")
    with pytest.raises(FormatError, match="multiple of 8"):
        HybridWeight.from_dense(torch.zeros(8, 12), (4, 4))


def test_to_moves_device_and_dtype_keeps_indices():
    h = HybridWeight.from_dense(torch.randn(32, 64) * random_24_mask(32, 64), (16, 16))
    h2 = h.to(dtype=torch.bfloat16)
    assert h2.values.dtype == torch.bfloat16 and h2.meta.dtype == torch.uint8 and h2.crow.dtype == torch.int32
