"""The CUDA kernels' own source (csrc/cuda/*.cuh) executed on the CPU by the SIMT emulator, against plain torch.

Each call goes through the planner and launcher the .cu files use (config by batch and by the device's opt-in
shared memory, split-K, workspace, grid), on emulated H100 / RTX 4090 limits, with NaN-poisoned outputs and
workspaces, guarded tensors, and fibers run in forward, reverse and random order. The matrices below are chosen
so that every tile config of every kernel runs with and without split-K (test_matrices_cover_every_config_and_split
proves it from the planner), at B = 0, 1, 7, 8, 9, 33, 129, 2049, odd N and K, fp16 and bf16. What the emulation
does and does not prove: csrc/cuda/emu/README.md.
"""

import pytest
import torch

from sparseprune.cuda import pack_hybrid_sm80
from sparseprune.cuda_layout import pack_reference
from sparseprune.formats import BlockSparseWeight, HybridWeight
from tests.cuda_emu import A100, H100, RTX4090, EmuError, load
from tests.helpers import DTYPE_IDS, assert_matches_reference, expand_blocks, random_24_mask

DTYPES = [torch.float16, torch.bfloat16]
BATCHES = [0, 1, 7, 8, 9, 33, 129, 2049]
pack_cpu = torch.ops.sparseprune.pack_semi24_sm80.default

# (device, N, K): 40x516 has K = 16 tiles of 32 + 4 (odd k-step count) and always splits K; 37x36 and 130x100
# are too short to split. N = 130 leaves padding tiles in the last 64- and 128-row CTA. The RTX 4090's
# 101,376 B of shared memory per block makes B > 128 take the 3-stage 128x128 config.
SEMI_CASES = [(H100, 40, 516), (H100, 37, 36), (RTX4090, 130, 100), (RTX4090, 40, 516)]
# (N, K, block, stored blocks per block row, cycled): bh 64 / 32 / 16 pick BM; the rows' average number of 32-wide
# chunks decides split-K (>= 8 on H100) or not, so the counts are fixed (positions are random). Empty block rows
# and bw = 96 (an odd number of chunks per block) included.
BLOCK_CASES = [
    (128, 1024, (64, 64), (0, 13)),
    (64, 128, (64, 64), (2,)),
    (64, 640, (32, 32), (5, 20)),
    (96, 192, (32, 96), (2,)),
    (48, 1024, (16, 32), (0, 24, 9)),
    (32, 64, (16, 32), (2, 1)),
]


@pytest.fixture(scope="module")
def emu():
    return load()


