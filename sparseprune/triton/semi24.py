"""Triton ``sparseprune::triton_semi24``: y = x @ W^T + bias with W kept in Semi24 (2:4) form.

The weight stays compressed in GPU memory (values [N, K/2] + 4-bit position codes [N, ceil(K/8)])
and each tile is expanded to dense in registers right before ``tl.dot``. Triton has no sparse
tensor-core dot, so the gain is bytes, not math: 9/16 of the dense fp16 bytes caps the speedup in
the memory-bound regime (1-64 tokens) at 1.78x; at large batch it costs the expansion over dense.

Targets (H100, fp16, Llama-3-8B shapes, measured by benchmarks/bench_gpu.py): >= 1.6x over cuBLAS
F.linear at batch 1-16 (PyTorch's own 2:4 path runs at 0.11x at batch 1, pytorch#111339).

The kernel computes Y^T = W X^T: output features fill the dot's M side (>= 16 of them per tile),
tokens its N side, so a batch of 1 wastes only the 16-wide token tile and never the weight reads.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from sparseprune.ops.semi24 import _reference as _ops_reference

from . import _common


@triton.jit
def _semi24_kernel(
    x_ptr, v_ptr, m_ptr, b_ptr, y_ptr,  # x [M, K], values [N, K/2], meta u8 [N, ceil(K/8)], bias [N], y [M, N]
    M, N, K, M_KEY,  # M_KEY: autotune key only (token count rounded up to a power of two)
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M token tiles walk the same weight tiles together, so at large
    # batch each weight tile is read from DRAM once per group instead of once per token tile.
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    K2 = K // 2
    KM = (K + 7) // 8
    v_rows = v_ptr + offs_n[:, None] * K2
    m_rows = m_ptr + offs_n[:, None] * KM
    x_cols = x_ptr + offs_m[None, :] * K

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k2 = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        k8 = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        kk = k0 + tl.arange(0, BLOCK_K)
        vals = tl.load(v_rows + k2[None, :], mask=n_ok[:, None] & (k2 < K2)[None, :], other=0.0)
        mbyte = tl.load(m_rows + k8[None, :], mask=n_ok[:, None] & (k8 < KM)[None, :], other=0)
        xt = tl.load(x_cols + kk[:, None], mask=(kk < K)[:, None] & m_ok[None, :], other=0.0)

        # Expand 2:4 -> dense [BLOCK_N, BLOCK_K] in registers. Group g keeps lo = values[2g] at
        # position p0 and hi = values[2g+1] at p1 (p0 < p1); code g is nibble g%2 of byte g//2.
        # Masked (padding) bytes are 0 -> p0 = p1 = 0 with lo = hi = 0: a zero group.
        lo, hi = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
        code = tl.reshape(tl.join(mbyte & 0xF, mbyte >> 4), (BLOCK_N, BLOCK_K // 4))
        p0 = code & 3
        p1 = code >> 2
        d0 = tl.where(p0 == 0, lo, 0.0)
        d1 = tl.where(p0 == 1, lo, tl.where(p1 == 1, hi, 0.0))
        d2 = tl.where(p0 == 2, lo, tl.where(p1 == 2, hi, 0.0))
        d3 = tl.where(p1 == 3, hi, 0.0)
        # join(join(d0, d2), join(d1, d3))[n, g, i, s] = d_{2i+s}: row-major flattening is position 4g+j.
        w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))

        if UPCAST:  # interpreter-only bf16 workaround (see _common.dot_flags)
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y = y_ptr + offs_m[None, :] * N + offs_n[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


# Autotune configs by token bucket (_common.token_bucket), tuned per (M_KEY, N, K).
# The expanded weight tile is built in registers, so Triton does not multi-buffer these loads
# through shared memory (num_stages barely changes anything): the binding limit is registers.
# Tiles are sized so BLOCK_N * BLOCK_K / threads stays <= ~32 weight elements per thread: every
# config compiles without spills on sm_80 and sm_90 (regs in comments: sm_80/sm_90, Triton 3.9,
# checked by tests/test_triton_aot.py).
SEMI24_CONFIGS: dict[str, list[triton.Config]] = {
    # 1-16 tokens: memory bound, one 16-wide token tile. Narrow weight tiles give enough CTAs to
    # fill 132 SMs at N=4096 (BLOCK_N=16 -> 256 CTAs); long BLOCK_K keeps bytes in flight.
    "gemv": [
        triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=3),  # 122/128 regs
        triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=8, num_stages=3),  # 143/144
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=3),  # 146/229
        # BLOCK_K=256 at 8 warps: half the loop trips for K=14336 (down_proj).
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=8, num_stages=3),  # 192/195
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=8, num_stages=3),  # 175/128
    ],
    # 17-128 tokens: still mostly bandwidth bound; 32-64 token tiles reuse each expanded weight tile.
    "small": [
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_K": 64, "GROUP_M": 1}, num_warps=4, num_stages=3),  # 215/211
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=8, num_stages=3),  # 216/185
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 64, "GROUP_M": 1}, num_warps=8, num_stages=3),  # 181/174
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 64, "GROUP_M": 1}, num_warps=8, num_stages=3),  # 242/204
    ],
    # 129+ tokens: compute bound. 128x128 output tiles need BLOCK_K=32 to stay out of spills
    # (BLOCK_K=64 spills 440 B on sm_80, 128x256 spills kilobytes); GROUP_M=8 for L2 reuse.
    "large": [
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),  # 246/218
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),  # 255/254
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),  # 242/204
    ],
}


@functools.cache
def _tuned(bucket: str):
    return triton.autotune(configs=SEMI24_CONFIGS[bucket], key=["M_KEY", "N", "K"])(_semi24_kernel)


def _check(x, values, meta, bias) -> tuple[int, int]:
    if values.dim() != 2:
        raise ValueError(f"triton_semi24: values must be [N, K/2], got shape {tuple(values.shape)}")
    N, K = values.shape[0], values.shape[1] * 2
    if K % 4:
        raise ValueError(f"triton_semi24: in_features must be a multiple of 4, got {K}")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (N, (K + 7) // 8):
        raise ValueError(f"triton_semi24: meta must be uint8 [{N}, {(K + 7) // 8}], got {meta.dtype} {tuple(meta.shape)}")
    _common.check_common("triton_semi24", x, values, bias, N, K, {"meta": meta})
    return N, K


def semi24_forward(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                   config: triton.Config | None = None) -> torch.Tensor:
    """Host launcher. ``config`` launches that config directly (tests); None autotunes on GPU."""
    N, K = _check(x, values, meta, bias)
    lead = x.shape[:-1]
    x2, y = _common.flat_input_and_output(x, K, N)
    M = x2.shape[0]
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    values, meta = values.contiguous(), meta.contiguous()
    upcast, precision = _common.dot_flags(x.dtype, x.device)
    if config is None and x.device.type == "cpu":
        config = SEMI24_CONFIGS[_common.token_bucket(M)][0]
    args = dict(x_ptr=x2, v_ptr=values, m_ptr=meta, b_ptr=bias if bias is not None else x2, y_ptr=y,
                M=M, N=N, K=K, M_KEY=_common.token_key(M),
                HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision)

    def grid(meta_):
        return (triton.cdiv(N, meta_["BLOCK_N"]) * triton.cdiv(M, meta_["BLOCK_M"]),)

    _common.launch(_semi24_kernel, lambda: _tuned(_common.token_bucket(M)), grid, args, config, x2)
    return y.reshape(*lead, N)


@triton_op("sparseprune::triton_semi24", mutates_args=())
def triton_semi24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype; ``values`` [N, K/2], ``meta`` uint8 [N, ceil(K/8)]."""
    return semi24_forward(x, values, meta, bias)


def _reference(x, values, meta, bias=None):
    """Plain torch (fp32 result): unpack to dense and F.linear."""
    return _ops_reference(x, values, meta, bias)
