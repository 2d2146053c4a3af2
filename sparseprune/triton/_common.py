"""Shared host-side plumbing for the Triton ops: input checks, interpreter handling, launching.

Interpreter (CI) mode: with ``TRITON_INTERPRET=1`` the kernels run on CPU tensors. Triton decides
when ``@triton.jit`` runs (ours and its own library functions such as ``tl.zeros``, decorated when
triton is imported) whether it builds a compiled or an interpreted kernel, so the variable must be
set before triton is first imported; ``unavailable_reason`` says so when it was set too late.
Ahead-of-time compilation needs compiled-mode kernels, so it runs in a process without it.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.runtime.jit import JITFunction

try:  # Triton >= 3.4 exposes its environment knobs; read them at call time
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton
    _knobs = None

# Pointer-offset products stay below 2**31 up to this many elements per operand; bigger inputs
# would need int64 offsets everywhere, which costs registers on the hot path.
MAX_ELEMENTS = 2**31 - 1
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Block dimensions the BSR/Hybrid kernels take (padded to a power of two >= 16 inside the kernel).
MAX_BLOCK_DIM = 128


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 is set now (kernels on CPU tensors run in the interpreter)."""
    if _knobs is not None:
        return bool(_knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # pragma: no cover


@triton.jit
def _probe_kernel():
    # Never launched: decorated like the real kernels, it shows which mode triton.jit was in.
    pass


def kernels_interpreted() -> bool:
    """True when this process's @triton.jit kernels were built for the interpreter."""
    return not isinstance(_probe_kernel, JITFunction)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded(d: int) -> int:
    """A block side as the BSR/Hybrid kernels see it: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(d))


def token_bucket(m: int) -> str:
    """Autotune bucket by token count: GEMV-like decode, small batches, and GEMM-like prefill."""
    if m <= 16:
        return "gemv"
    if m <= 128:
        return "small"
    return "large"


def token_key(m: int) -> int:
    """Autotune key for the token count: next power of two, so nearby batch sizes share a tuning."""
    return min(next_pow2(max(m, 1)), 16384)


def dot_flags(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """(UPCAST, PRECISION) constexprs for the kernels' tl.dot.

    UPCAST: Triton 3.9's interpreter returns garbage for tl.dot on bf16 operands (fp16/fp32 are
    exact to rounding), so under the interpreter bf16 tiles are upcast to fp32 just before the dot.
    It is only ever set for CPU (interpreted) launches, so the GPU path keeps bf16 tensor cores.
    PRECISION: fp32 inputs use "ieee" (true fp32 FMA, matching F.linear with TF32 off); fp16/bf16
    ignore it.
    """
    upcast = device.type == "cpu" and dtype == torch.bfloat16
    precision = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    return upcast, precision


def unavailable_reason(device) -> str | None:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "backend 'triton' needs CUDA, but torch.cuda.is_available() is False"
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cc = torch.cuda.get_device_capability(idx)
        if cc < (8, 0):
            return f"backend 'triton' needs compute capability >= 8.0, but {torch.cuda.get_device_name(idx)} is sm_{cc[0]}{cc[1]}"
        return None
    if device.type == "cpu":
        if not interpreting():
            return "backend 'triton' runs on CPU tensors only under the Triton interpreter (set TRITON_INTERPRET=1)"
        if not kernels_interpreted():
            return ("backend 'triton': TRITON_INTERPRET=1 was set after triton was imported, so its kernels are "
                    "compiled-mode; set it before the first `import triton` (e.g. in the environment)")
        return None
    return f"backend 'triton' runs on CUDA devices (or CPU with TRITON_INTERPRET=1), not {device.type}"


def check_common(op: str, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, n_out: int,
                 k_in: int, extra: dict[str, torch.Tensor]) -> None:
    """Device, dtype and shape checks shared by the three ops; raises ValueError/TypeError/RuntimeError."""
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (features last), got a scalar")
    if x.dtype not in GPU_DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: x is {x.dtype} but the weight values are {values.dtype}; they must match")
    if x.shape[-1] != k_in:
        raise ValueError(f"{op}: x has {x.shape[-1]} input features, the weight expects {k_in}")
    tensors = {"values": values, **extra}
    if bias is not None:
        tensors["bias"] = bias
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({n_out},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias is {bias.dtype} but x is {x.dtype}; they must match")
    for name, t in tensors.items():
        if t.device != x.device:
            raise RuntimeError(f"{op}: x is on {x.device} but {name} is on {t.device}")
    why = unavailable_reason(x.device)
    if why is not None:
        raise RuntimeError(f"{op}: {why}")
    for name, t in {"x": x, **tensors}.items():
        if t.numel() > MAX_ELEMENTS:
            raise ValueError(f"{op}: {name} has {t.numel()} elements; the kernels use 32-bit offsets (max {MAX_ELEMENTS})")


def new_output(shape, like: torch.Tensor) -> torch.Tensor:
    """Output buffer; NaN-filled under SPARSEPRUNE_POISON=1 so unwritten elements fail tests."""
    if os.environ.get("SPARSEPRUNE_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def is_fake(t: torch.Tensor) -> bool:
    """True for tensors with no data (FakeTensor / meta, e.g. during torch.compile tracing or opcheck)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return t.device.type == "meta" or _is_fake(t)


