"""``SparseConv2d``: a drop-in ``nn.Conv2d`` (groups=1) whose weight is packed as a GEMM weight.

The weight is W [O, kh*kw*C] in the channels-last reduction order of
:mod:`sparseprune.formats.conv`, so the convolution is ``im2col(x) @ W^T + b`` and runs on the
same linear kernels (and backends: cpu, triton, cuda) as :class:`~sparseprune.modules.SparseLinear`:

* a 1x1 stride-1 unpadded conv on a channels-last input is that GEMM with no copy at all;
* any other conv unfolds the input into patches first (one copy, kh*kw times the input; see
  :func:`~sparseprune.formats.conv.im2col`), then runs the GEMM; on CPU a few images at a time
  (``CPU_CHUNK_BYTES`` of patches), so they stay in cache and no buffer is faulted in per call.

The output is [N, O, Ho, Wo] in channels-last memory format (the GEMM's [N*Ho*Wo, O] viewed, no
copy); feed the model channels-last inputs (``x.to(memory_format=torch.channels_last)``) so no
layer has to transpose its input. With backend="auto" the dense candidate is ``F.conv2d`` on the
dense weight (oneDNN / cuDNN), so a layer where unfolding plus the sparse GEMM loses runs dense.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import backends as _backends
from .formats import PackedWeight
from .formats.conv import ConvGeometry, gemm_to_conv_weight, im2col
from .modules import PackedModule

# Patches unfolded at once on CPU at most (fp32: one 56x56x576 ResNet-50 layer1 image is 7.2 MB).
# Below glibc's largest mmap threshold (32 MB), freed buffers are reused without page faults.
CPU_CHUNK_BYTES = 8 << 20


class SparseConv2d(PackedModule):
    """y = conv2d(x, W) + b with W stored packed as [out_channels, kh*kw*in_channels].

    ``geometry``: kernel size, stride, padding (ints, "same" or "valid"), dilation and
    padding_mode of the conv (:class:`~sparseprune.formats.conv.ConvGeometry`); groups must be 1.
    Accepts [N, C, H, W] (any memory format, batch 0 included) or unbatched [C, H, W] input.
    """

    def __init__(self, weight: PackedWeight, geometry: ConvGeometry, bias: torch.Tensor | None = None,
                 backend: str = "auto"):
        if weight.shape[1] != geometry.k:
            raise ValueError(f"packed weight is {weight.shape[0]}x{weight.shape[1]} but the conv's kh*kw*C is "
                             f"{geometry.kernel_size[0]}*{geometry.kernel_size[1]}*{geometry.in_channels} = {geometry.k}")
        super().__init__(weight, bias, backend)
        self.geometry = geometry
        self.in_channels = geometry.in_channels
        self.out_channels = self.out_features
        self.kernel_size, self.stride, self.dilation = geometry.kernel_size, geometry.stride, geometry.dilation
        self.padding, self.padding_mode = geometry.padding, geometry.padding_mode
        self.groups = 1

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight: PackedWeight, backend: str = "auto") -> "SparseConv2d":
        return cls(weight, ConvGeometry.of(conv), conv.bias, backend)

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense conv weight [O, C, kh, kw]."""
        kh, kw = self.kernel_size
        return gemm_to_conv_weight(self.packed_weight().to_dense(), (self.out_channels, self.in_channels, kh, kw))

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise RuntimeError(f"SparseConv2d: expected input [N, {self.in_channels}, H, W] or [{self.in_channels}, H, W], "
                               f"got shape {tuple(x.shape)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        ho, wo = self.geometry.output_size(x.shape[2], x.shape[3])  # raises if the kernel does not fit
        y = self._run(self._backend_for(x, x.shape[0] * ho * wo), x)
        return y.squeeze(0) if unbatched else y

    def _run(self, backend: _backends.Backend, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if backend.name == "dense":
            # The dense baseline is the library's own conv (no im2col); the dense GEMM copy of the
            # weight viewed as [O, C, kh, kw] is channels-last strided, which oneDNN/cuDNN prefer.
            kh, kw = g.kernel_size
            w = self.dense_weight.view(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2)
            padding = g.padding
            if g.padding_mode != "zeros":
                top, bottom, left, right = g.pad
                x = F.pad(x, (left, right, top, bottom), mode=g.padding_mode)
                padding = 0
            y = F.conv2d(x, w, self.bias, g.stride, padding, g.dilation)
            return y.contiguous(memory_format=torch.channels_last)
        n, ho, wo = x.shape[0], *g.output_size(x.shape[2], x.shape[3])
        per_image = ho * wo * g.k * x.element_size()
        if x.device.type == "cpu" and g.unfolds and n > 1 and n * per_image > CPU_CHUNK_BYTES:
            # A few images at a time: the patches stay in cache for the GEMM and their buffer is
            # reused by malloc instead of fresh pages faulted in on every call (at batch 16 the
            # ResNet-50 layer1 3x3 took about half the CPU time this way; see
            # benchmarks/bench_conv_im2col.py to measure im2col against the GEMM and dense conv).
            step = max(1, CPU_CHUNK_BYTES // per_image)
            y = torch.cat([backend.forward(self, im2col(x[i:i + step], g)[0]) for i in range(0, n, step)])
        else:
            y = backend.forward(self, im2col(x, g)[0])
        return y.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)

    # --- autotune hooks -----------------------------------------------------------------------------
    def autotune_input(self, rows: int) -> torch.Tensor:
        # One roughly square image with about ``rows`` output pixels (cost scales with the pixel
        # count; 1 -> 1x1, 8 -> 2x4, 64 -> 8x8, 512 -> 16x32, 1024 -> 32x32).
        ho = max(d for d in range(1, math.isqrt(rows) + 1) if rows % d == 0)
        h, w = self.geometry.input_size_for(ho, rows // ho)
        x = torch.randn(1, self.in_channels, h, w, device=self.values.device).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last)

    def autotune_call(self, backend: _backends.Backend, x: torch.Tensor) -> torch.Tensor:
        return self._run(backend, x)

    def autotune_key(self) -> str:
        return f"|conv={self.geometry.describe()}"

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
                f"padding={g.padding}, dilation={g.dilation}"
                + (f", padding_mode={g.padding_mode}" if g.padding_mode != "zeros" else "")
                + f", {self._packed_repr()}")
