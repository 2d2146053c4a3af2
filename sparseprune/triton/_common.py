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
