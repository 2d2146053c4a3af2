"""The CUDA backend's mma.sp layout, checked on CPU against an emulation written from the PTX ISA.

sparseprune/cuda_layout.py models which lane holds which A value, which lanes supply the metadata
register (sparsity selector 0) and where each 2-bit position sits; these tests show that the C++ packer's
output, read back that way, gives the dense weight back and that emulated mma.sp equals the dense product.
"""

import pytest
import torch

from sparseprune import cuda_layout as L
from sparseprune.formats import Semi24Weight
from tests.helpers import random_24_mask

pack = torch.ops.sparseprune.pack_semi24_sm80.default
DT = {torch.float16: "fp16", torch.bfloat16: "bf16"}
SHAPES = [(16, 32), (48, 64), (37, 36), (5, 100), (64, 256), (1, 4)]


def _masked(n, k, dtype, sparser=False):
    w = torch.randn(n, k).to(dtype)
    m = random_24_mask(n, k)
    if sparser:  # some groups keep 0 or 1 values: the packer must still emit legal ordered codes
        m &= torch.rand(n, k) < 0.6
    return w * m


@pytest.mark.parametrize("dtype", list(DT), ids=lambda d: f"dtype={DT[d]}")
@pytest.mark.parametrize("n,k", SHAPES, ids=lambda v: str(v))
def test_cpp_packer_matches_emulation_bit_exact(n, k, dtype):
    for sparser in (False, True):
        w = _masked(n, k, dtype, sparser)
        v, m = pack(w)
        rv, rm = L.pack_reference(w)
        vs, ms = L.packed_shapes(n, k)
        assert tuple(v.shape) == vs and tuple(m.shape) == ms and m.dtype == torch.int32 and v.dtype == dtype
        assert torch.equal(v.view(torch.int16), rv.view(torch.int16)), "values differ from the emulated layout"
        # lanes with t in {2, 3} supply no metadata; both packers leave those words 0... compare words of t<2 only
        assert torch.equal(m, rm), "metadata differs from the emulated layout"


@pytest.mark.parametrize("dtype", list(DT), ids=lambda d: f"dtype={DT[d]}")
@pytest.mark.parametrize("n,k", [(16, 32), (37, 36), (48, 96)], ids=lambda v: str(v))
def test_fragments_read_back_give_dense_weight(n, k, dtype):
    w = _masked(n, k, dtype, sparser=(n == 37))
    v, m = pack(w)
    back = L.unpack(v, m, n, k)
    assert torch.equal(back, w.double()), "instruction's view of the packed tiles is not the weight"


def test_same_result_through_canonical_semi24():
    # the backend packs from Semi24Weight.to_dense(): pruned positions must come out identically
    w = _masked(32, 64, torch.float16)
    s = Semi24Weight.from_dense(w)
    v1, m1 = pack(s.to_dense())
    v2, m2 = pack(w)
    assert torch.equal(v1.view(torch.int16), v2.view(torch.int16)) and torch.equal(m1, m2)


@pytest.mark.parametrize("dtype", list(DT), ids=lambda d: f"dtype={DT[d]}")
def test_emulated_sparse_mma_equals_dense_product(dtype):
    n, k, b = 32, 96, 11
    w = _masked(n, k, dtype)
    x = torch.randn(b, k).to(dtype)
    v, m = pack(w)
    y = L.emulate_linear(x, v, m, n)
    ref = x.double() @ w.double().t()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_single_tile_ownership_and_selector():
    # one tile, distinct values everywhere: every compressed slot is owned by exactly one (lane, slot)
    owners = {}
    for lane in range(32):
        for s in range(8):
            rc = L.a_slot_coords(lane, s)
            assert rc not in owners
            owners[rc] = (lane, s)
    assert len(owners) == 16 * 16
    # selector 0: lanes t in {0,1} cover all 16 rows x 8 groups exactly once
    cover = [(r, g) for lane in range(32) for _, r, g in (L.meta_lane_fields(lane) or [])]
    assert sorted(cover) == [(r, g) for r in range(16) for g in range(8)]
    # a corrupt (unordered) nibble is rejected by the emulated instruction
    w = _masked(16, 32, torch.float16)
    v, m = pack(w)
    m2 = m.clone()
    m2[0, 0, 0] = (m2[0, 0, 0] & ~0xF) | 0x1  # positions (1, 0)
    a, e = L.lane_registers(v, m2, 0, 0)
    with pytest.raises(ValueError, match="not ordered"):
        L.decompress_tile(a, e)


