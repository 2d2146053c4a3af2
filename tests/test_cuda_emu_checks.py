"""The SIMT emulator's own checks, its instructions against the PTX ISA and sparseprune/cuda_layout.py, and the
GPU-readiness fixes that only a planner or a host-side test can show without a GPU.

* every check of the emulator fires on a kernel that misuses the primitive (and stays quiet on correct code):
  a test of the kernels is only as strong as these;
* mma.sp m16n8k32 as emulated (csrc/cuda/emu/emu_core.cpp, written from the PTX ISA text) and as modelled in
  sparseprune/cuda_layout.py (written earlier, cross-checked against CUTLASS) agree on random lane registers,
  both sparsity selectors; mma.sync m16n8k16 and ldmatrix.x4 against the ISA's formulas restated here;
* fp16/bf16 conversions bit-exact against torch;
* planner: tokens are not on grid.y (any batch launches), split-K workspace only when split, configs chosen by
  the device's opt-in shared memory, decode shapes fill the SMs; PerDeviceCache has no race; the fake kernel of
  cuda_semi24_linear checks in_features.
"""

import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sparseprune import cuda_layout as L
from sparseprune.cuda import cuda_semi24_linear
from tests.cuda_emu import A10, A100, H100, RTX4090, EmuError, load
from tests.helpers import DTYPE_IDS

DTYPES = [torch.float16, torch.bfloat16]
ORDERED_CODES = [0x4, 0x8, 0x9, 0xC, 0xD, 0xE]  # the PTX ISA's defined ::ordered_metadata index pairs


@pytest.fixture(scope="module")
def emu():
    return load()


# ---- the emulator's checks -----------------------------------------------------------------------------
MISUSES = {
    "copy_missing_wait": "read poison",
    "copy_missing_barrier": "read poison",
    "cp_async_misaligned": "cp.async destination at shared offset 8, not 16-byte aligned",
    "cp_async_smem_overflow": "outside the 4096 bytes requested at launch",
    "cp_async_global_oob": "cp.async reads 16 bytes outside every tensor.*0 bytes past the end of 'in'",
    "ldmatrix_divergent": "diverged at a warp-collective instruction",
    "ldmatrix_half_warp": "exited while other lanes of its warp wait at ldmatrix",
    "ldmatrix_misaligned": "ldmatrix row address at shared offset 4, not 16-byte aligned",
    "syncthreads_two_sites": "__syncthreads reached at two places at once",
    "syncthreads_after_exit": "exited while 32 threads wait at __syncthreads",
    "cp_async_overlap": "while an earlier cp.async to the same bytes is still in flight",
    "exit_with_pending_cp_async": "cp.async copies it never waited for",
    "global_read_oob": "memory fault .*0 bytes past the end of 'in'",
    "global_write_oob": "wrote 0 bytes past the end of 'out'",
    "smem_read_oob": "memory fault .*64 bytes past the end of 'shared memory'",
    "mma_sp_zero_metadata": "metadata nibble 0x0 .* not a defined index pair",
    "smem_over_48k_without_attribute": "65536 bytes of dynamic shared memory requested, 49152 allowed",
    "smem_over_optin": "the device allows at most 232448 bytes per block",
    "block_too_large": "block of 2048 threads",
    "grid_y_too_large": r"grid \(1, 70000, 1\) outside the CUDA limits",
}


@pytest.mark.parametrize("name", list(MISUSES))
def test_emulator_catches(emu, name):
    with pytest.raises(EmuError, match=MISUSES[name]):
        emu.selftest(name)


@pytest.mark.parametrize("name", ["copy_ok", "misuse_none", "smem_over_48k_with_attribute"])
@pytest.mark.parametrize("schedule", [0, 1, 2], ids=["forward", "reverse", "random"])
def test_emulator_accepts_correct_code(emu, name, schedule):
    emu.selftest(name, H100.with_(schedule=schedule, seed=7))


@pytest.mark.parametrize("schedule", [0, 1, 2], ids=["forward", "reverse", "random"])
def test_missing_barrier_caught_in_any_schedule(emu, schedule):
    # each thread reads its neighbour's chunk: in any order some neighbour has not landed yet (strict cp.async)
    with pytest.raises(EmuError, match="read poison"):
        emu.selftest("copy_missing_barrier", H100.with_(schedule=schedule, seed=3))


