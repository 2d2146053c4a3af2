"""Triton ``sparseprune::triton_bsr``: y = x @ W^T + bias with W block-sparse (BSR).

Each program owns BLOCK_N rows of one block row of W and BLOCK_M tokens, and visits only the
blocks stored in that block row (crow/col), so work and bytes scale with the kept fraction. As in
the Semi24 kernel it computes Y^T = W X^T (weight rows on the dot's M side, tokens on its N side):
batch 1 and ragged batches take the same kernel, padded inside it with masks.

Block shapes: 16, 32, 64 and 128 on either side run unpadded; any other side up to 128 (e.g. 8 or
48) is padded in registers to the next power of two >= 16 (tl.dot needs >= 16 per side).

Targets (H100, fp16, 64x64 blocks at 90% sparsity, measured by benchmarks/bench_gpu.py):
>= 5x over cuBLAS F.linear at batch 1-16 and >= 3x at batch 4096.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from sparseprune.ops.bsr import _reference as _ops_reference

from . import _common
from ._common import padded  # noqa: F401  (bsr.padded: the padded block side, used by the tests)


@triton.jit
def _bsr_kernel(
    x_ptr, v_ptr, crow_ptr, col_ptr, b_ptr, y_ptr,  # x [M, K], values [nnzb, BH, BW], crow/col i32, bias [N], y [M, N]
    M, N, K, M_KEY,  # M_KEY: autotune key only
    BH: tl.constexpr, BW: tl.constexpr, BH_P: tl.constexpr, BW_P: tl.constexpr,  # block shape, padded to pow2 >= 16
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_N | BH_P, BLOCK_K | BW_P
):
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    brow = pid // (BH_P // BLOCK_N)
    rows = (pid % (BH_P // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows inside the block
    cols = tl.arange(0, BLOCK_K)  # columns inside the current chunk of the block
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    w_mask = (rows < BH)[:, None]
    x_mask = m_ok[None, :]

    # One flat loop over (stored block, BLOCK_K-wide chunk of it): registers scale with BLOCK_K,
    # not with the block width, and a single dynamic loop is what Triton's pipeliner handles.
    CHUNKS = BW_P // BLOCK_K
    start = tl.load(crow_ptr + brow)
    end = tl.load(crow_ptr + brow + 1)
    w_tile = v_ptr + rows[:, None] * BW + cols[None, :]
    x_tile = x_ptr + offs_m[None, :] * K + cols[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(start * CHUNKS, end * CHUNKS):
        i = t // CHUNKS
        kc = (t % CHUNKS) * BLOCK_K
        c = tl.load(col_ptr + i)
        if BH == BH_P and BW == BW_P:  # unpadded block shape: no masks on the weight
            w = tl.load(w_tile + (i * (BH * BW) + kc))
        else:
            w = tl.load(w_tile + (i * (BH * BW) + kc), mask=w_mask & (cols + kc < BW)[None, :], other=0.0)
        xt = tl.load(x_tile + (c * BW + kc), mask=x_mask & (cols + kc < BW)[:, None], other=0.0)
        if UPCAST:  # interpreter-only bf16 workaround (see _common.dot_flags)
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)

    offs_n = brow * BH + rows
    n_ok = rows < BH
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y = y_ptr + offs_m[None, :] * N + offs_n[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


# Autotune configs by token bucket (_common.token_bucket), tuned per (M_KEY, N, K) for each block
# shape. _common.block_configs clips BLOCK_N to the padded block height and BLOCK_K to the padded
# width (a 16x16 block never gets a 64-row tile) and caps stages for sm_80's 163 KB of shared memory.
# Sizes keep the fp32 accumulator <= 64 and the operand tiles <= ~48 registers per thread: no
# config spills on sm_80 or sm_90 (checked by tests/test_triton_aot.py).
BSR_CONFIGS: dict[str, list[triton.Config]] = {
    # 1-16 tokens: split each block row into 16/32-row programs so 64x64 blocks at 90% still
    # launch ~4x more CTAs than block rows (N=4096 -> 64 block rows -> 256 programs).
    "gemv": [
        triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    ],
    # 17-128 tokens: whole 64-row tiles, 32-64 tokens, to reuse each weight block across tokens.
    "small": [
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ],
    # 129+ tokens: compute bound; 128-token tiles with BLOCK_K=32 (64 spills at 128x128 tiles).
    "large": [
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ],
}


def configs_for(bucket: str, block: tuple[int, int], elem_size: int = 2) -> list[triton.Config]:
    bh_p, bw_p = padded(block[0]), padded(block[1])
    return _common.block_configs(BSR_CONFIGS[bucket], bh_p, bw_p,
                                 lambda kw: (kw["BLOCK_N"] + kw["BLOCK_M"]) * kw["BLOCK_K"] * elem_size)


@functools.cache
def _tuned(bucket: str, block: tuple[int, int], elem_size: int):
    return triton.autotune(configs=configs_for(bucket, block, elem_size), key=["M_KEY", "N", "K"])(_bsr_kernel)


def _check(x, values, crow, col, in_features, bias) -> tuple[int, int, int, int]:
    if values.dim() != 3:
        raise ValueError(f"triton_bsr: values must be [nnzb, bh, bw], got shape {tuple(values.shape)}")
    nnzb, bh, bw = values.shape
    if not (1 <= bh <= _common.MAX_BLOCK_DIM and 1 <= bw <= _common.MAX_BLOCK_DIM):
        raise ValueError(f"triton_bsr: block shape {bh}x{bw} is not supported (each side 1..{_common.MAX_BLOCK_DIM})")
    _common.check_block_index("triton_bsr", crow, col, nnzb, bw, in_features)
    N = (crow.numel() - 1) * bh
    _common.check_common("triton_bsr", x, values, bias, N, in_features, {"crow": crow, "col": col})
    return N, in_features, bh, bw


def bsr_forward(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, in_features: int,
                bias: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """Host launcher. ``config`` launches that config directly (tests; BLOCK_N must divide the
    padded block height); None autotunes on GPU."""
    N, K, bh, bw = _check(x, values, crow, col, in_features, bias)
    lead = x.shape[:-1]
    x2, y = _common.flat_input_and_output(x, K, N)
    if x2.shape[0] == 0 or N == 0:
        return y.reshape(*lead, N)
    args = dict(x_ptr=x2, v_ptr=values.contiguous(), crow_ptr=crow.contiguous(), col_ptr=col.contiguous(),
                b_ptr=bias if bias is not None else x2, y_ptr=y, M=x2.shape[0], N=N, K=K, HAS_BIAS=bias is not None)
    _common.launch_block_rows("triton_bsr", _bsr_kernel, _tuned, configs_for, args, crow, bh, bw, x2, config)
    return y.reshape(*lead, N)


@triton_op("sparseprune::triton_bsr", mutates_args=())
def triton_bsr(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, in_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [..., N] with N = (len(crow) - 1) * bh, in x's dtype."""
    return bsr_forward(x, values, crow, col, in_features, bias)


def _reference(x, values, crow, col, in_features, bias=None):
    """Plain torch (fp32 result): scatter the blocks to dense and F.linear."""
    return _ops_reference(x, values, crow, col, in_features, bias)
