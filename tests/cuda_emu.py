"""Python side of the SIMT emulator of our CUDA kernels (csrc/cuda/emu), for the tests.

The emulator is a test-only shared library (build/cuda_emu/libsp_cuda_emu.so, no torch inside) built from
csrc/cuda/*.cuh compiled unchanged as host C++ with SP_CUDA_EMU. :func:`load` builds it incrementally with
CMake + Ninja (a no-op when up to date; ``make test`` builds it first) and wraps its C entry points
(csrc/cuda/emu/emu_api.h) so tests pass CPU tensors in and get CPU tensors back. Every call goes through the
same planner (config, split-K, workspace, grid) and launcher as the .cu files, on an emulated device described
by a :class:`Device` (SM count and opt-in shared memory per block, as cudaDeviceProp reports them).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cuda" / "emu"
BUILD = ROOT / "build" / "cuda_emu"
LIB = BUILD / "libsp_cuda_emu.so"

F16, BF16 = 0, 1
DTYPE_CODE = {torch.float16: F16, torch.bfloat16: BF16}


@dataclasses.dataclass(frozen=True)
class Device:
    """What the launch planners see of a GPU, and how the emulator schedules a CTA's threads."""

    name: str
    num_sms: int
    smem_optin: int  # sharedMemPerBlockOptin
    schedule: int = 0  # 0 forward, 1 reverse, 2 seeded random order of fibers each round
    seed: int = 1
    placement: int = 0  # 0: buffers end at a guard page; 1: they start at one

    def with_(self, **kw) -> "Device":
        return dataclasses.replace(self, **kw)


# cudaDeviceProp.multiProcessorCount / sharedMemPerBlockOptin of the cards the planners must handle.
H100 = Device("H100 (sm_90)", 132, 232448)
A100 = Device("A100 (sm_80)", 108, 166912)
RTX4090 = Device("RTX 4090 (sm_89)", 128, 101376)
A10 = Device("A10 (sm_86)", 72, 101376)


class _Dev(ctypes.Structure):
    _fields_ = [("num_sms", ctypes.c_int), ("smem_optin", ctypes.c_int), ("schedule", ctypes.c_int),
                ("seed", ctypes.c_uint64), ("placement", ctypes.c_int)]


class _Buf(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("bytes", ctypes.c_int64), ("name", ctypes.c_char_p),
                ("align", ctypes.c_int64), ("misalign", ctypes.c_int64)]


class Plan(ctypes.Structure):
    """The launch the planner chose (LaunchPlan in csrc/cuda/launch_plan.cuh) and the CTAs that ran."""

    _fields_ = [("config", ctypes.c_int), ("bm", ctypes.c_int), ("bn", ctypes.c_int), ("warps_m", ctypes.c_int),
                ("warps_n", ctypes.c_int), ("stages", ctypes.c_int), ("threads", ctypes.c_int),
                ("smem_bytes", ctypes.c_int), ("mblocks", ctypes.c_int64), ("nblocks", ctypes.c_int64),
                ("grid_x", ctypes.c_int64), ("splits", ctypes.c_int), ("units_per_split", ctypes.c_int64),
                ("workspace_floats", ctypes.c_int64), ("ctas_run", ctypes.c_int64)]

    def __repr__(self):
        return (f"Plan(config={self.config} {self.bm}x{self.bn} {self.warps_m}x{self.warps_n}w {self.stages}st "
                f"smem={self.smem_bytes} grid={self.grid_x}x{self.splits} ws={self.workspace_floats})")


class EmuError(RuntimeError):
    """The emulator refused a launch or caught the kernel doing something a GPU would not allow."""


def _buf(t: torch.Tensor | None, name: str, align: int = 256, misalign: int = 0) -> _Buf:
    if t is None:
        return _Buf(None, 0, None, 0, 0)
    assert t.is_contiguous() and t.device.type == "cpu"
    return _Buf(t.data_ptr() if t.numel() else None, t.numel() * t.element_size(), name.encode(), align, misalign)


def _dev(d: Device) -> _Dev:
    return _Dev(d.num_sms, d.smem_optin, d.schedule, d.seed, d.placement)