# ---- instructions ------------------------------------------------------------------------------------------
def _pack_pairs(vals: torch.Tensor) -> torch.Tensor:
    """[32, 8] 16-bit values (as a float16/bfloat16 tensor) -> [32, 4] registers, element 2i in the low half."""
    bits = vals.view(torch.int16).to(torch.int64) & 0xFFFF
    return bits[:, 0::2] | (bits[:, 1::2] << 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
@pytest.mark.parametrize("selector", [0, 1])
def test_mma_sp_matches_cuda_layout_model(emu, dtype, selector):
    rng = random.Random(selector)
    for _ in range(3):
        a_vals = torch.randn(32, 8).to(dtype)
        e = []
        for lane in range(32):
            if (lane & 3) >> 1 == selector:
                e.append(sum(rng.choice(ORDERED_CODES) << (4 * j) for j in range(8)))
            else:  # lanes the selector does not name: garbage the instruction must ignore
                e.append(rng.getrandbits(32) & 0x11111111)
        b = torch.randn(32, 8).to(dtype)
        c = torch.randn(16, 8)
        want = L.emulate_mma_sp([a_vals[lane].double() for lane in range(32)], e, b.double(), c.double(), selector)
        # registers in the PTX ISA's B and C/D layouts (cuda_layout's b_slot_coords / c_slot_coords)
        b_lane = torch.stack([torch.stack([b[L.b_slot_coords(lane, s)] for s in range(8)]) for lane in range(32)])
        c_lane = torch.tensor([[float(c[L.c_slot_coords(lane, s)]) for s in range(4)] for lane in range(32)])
        d = emu.mma_sp(dtype, _pack_pairs(a_vals), _pack_pairs(b_lane), torch.tensor(e), c_lane, selector=selector)
        got = torch.empty(16, 8, dtype=torch.float64)
        for lane in range(32):
            for s in range(4):
                got[L.c_slot_coords(lane, s)] = float(d[lane, s])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_mma_sp_metadata_rules(emu):
    z = torch.zeros(32, 4, dtype=torch.int64)
    c = torch.zeros(32, 4)
    for nib in (0x0, 0x5, 0xA, 0xF):  # undefined in both forms
        e = torch.full((32,), 0x44444444)
        e[5] = 0x44444440 | nib  # lane 5 = group 1, thread 1: selector 0 reads it
        for ordered in (True, False):
            with pytest.raises(EmuError, match=f"nibble 0x{nib:X}"):
                emu.mma_sp(torch.float16, z, z, e, c, ordered=ordered)
    e = torch.full((32,), 0x44444441)  # 0b0001: positions (1, 0), defined for mma.sp, not for ::ordered_metadata
    with pytest.raises(EmuError, match="nibble 0x1"):
        emu.mma_sp(torch.float16, z, z, e, c, ordered=True)
    emu.mma_sp(torch.float16, z, z, e, c, ordered=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
def test_mma_dense_follows_the_isa(emu, dtype):
    # PTX ISA mma.m16n8k16 .f16/.bf16, g = lane >> 2, t = lane % 4:
    #   a_i: row g (+8 for i in {2,3,6,7}), col 2t + (i & 1) (+8 for i >= 4); b_i: k = 2t + (i & 1) (+8 for i >= 2),
    #   n = g; c_i: row g (+8 for i >= 2), col 2t + (i & 1)
    A, Bm, C = torch.randn(16, 16).to(dtype), torch.randn(16, 8).to(dtype), torch.randn(16, 8)
    a = torch.stack([torch.stack([A[(l >> 2) + 8 * ((i >> 1) & 1), 2 * (l & 3) + (i & 1) + 8 * (i >> 2)]
                                  for i in range(8)]) for l in range(32)])
    b = torch.stack([torch.stack([Bm[2 * (l & 3) + (i & 1) + 8 * (i >> 1), l >> 2] for i in range(4)])
                     for l in range(32)])
    c = torch.tensor([[float(C[(l >> 2) + 8 * (i >> 1), 2 * (l & 3) + (i & 1)]) for i in range(4)] for l in range(32)])
    d = emu.mma_dense(dtype, _pack_pairs(a), _pack_pairs(torch.cat([b, b], 1))[:, :2], c)
    want = A.double() @ Bm.double() + C.double()
    for l in range(32):
        for i in range(4):
            assert abs(float(d[l, i]) - float(want[(l >> 2) + 8 * (i >> 1), 2 * (l & 3) + (i & 1)])) < 1e-4


def test_ldmatrix_follows_the_isa(emu):
    # lanes 8m..8m+7 give the rows of matrix m; lane L gets row L/4 of matrix m, 16-bit elements 2(L%4), 2(L%4)+1
    image = torch.randint(0, 256, (1024,), dtype=torch.uint8)
    offs = [16 * r for r in random.Random(1).sample(range(64), 32)]
    r = emu.ldmatrix_x4(image, offs)
    words = image.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        for m in range(4):
            assert int(r[lane, m]) == int(words[(offs[8 * m + lane // 4] + 4 * (lane % 4)) // 4])
    with pytest.raises(EmuError, match="not 16-byte aligned"):
        emu.ldmatrix_x4(image, [offs[0] + 8] + offs[1:])
    with pytest.raises(EmuError, match="outside the 1024 bytes"):
        emu.ldmatrix_x4(image, [1024] + offs[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={DTYPE_IDS[d]}")
def test_half_conversions_bit_exact(emu, dtype):
    f = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-9, 6, (20000,)).float(),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8,
                                 float("inf"), -float("inf"), 1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-8])])
    want = f.to(dtype).view(torch.int16)
    assert torch.equal(emu.to_half_bits(dtype, f), want)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    back, ref = emu.from_half_bits(dtype, bits), bits.view(dtype).float()
    assert torch.equal(back.isnan(), ref.isnan()) and torch.equal(back[~ref.isnan()], ref[~ref.isnan()])


# ---- planner: GPU-readiness ----------------------------------------------------------------------------
def test_any_batch_fits_the_grid(emu):
    # tokens used to sit on grid.y (at most 65535 blocks): 8.4M tokens would not launch. Now grid.x carries
    # M blocks x token blocks (up to 2^31 - 1) and grid.y only the K splits.
    for plan in (emu.plan_semi24(2**23 + 1, 4096, 4096), emu.plan_block("bsr", 2**23 + 1, 4096, 4096, (64, 64), 512),
                 emu.plan_block("hybrid", 2**23 + 1, 4096, 4096, (64, 64), 512)):
        assert plan.nblocks > 65535 and plan.grid_x <= 2**31 - 1 and plan.splits <= 16, plan
    with pytest.raises(EmuError, match="batch too large"):
        emu.plan_semi24(2**31 - 1, 128256, 4096)


def test_split_workspace_only_when_split(emu):
    # a 128256-row lm_head at B = 32 fills the GPU without splitting: no workspace (it used to get 16 * B * N
    # floats, 263 MB, on every call and in every captured graph)
    p = emu.plan_semi24(32, 128256, 4096)
    assert p.splits == 1 and p.workspace_floats == 0, p
    for b in (1, 8, 33, 128, 129, 2049):
        p = emu.plan_semi24(b, 1024, 4096)
        assert p.workspace_floats == (p.splits * b * 1024 if p.splits > 1 else 0), p
        assert p.workspace_floats * 4 <= 64 << 20


@pytest.mark.parametrize("dev", [H100, A100, RTX4090, A10], ids=lambda d: d.name.split(" ")[0])
def test_config_fits_the_devices_shared_memory(emu, dev):
    # 128x128 with 4 stages needs 102,400 B: more than sm_86/sm_89 allow (101,376 B), so they get 3 stages
    for b in (1, 9, 33, 129, 2049):
        p = emu.plan_semi24(b, 4096, 4096, dev)
        assert p.smem_bytes <= dev.smem_optin, p
        if b > 128:
            assert (p.config, p.stages) == ((3, 4) if dev.smem_optin >= 102400 else (4, 3)), p
        for kind in ("bsr", "hybrid"):
            q = emu.plan_block(kind, b, 4096, 4096, (64, 64), 2048, dev)
            assert q.smem_bytes <= dev.smem_optin, q


def test_decode_fills_the_gpu(emu):
    # the cases: a 4096x4096 layer with 64-row blocks launched 64 CTAs on a 132-SM H100, and Semi24 at
    # B = 33-128 with N = 1024 launched 8; with split-K every such launch covers the SMs
    for kind in ("bsr", "hybrid"):
        for nnzb in (4096 // 64 * 32, 4096 // 64 * 13):  # 50% and ~80% of the 64x64 blocks pruned
            for b in (1, 16):
                p = emu.plan_block(kind, b, 4096, 4096, (64, 64), nnzb)
                assert p.grid_x < 132 < p.grid_x * p.splits, (kind, nnzb, b, p)
    for b in (1, 8, 33, 64, 128):
        p = emu.plan_semi24(b, 1024, 4096)
        # 8 or 16 CTAs, split up to 16 ways (>= 4 K tiles each): 128-256 CTAs
        assert p.grid_x <= 16 and p.grid_x * p.splits >= 128, (b, p)


def test_device_props_cache_is_race_free(emu):
    # PerDeviceCache (torch_cuda_utils.h's device_props): 16 threads at once, a slow query: one query per device,
    # and no thread sees a half-written entry
    torn, calls = emu.device_cache_race(16, 4)
    assert torn == 0 and calls == [1, 1, 1, 1]


def test_fake_kernel_checks_in_features():
    # the packed layout only records ceil(K/32); in_features is now part of the op so a wrong x is refused
    with FakeTensorMode():
        v = torch.empty(2, 2, 32, 8, dtype=torch.float16)
        m = torch.empty(2, 2, 16, dtype=torch.int32)
        assert cuda_semi24_linear(torch.empty(3, 36, dtype=torch.float16), v, m, 36, 32).shape == (3, 32)
        with pytest.raises(Exception, match="40 features, weight expects 36"):
            cuda_semi24_linear(torch.empty(3, 40, dtype=torch.float16), v, m, 36, 32)
