"""Triton ``sparseprune::triton_hybrid``: y = x @ W^T + bias with W as BSR whose blocks are 2:4.

Visits only the stored blocks (as the BSR kernel) and expands each block from Semi24 form (kept
values + 4-bit position codes) to dense in registers right before ``tl.dot`` (as the Semi24 kernel),
so a 50%-dense block costs 9/16 of its dense bytes. Y^T = W X^T, masks pad batch and block sides.

Block width must be a multiple of 8 (one meta byte per 8 inputs); sides other than 16/32/64/128
(up to 128) are padded to the next power of two >= 16 inside the kernel.

Target (H100, fp16, 87.5% sparse = 75%-sparse blocks of 2:4, benchmarks/bench_gpu.py):
>= 4x over cuBLAS F.linear at batch 1-16.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from sparseprune.ops.hybrid import _reference as _ops_reference

from . import _common
from ._common import padded


@triton.jit
def _hybrid_kernel(
    x_ptr, v_ptr, m_ptr, crow_ptr, col_ptr, b_ptr, y_ptr,  # values [nnzb, BH, BW/2], meta u8 [nnzb, BH, BW/8]
    M, N, K, M_KEY,  # M_KEY: autotune key only
    BH: tl.constexpr, BW: tl.constexpr, BH_P: tl.constexpr, BW_P: tl.constexpr,  # block shape, padded to pow2 >= 16
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_N | BH_P, BLOCK_K | BW_P
):
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    brow = pid // (BH_P // BLOCK_N)
    rows = (pid % (BH_P // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    c2 = tl.arange(0, BLOCK_K // 2)  # kept-value column inside the chunk
    c8 = tl.arange(0, BLOCK_K // 8)  # meta byte inside the chunk
    cols = tl.arange(0, BLOCK_K)  # input column inside the chunk
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    r_ok = rows < BH

    # One flat loop over (stored block, BLOCK_K-wide chunk): registers scale with BLOCK_K, not BW.
    CHUNKS = BW_P // BLOCK_K
    start = tl.load(crow_ptr + brow)
    end = tl.load(crow_ptr + brow + 1)
    v_tile = v_ptr + rows[:, None] * (BW // 2) + c2[None, :]
    m_tile = m_ptr + rows[:, None] * (BW // 8) + c8[None, :]
    x_tile = x_ptr + offs_m[None, :] * K + cols[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(start * CHUNKS, end * CHUNKS):
        i = t // CHUNKS
        kc = (t % CHUNKS) * BLOCK_K
        c = tl.load(col_ptr + i)
        if BH == BH_P and BW == BW_P:  # unpadded block shape: no masks on the weight
            vals = tl.load(v_tile + (i * (BH * BW // 2) + kc // 2))
            mbyte = tl.load(m_tile + (i * (BH * BW // 8) + kc // 8))
        else:
            vals = tl.load(v_tile + (i * (BH * BW // 2) + kc // 2),
                           mask=r_ok[:, None] & (c2 + kc // 2 < BW // 2)[None, :], other=0.0)
            mbyte = tl.load(m_tile + (i * (BH * BW // 8) + kc // 8),
                            mask=r_ok[:, None] & (c8 + kc // 8 < BW // 8)[None, :], other=0)
        xt = tl.load(x_tile + (c * BW + kc), mask=(cols + kc < BW)[:, None] & m_ok[None, :], other=0.0)

        # Expand 2:4 -> dense [BLOCK_N, BLOCK_K] exactly as in semi24._semi24_kernel (kept inline
        # in each kernel rather than shared as a @triton.jit helper).
        lo, hi = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
        code = tl.reshape(tl.join(mbyte & 0xF, mbyte >> 4), (BLOCK_N, BLOCK_K // 4))
        p0 = code & 3
        p1 = code >> 2
        d0 = tl.where(p0 == 0, lo, 0.0)
        d1 = tl.where(p0 == 1, lo, tl.where(p1 == 1, hi, 0.0))
        d2 = tl.where(p0 == 2, lo, tl.where(p1 == 2, hi, 0.0))
        d3 = tl.where(p1 == 3, hi, 0.0)
        w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))

        if UPCAST:  # interpreter-only bf16 workaround (see _common.dot_flags)
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)

    offs_n = brow * BH + rows
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    y = y_ptr + offs_m[None, :] * N + offs_n[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & m_ok[None, :])


# Autotune configs by token bucket (_common.token_bucket), tuned per (M_KEY, N, K) for each block
# shape; BLOCK_N/BLOCK_K clipped to the padded block and stages capped for sm_80's 163 KB
# (_common.block_configs). Same tiling rationale as bsr.BSR_CONFIGS, but the in-register 2:4
# expansion needs about twice the registers per weight element, so weight chunks are kept to
# <= 32 elements per thread (BLOCK_N * BLOCK_K / threads): no spills on sm_80/sm_90.
HYBRID_CONFIGS: dict[str, list[triton.Config]] = {
    # 1-16 tokens: 16/32-row programs multiply the CTA count over block rows (fills 132 SMs).
    "gemv": [
        triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ],
    # 17-128 tokens: reuse each expanded chunk across 32-64 tokens.
    "small": [
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ],
    # 129+ tokens: compute bound, 128-token tiles amortise the expansion; BLOCK_K=32 avoids spills.
    "large": [
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ],
}


def configs_for(bucket: str, block: tuple[int, int], elem_size: int = 2) -> list[triton.Config]:
    bh_p, bw_p = padded(block[0]), padded(block[1])
    return _common.block_configs(HYBRID_CONFIGS[bucket], bh_p, bw_p,
                                 lambda kw: (kw["BLOCK_N"] * (kw["BLOCK_K"] * elem_size // 2 + kw["BLOCK_K"] // 8)
                                             + kw["BLOCK_M"] * kw["BLOCK_K"] * elem_size))


@functools.cache
def _tuned(bucket: str, block: tuple[int, int], elem_size: int):
    return triton.autotune(configs=configs_for(bucket, block, elem_size), key=["M_KEY", "N", "K"])(_hybrid_kernel)


def _check(x, values, meta, crow, col, in_features, bias) -> tuple[int, int, int, int]:
    if values.dim() != 3:
        raise ValueError(f"triton_hybrid: values must be [nnzb, bh, bw/2], got shape {tuple(values.shape)}")
    nnzb, bh, half = values.shape
    bw = 2 * half
    if not (1 <= bh <= _common.MAX_BLOCK_DIM and 8 <= bw <= _common.MAX_BLOCK_DIM and bw % 8 == 0):
        raise ValueError(f"triton_hybrid: block shape {bh}x{bw} is not supported "
                         f"(height 1..{_common.MAX_BLOCK_DIM}, width a multiple of 8 up to {_common.MAX_BLOCK_DIM})")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (nnzb, bh, bw // 8):
        raise ValueError(f"triton_hybrid: meta must be uint8 {[nnzb, bh, bw // 8]}, got {meta.dtype} {tuple(meta.shape)}")
    _common.check_block_index("triton_hybrid", crow, col, nnzb, bw, in_features)
    N = (crow.numel() - 1) * bh
    _common.check_common("triton_hybrid", x, values, bias, N, in_features, {"meta": meta, "crow": crow, "col": col})
    return N, in_features, bh, bw


def hybrid_forward(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                   in_features: int, bias: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """Host launcher. ``config`` launches that config directly (tests); None autotunes on GPU."""
    N, K, bh, bw = _check(x, values, meta, crow, col, in_features, bias)
    lead = x.shape[:-1]
    x2, y = _common.flat_input_and_output(x, K, N)
    if x2.shape[0] == 0 or N == 0:
        return y.reshape(*lead, N)
    args = dict(x_ptr=x2, v_ptr=values.contiguous(), m_ptr=meta.contiguous(), crow_ptr=crow.contiguous(),
                col_ptr=col.contiguous(), b_ptr=bias if bias is not None else x2, y_ptr=y,
                M=x2.shape[0], N=N, K=K, HAS_BIAS=bias is not None)
    _common.launch_block_rows("triton_hybrid", _hybrid_kernel, _tuned, configs_for, args, crow, bh, bw, x2, config)
    return y.reshape(*lead, N)


@triton_op("sparseprune::triton_hybrid", mutates_args=())
def triton_hybrid(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                  in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [..., N] with N = (len(crow) - 1) * bh, in x's dtype."""
    return hybrid_forward(x, values, meta, crow, col, in_features, bias)


def _reference(x, values, meta, crow, col, in_features, bias=None):
    """Plain torch (fp32 result): expand the 2:4 blocks, scatter to dense and F.linear."""
    return _ops_reference(x, values, meta, crow, col, in_features, bias)