def test_packer_refusals():
    with pytest.raises(RuntimeError, match="not 2:4"):
        pack(torch.ones(16, 32, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        pack(torch.zeros(16, 32))
    with pytest.raises(RuntimeError, match="multiple of 4"):
        pack(torch.zeros(16, 30, dtype=torch.float16))


def test_metadata_matches_cutlass_reorder():
    # Independent source: CUTLASS's reorder_meta + ColumnMajorInterleaved<2>, as re-implemented by PyTorch
    # (the layout its CUTLASS semi-structured kernels run on). Per 32 rows x 32 columns, 32-bit word L is
    # ldmatrix-loaded by lane L; selector 0 (lanes t < 2) serves rows 0-15, selector 1 (t >= 2) rows 16-31.
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    for dtype in DT:
        n, k = 64, 128
        # exactly two nonzeros per group: the nibble is unique (for emptier groups both packers pick some
        # legal pair, but not the same one)
        w = _masked(n, k, dtype)
        _, cut = conv.sparse_semi_structured_from_dense_cutlass(w)
        assert cut.dtype == torch.int16 and cut.shape == (n, k // 16)
        words = cut.reshape(-1).view(torch.int32).reshape(k // 32, n)  # [column pair][reordered row]
        _, m = pack(w)
        for mt in range(n // 16):
            for ks in range(k // 32):
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    if t // 2 != mt % 2:  # this lane's word serves the other m16 tile of the pair
                        continue
                    ours = int(m[mt, ks, 2 * g + (t & 1)])
                    theirs = int(words[ks, (mt // 2) * 32 + lane])
                    assert ours == theirs, f"tile ({mt}, {ks}) lane {lane}: {ours & 0xFFFFFFFF:#x} != {theirs & 0xFFFFFFFF:#x}"


def test_selector_one_reads_the_other_lane_pair():
    # the emulation's selector-1 view: lanes t in {2, 3} cover the tile exactly once, same bit fields
    for sel in (0, 1):
        cover = [(r, g) for lane in range(32) for _, r, g in (L.meta_lane_fields(lane, sel) or [])]
        assert sorted(cover) == [(r, g) for r in range(16) for g in range(8)]


@pytest.mark.parametrize("dtype", list(DT), ids=lambda d: f"dtype={DT[d]}")
@pytest.mark.parametrize("block", [(16, 32), (32, 64), (64, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_hybrid_packing_emulates_dense(block, dtype):
    from sparseprune.cuda import pack_hybrid_sm80
    from tests.helpers import random_weight

    n, k = 2 * block[0], 3 * block[1]
    p, wd = random_weight("hybrid", n, k, dtype, block=block, density=0.5)
    bh, bw = block
    blocks = p.to_dense().reshape(n // bh, bh, k // bw, bw).permute(0, 2, 1, 3)[
        torch.zeros(n // bh, k // bw, dtype=torch.bool).index_put_(
            (torch.repeat_interleave(torch.arange(n // bh), p.crow.diff().long()), p.col.long()), torch.tensor(True))]
    v, m = pack_hybrid_sm80(p)
    rv, rm = L.pack_hybrid_reference(blocks)
    assert v.shape == (p.nnzb, bh // 16, bw // 32, 32, 8) and m.shape == (p.nnzb, bh // 16, bw // 32, 16)
    assert torch.equal(v.view(torch.int16), rv.view(torch.int16)) and torch.equal(m, rm)
    x = torch.randn(5, k).to(dtype)
    y = L.emulate_hybrid_linear(x, v, m, p.crow, p.col, bh, bw, n)
    torch.testing.assert_close(y, x.double() @ wd.double().t(), rtol=1e-12, atol=1e-12)