def x_for_cp_async(x: torch.Tensor) -> torch.Tensor:
    """x [B, K] as the .cu hands it to the kernels (x_for_cp_async in torch_cuda_utils.h): contiguous, rows
    padded with zeros to a multiple of 8 elements."""
    b, k = x.shape
    k8 = (k + 7) // 8 * 8
    if k8 == k:
        return x.contiguous()
    xp = torch.zeros(b, k8, dtype=x.dtype)
    xp[:, :k] = x
    return xp


class Emu:
    """The loaded emulator library."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        P = ctypes.POINTER
        i64, i32 = ctypes.c_int64, ctypes.c_int
        lib.sp_emu_semi24_linear.argtypes = [i32, P(_Dev), _Buf, i64, i64, i64, _Buf, _Buf, i64, _Buf, _Buf, i32,
                                             P(Plan), ctypes.c_char_p, i32]
        lib.sp_emu_pack_semi24.argtypes = [i32, P(_Dev), _Buf, i64, i64, _Buf, _Buf, P(i32), ctypes.c_char_p, i32]
        lib.sp_emu_bsr_linear.argtypes = [i32, P(_Dev), _Buf, i64, i64, i64, _Buf, _Buf, _Buf, i64, i64, i64, i64,
                                          _Buf, _Buf, i32, P(Plan), ctypes.c_char_p, i32]
        lib.sp_emu_hybrid_linear.argtypes = [i32, P(_Dev), _Buf, i64, i64, i64, _Buf, _Buf, _Buf, _Buf, i64, i64,
                                             i64, i64, _Buf, _Buf, i32, P(Plan), ctypes.c_char_p, i32]
        lib.sp_emu_selftest.argtypes = [ctypes.c_char_p, P(_Dev), ctypes.c_char_p, i32]
        u32p, f32p = P(ctypes.c_uint32), P(ctypes.c_float)
        lib.sp_emu_mma_sp.argtypes = [i32, i32, i32, u32p, u32p, u32p, f32p, f32p, ctypes.c_char_p, i32]
        lib.sp_emu_mma_dense.argtypes = [i32, u32p, u32p, f32p, f32p, ctypes.c_char_p, i32]
        lib.sp_emu_ldmatrix_x4.argtypes = [P(ctypes.c_uint8), i32, P(i32), u32p, ctypes.c_char_p, i32]
        lib.sp_emu_to_half_bits.argtypes = [i32, f32p, P(ctypes.c_uint16), i64]
        lib.sp_emu_from_half_bits.argtypes = [i32, P(ctypes.c_uint16), f32p, i64]
        lib.sp_emu_device_cache_race.argtypes = [i32, i32, P(i32)]

    @staticmethod
    def _check(rc: int, err) -> None:
        if rc:
            raise EmuError(err.value.decode(errors="replace"))

    # --- kernels -------------------------------------------------------------------------------------
    def semi24_linear(self, x, values, meta, n: int, bias=None, device: Device = H100, plan_only=False,
                      misalign_values=0, y_fill=float("nan")):
        """y = x W^T (+ bias), W packed by pack_semi24_sm80 for in_features = x.shape[1]."""
        b, k = x.shape
        x2 = x_for_cp_async(x)
        y = torch.full((b, n), y_fill, dtype=x.dtype)
        plan, err = Plan(), ctypes.create_string_buffer(4096)
        rc = self.lib.sp_emu_semi24_linear(
            DTYPE_CODE[x.dtype], ctypes.byref(_dev(device)), _buf(x2, "x", 256), b, k, x2.shape[1],
            _buf(values, "values", 256, misalign_values), _buf(meta, "meta", 256), n,
            _buf(bias, "bias", 2), _buf(y, "y", 256), int(plan_only), ctypes.byref(plan), err, len(err))
        self._check(rc, err)
        return y, plan

    def pack_semi24(self, w: torch.Tensor, device: Device = H100):
        """The GPU packer kernel on dense masked W [N, K]: (values, meta, bad)."""
        n, k = w.shape
        mt, ks = (n + 15) // 16, (k + 31) // 32
        values = torch.full((mt, ks, 32, 8), float("nan"), dtype=w.dtype)  # at::empty in the .cu
        meta = torch.zeros((mt, ks, 16), dtype=torch.int32)  # at::zeros in the .cu
        bad, err = ctypes.c_int(0), ctypes.create_string_buffer(4096)
        rc = self.lib.sp_emu_pack_semi24(DTYPE_CODE[w.dtype], ctypes.byref(_dev(device)),
                                         _buf(w.contiguous(), "dense", 256), n, k, _buf(values, "values"),
                                         _buf(meta, "meta"), ctypes.byref(bad), err, len(err))
        self._check(rc, err)
        return values, meta, bad.value

    def bsr_linear(self, x, values, crow, col, bias=None, device: Device = H100, plan_only=False,
                   misalign_values=0):
        """y = x W^T (+ bias), W in the canonical BSR layout (values [nnzb, bh, bw], crow, col)."""
        nnzb, bh, bw = values.shape
        vals = _buf(values.contiguous(), "values", 256, misalign_values)
        return self._block(self.lib.sp_emu_bsr_linear, [vals], x, crow, col, nnzb, bh, bw, bias, device, plan_only)

    def hybrid_linear(self, x, values, meta, crow, col, bias=None, device: Device = H100, plan_only=False):
        """y = x W^T (+ bias), W as packed by pack_hybrid_sm80 (values [nnzb, bh/16, bw/32, 32, 8])."""
        nnzb, bh, bw = values.shape[0], values.shape[1] * 16, values.shape[2] * 32
        ops = [_buf(values.contiguous(), "values"), _buf(meta.contiguous(), "meta")]
        return self._block(self.lib.sp_emu_hybrid_linear, ops, x, crow, col, nnzb, bh, bw, bias, device, plan_only)

    def _block(self, fn, weight_bufs, x, crow, col, nnzb, bh, bw, bias, device, plan_only):
        b, k = x.shape
        n = (crow.numel() - 1) * bh
        x2 = x_for_cp_async(x)
        y = torch.full((b, n), float("nan"), dtype=x.dtype)
        plan, err = Plan(), ctypes.create_string_buffer(4096)
        rc = fn(DTYPE_CODE[x.dtype], ctypes.byref(_dev(device)), _buf(x2, "x"), b, k, x2.shape[1], *weight_bufs,
                _buf(crow.contiguous(), "crow", 4), _buf(col.contiguous(), "col", 4), nnzb, bh, bw, n,
                _buf(bias, "bias", 2), _buf(y, "y"), int(plan_only), ctypes.byref(plan), err, len(err))
        self._check(rc, err)
        return y, plan

    # --- the planners alone (no tensors: any batch size) ---------------------------------------------
    def plan_semi24(self, b: int, n: int, k: int, device: Device = H100) -> Plan:
        return self._plan(lambda e, p, err: self.lib.sp_emu_semi24_linear(
            F16, ctypes.byref(_dev(device)), e, b, k, (k + 7) // 8 * 8, e, e, n, e, e, 1, p, err, len(err)))

    def plan_block(self, kind: str, b: int, n: int, k: int, block, nnzb: int, device: Device = H100) -> Plan:
        bh, bw = block
        if kind == "bsr":
            return self._plan(lambda e, p, err: self.lib.sp_emu_bsr_linear(
                F16, ctypes.byref(_dev(device)), e, b, k, k, e, e, e, nnzb, bh, bw, n, e, e, 1, p, err, len(err)))
        return self._plan(lambda e, p, err: self.lib.sp_emu_hybrid_linear(
            F16, ctypes.byref(_dev(device)), e, b, k, k, e, e, e, e, nnzb, bh, bw, n, e, e, 1, p, err, len(err)))

    def _plan(self, call) -> Plan:
        plan, err = Plan(), ctypes.create_string_buffer(4096)
        self._check(call(_buf(None, ""), ctypes.byref(plan), err), err)
        return plan

    # --- the emulator itself -------------------------------------------------------------------------
    def selftest(self, name: str, device: Device = H100) -> None:
        err = ctypes.create_string_buffer(4096)
        self._check(self.lib.sp_emu_selftest(name.encode(), ctypes.byref(_dev(device)), err, len(err)), err)

    def mma_sp(self, dtype, a, b, e, c, selector=0, ordered=True):
        """One mma.sp m16n8k32 on lane registers a [32, 4], b [32, 4], e [32] (uint32 as int64), c [32, 4]."""
        return self._mma(lambda *p: self.lib.sp_emu_mma_sp(DTYPE_CODE[dtype], selector, int(ordered), *p), a, b, e, c)

    def mma_dense(self, dtype, a, b, c):
        """One mma.sync m16n8k16 on lane registers a [32, 4], b [32, 2] (padded to 4), c [32, 4]."""
        bb = torch.zeros(32, 4, dtype=torch.int64)
        bb[:, :2] = b
        return self._mma(lambda a_, b_, e_, c_, d_, err, n: self.lib.sp_emu_mma_dense(DTYPE_CODE[dtype], a_, b_, c_,
                                                                                       d_, err, n), a, bb, None, c)

    def _mma(self, call, a, b, e, c):
        u32 = lambda t: (ctypes.c_uint32 * t.numel())(*[int(v) & 0xFFFFFFFF for v in t.reshape(-1).tolist()])
        ca, cb = u32(a), u32(b)
        ce = u32(e) if e is not None else None
        cc = (ctypes.c_float * 128)(*c.reshape(-1).tolist())
        d = (ctypes.c_float * 128)()
        err = ctypes.create_string_buffer(4096)
        self._check(call(ca, cb, ce, cc, d, err, len(err)), err)
        return torch.tensor(list(d), dtype=torch.float32).reshape(32, 4)

    def ldmatrix_x4(self, image: torch.Tensor, row_offset: list[int]) -> torch.Tensor:
        """ldmatrix.x4 over shared memory holding `image` (uint8); lane L gives byte offset row_offset[L]."""
        img = (ctypes.c_uint8 * image.numel())(*image.tolist())
        offs = (ctypes.c_int * 32)(*row_offset)
        r = (ctypes.c_uint32 * 128)()
        err = ctypes.create_string_buffer(4096)
        self._check(self.lib.sp_emu_ldmatrix_x4(img, image.numel(), offs, r, err, len(err)), err)
        return torch.tensor(list(r), dtype=torch.int64).reshape(32, 4)

    def to_half_bits(self, dtype, f: torch.Tensor) -> torch.Tensor:
        f = f.float().contiguous()
        out = torch.empty(f.numel(), dtype=torch.int16)
        self.lib.sp_emu_to_half_bits(DTYPE_CODE[dtype], ctypes.cast(f.data_ptr(), ctypes.POINTER(ctypes.c_float)),
                                     ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_uint16)), f.numel())
        return out

    def from_half_bits(self, dtype, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        out = torch.empty(h.numel(), dtype=torch.float32)
        self.lib.sp_emu_from_half_bits(DTYPE_CODE[dtype], ctypes.cast(h.data_ptr(), ctypes.POINTER(ctypes.c_uint16)),
                                       ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_float)), h.numel())
        return out

    def device_cache_race(self, threads: int, devices: int) -> tuple[int, list[int]]:
        calls = (ctypes.c_int * devices)()
        torn = self.lib.sp_emu_device_cache_race(threads, devices, calls)
        return torn, list(calls)


def build() -> Path:
    """Configures (once) and builds the emulator library under build/cuda_emu; returns its path. Incremental: a
    no-op when nothing changed. `make test` calls this before pytest (Makefile target `emu`)."""
    if not (BUILD / "CMakeCache.txt").exists():
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        r = subprocess.run(["cmake", "-S", str(SRC), "-B", str(BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release"],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"configuring the CUDA emulator failed:\n{r.stdout}\n{r.stderr}")
    r = subprocess.run(["cmake", "--build", str(BUILD), "--parallel", str(os.cpu_count() or 2)], capture_output=True,
                       text=True)
    if r.returncode:
        raise RuntimeError(f"building the CUDA emulator failed:\n{r.stdout}\n{r.stderr}")
    return LIB


@functools.cache
def load() -> Emu:
    return Emu(ctypes.CDLL(str(build())))


if __name__ == "__main__":
    print(f"CUDA emulator built: {build()}")