def config_kwargs(config: triton.Config) -> dict:
    """Meta-parameters plus launch options of a Config, for a direct (non-autotuned) launch."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def launch(kernel, tuned, grid, args: dict, config: triton.Config | None, x: torch.Tensor) -> None:
    """Launch ``kernel`` with ``args``: the explicit ``config`` if given, else the autotuner ``tuned()``.

    CPU tensors run the interpreted kernel with ``config`` (the bucket's first config when None):
    autotuning means timing, which is meaningless in the interpreter. GPU launches go through
    ``torch.library.wrap_triton`` so torch.compile and CUDA graphs see the kernel.
    """
    if x.device.type == "cpu":
        if is_fake(x):
            return  # shapes only; the output was already allocated
        kernel[grid](**args, **config_kwargs(config))
        return
    from torch.library import wrap_triton

    if config is not None:
        wrap_triton(kernel)[grid](**args, **config_kwargs(config))
    else:
        wrap_triton(tuned())[grid](**args)


SMEM_BUDGET = 160 * 1024  # sm_80: 163 KB dynamic shared memory per block, minus a margin


def block_configs(base: list[triton.Config], bh_p: int, bw_p: int, bytes_per_stage) -> list[triton.Config]:
    """``base`` fitted to one padded block shape: BLOCK_N/BLOCK_K clipped to it, stages within SMEM_BUDGET, deduplicated."""
    out, seen = [], set()
    for c in base:
        kw = dict(c.kwargs, BLOCK_N=min(c.kwargs["BLOCK_N"], bh_p), BLOCK_K=min(c.kwargs["BLOCK_K"], bw_p))
        stages = c.num_stages
        while stages > 2 and stages * bytes_per_stage(kw) > SMEM_BUDGET:
            stages -= 1
        key = (tuple(sorted(kw.items())), c.num_warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=stages))
    return out


def check_block_index(op: str, crow: torch.Tensor, col: torch.Tensor, nnzb: int, bw: int, in_features: int) -> None:
    """Checks of the BSR block index (crow/col) that the BSR and Hybrid ops share; raises ValueError."""
    for name, t in (("crow", crow), ("col", col)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{op}: {name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if col.numel() != nnzb:
        raise ValueError(f"{op}: col has {col.numel()} entries but values holds {nnzb} blocks")
    if in_features % bw:
        raise ValueError(f"{op}: in_features={in_features} is not a multiple of the block width {bw}")


def flat_input_and_output(x: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., k] as a contiguous [M, k] matrix, and the [M, n] output buffer (see new_output)."""
    x2 = x.reshape(-1, k).contiguous()
    return x2, new_output((x2.shape[0], n), x2)


def launch_block_rows(op: str, kernel, tuned, configs_for, args: dict, crow: torch.Tensor, bh: int, bw: int,
                      x2: torch.Tensor, config: triton.Config | None) -> None:
    """Launch a BSR-layout kernel (BSR, Hybrid) over ``x2`` [M, K]: one program per BLOCK_N rows of a
    block row and BLOCK_M tokens.

    ``args`` holds the op's pointers and M/N/K/HAS_BIAS; this adds the autotune key, the block
    shape (and its padded sides), and the dot flags. ``tuned(bucket, block, elem_size)`` gives the
    autotuner, ``configs_for(bucket, block)`` the configs fitted to the block (the first is the
    CPU default). An explicit ``config`` must fit the padded block.
    """
    M = x2.shape[0]
    bh_p, bw_p = padded(bh), padded(bw)
    upcast, precision = dot_flags(x2.dtype, x2.device)
    bucket = token_bucket(M)
    if config is None and x2.device.type == "cpu":
        config = configs_for(bucket, (bh, bw))[0]
    if config is not None and (bh_p % config.kwargs["BLOCK_N"] or bw_p % config.kwargs["BLOCK_K"]):
        raise ValueError(f"{op}: config {config.kwargs} does not fit the padded block {bh_p}x{bw_p} "
                         "(BLOCK_N and BLOCK_K must divide it; use configs_for)")
    args = dict(args, M_KEY=token_key(M), BH=bh, BW=bw, BH_P=bh_p, BW_P=bw_p, UPCAST=upcast, PRECISION=precision)
    nbr = crow.numel() - 1

    def grid(meta_):
        return (nbr * (bh_p // meta_["BLOCK_N"]), triton.cdiv(M, meta_["BLOCK_M"]))

    launch(kernel, lambda: tuned(bucket, (bh, bw), x2.element_size()), grid, args, config, x2)