def _device(base, i):
    # vary the fiber schedule and which end of each tensor sits on a guard page from call to call
    return base.with_(schedule=i % 3, seed=i + 1, placement=(i // 3) % 2)


def _block_mask(n, k, block, counts):
    """[N/bh, K/bw] mask with counts[r % len(counts)] stored blocks in block row r, at random columns."""
    nbr, nbc = n // block[0], k // block[1]
    m = torch.zeros(nbr, nbc, dtype=torch.bool)
    for r in range(nbr):
        m[r, torch.randperm(nbc)[:counts[r % len(counts)]]] = True
    return m


def _check_ran(plan, b, n, dev):
    """The emulator ran exactly the planned grid, plus the split-K reduction when K was split."""
    reduce = 0 if plan.splits == 1 else min(-(-b * n // 256), 4 * dev.num_sms)
    assert plan.ctas_run == plan.grid_x * plan.splits + reduce, plan


def _semi_weight(n, k, dtype):
    return torch.randn(n, k).to(dtype) * random_24_mask(n, k)


def _block_weight(kind, n, k, block, counts, dtype):
    """(packed weight, masked dense fp32 reference built here, not decoded by the library)."""
    bm = _block_mask(n, k, block, counts)
    w = torch.randn(n, k).to(dtype)
    if kind == "bsr":
        return BlockSparseWeight.from_dense(w, block, bm), (w * expand_blocks(bm, block)).float()
    m24 = random_24_mask(n, k)
    return HybridWeight.from_dense(w * m24, block, bm), (w * m24 * expand_blocks(bm, block)).float()


def _run_block(emu, kind, p, x, bias, device):
    if kind == "bsr":
        return emu.bsr_linear(x, p.values, p.crow, p.col, bias, device)
    v, m = pack_hybrid_sm80(p)
    return emu.hybrid_linear(x, v, m, p.crow, p.col, bias, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("dev,n,k", SEMI_CASES, ids=lambda v: getattr(v, "name", str(v)).split(" ")[0])
def test_semi24_every_batch(emu, dev, n, k, dtype):
    w = _semi_weight(n, k, dtype)
    v, m = pack_cpu(w)
    for i, b in enumerate(BATCHES):
        x = torch.randn(b, k).to(dtype)
        bias = torch.randn(n).to(dtype) if b % 2 else None
        y, plan = emu.semi24_linear(x, v, m, n, bias, _device(dev, i))
        assert_matches_reference(y, x, w.float(), bias)
        if b:
            _check_ran(plan, b, n, dev)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("kind", ["bsr", "hybrid"])
@pytest.mark.parametrize("n,k,block,counts", BLOCK_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_block_sparse_every_batch(emu, kind, n, k, block, counts, dtype):
    p, wd = _block_weight(kind, n, k, block, counts, dtype)
    for i, b in enumerate(BATCHES):
        x = torch.randn(b, k).to(dtype)
        bias = torch.randn(n).to(dtype) if b % 2 else None
        y, plan = _run_block(emu, kind, p, x, bias, _device(H100, i))
        assert_matches_reference(y, x, wd, bias)
        if b:
            _check_ran(plan, b, n, H100)


def _plans(emu, b):
    """{(family, config, split?)} the kernel tests above run at batch b (the planner alone, same inputs)."""
    out = {("semi24", p.config, p.splits > 1) for p in (emu.plan_semi24(b, n, k, dev) for dev, n, k in SEMI_CASES)}
    for n, k, block, counts in BLOCK_CASES:
        nnzb = sum(counts[r % len(counts)] for r in range(n // block[0]))
        for kind in ("bsr", "hybrid"):
            p = emu.plan_block(kind, b, n, k, block, nnzb, H100)
            out.add((kind, p.config, p.splits > 1))
    return out


def test_matrices_cover_every_config_and_split(emu):
    # the planner's own choices over the matrices above: each family's whole config table, each config with
    # and without split-K (a wrong config or split would only be caught if it runs)
    seen = set().union(*(_plans(emu, b) for b in BATCHES if b))
    want = {("semi24", c, s) for c in range(5) for s in (False, True)}
    want |= {(f, c, s) for f in ("bsr", "hybrid") for c in range(6) for s in (False, True)}
    assert want <= seen, f"not covered: {sorted(want - seen)}"


@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_every_split_count(emu, kind):
    # one long weight, every split count the planner produces as the SM count grows (2 CTAs, so splits = SMs),
    # incl. uneven last splits, splits that get no chunk of a sparse row, and the odd number of 32-wide k-steps
    dtype = torch.bfloat16
    if kind == "semi24":
        n, k = 100, 4100  # 7 row tiles -> 2 CTAs of 64 rows; 129 k-steps = 65 tiles of 64
        w = _semi_weight(n, k, dtype)
        v, m = pack_cpu(w)
        run = lambda x, dev: emu.semi24_linear(x, v, m, n, None, dev)
    else:
        n, k, block = 128, 2048, (64, 64)  # 2 block rows of 64 (2 CTAs) holding 32 and 20 blocks of 2 chunks
        p, w = _block_weight(kind, n, k, block, (32, 20), dtype)
        run = lambda x, dev: _run_block(emu, kind, p, x, None, dev)
    seen = set()
    for sms in (1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 16):
        x = torch.randn(5, k).to(dtype)
        dev = H100.with_(num_sms=sms, schedule=sms % 3, seed=sms)
        y, plan = run(x, dev)
        assert_matches_reference(y, x, w.float())
        assert (plan.splits > 1) == (sms > 2), plan  # 2 CTAs: split only when they leave SMs idle
        _check_ran(plan, 5, n, dev)
        seen.add(plan.splits)
    assert len(seen) >= 9 and max(seen) >= 11, sorted(seen)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
def test_gpu_packer_matches_cpu_packer_and_reference(emu, dtype):
    # the GPU packer kernel (pack_semi24_sm80_kernel), emulated, against the CPU op and the Python layout model
    for n, k, sparser in ((16, 32, False), (37, 36, True), (5, 100, False), (130, 260, True), (1, 4, False)):
        w = _semi_weight(n, k, dtype)
        if sparser:  # groups keeping 0 or 1 values: both packers must still emit the same legal codes
            w = w * (torch.rand(n, k) < 0.6)
        v, m, bad = emu.pack_semi24(w)
        vc, mc = pack_cpu(w)
        vr, mr = pack_reference(w)
        assert bad == 0
        assert torch.equal(v.view(torch.int16), vc.view(torch.int16)) and torch.equal(m, mc), (n, k)
        assert torch.equal(v.view(torch.int16), vr.view(torch.int16)) and torch.equal(m, mr), (n, k)
    _, _, bad = emu.pack_semi24(torch.ones(16, 32, dtype=dtype))
    assert bad == 1


def test_gpu_packed_weight_runs(emu):
    # the emulated GPU packer's output fed to the emulated kernel (the path a CUDA module takes in prepare())
    n, k = 48, 200
    w = _semi_weight(n, k, torch.float16)
    v, m, _ = emu.pack_semi24(w)
    x = torch.randn(9, k).half()
    y, _ = emu.semi24_linear(x, v, m, n, None, A100)
    assert_matches_reference(y, x, w.float())


def test_misaligned_tensors_are_refused(emu):
    # cp.async needs 16-byte aligned sources: a view at an odd offset gets the launcher's clear error (the same
    # semi24_args_error / bsr_args_error the .cu turns into a RuntimeError), never a misaligned copy
    n, k = 32, 64
    w = _semi_weight(n, k, torch.float16)
    v, m = pack_cpu(w)
    x = torch.randn(3, k).half()
    with pytest.raises(EmuError, match="values must be 16-byte aligned"):
        emu.semi24_linear(x, v, m, n, misalign_values=2)
    p, _ = _block_weight("bsr", 64, 128, (32, 32), (4,), torch.float16)
    with pytest.raises(EmuError, match="values must be 16-byte aligned"):
        emu.bsr_linear(x.new_zeros(3, 128), p.values, p.crow, p.col, misalign_values=8)


def test_corrupt_block_indices_stay_in_bounds(emu):
    # crow/col that slipped past validation: the kernels clamp crow and skip bad col (no host sync); the guarded
    # tensors prove no read leaves values/col/x, and the output stays finite
    n, k, block = 128, 256, (32, 64)
    for kind in ("bsr", "hybrid"):
        p, _ = _block_weight(kind, n, k, block, (4,), torch.float16)
        crow, col = p.crow.clone(), p.col.clone()
        col[0], col[1] = -3, k // block[1] + 7
        crow[2] = 10**6
        x = torch.randn(4, k).half()
        if kind == "bsr":
            y, _ = emu.bsr_linear(x, p.values, crow, col)
        else:
            v, m = pack_hybrid_sm80(p)
            y, _ = emu.hybrid_linear(x, v, m, crow, col)
        assert torch.isfinite(y).all()
