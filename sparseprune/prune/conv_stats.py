"""Calibration statistics of a Conv2d's GEMM inputs: its unfolded patches, in the weight's K order.

Wanda scores a conv weight by |W[:, k]| * ||X_k|| and SparseGPT reconstructs it from
H = 2 X^T X / n, where X [N*Ho*Wo, kh*kw*C] is the input unfolded by the same
:func:`~sparseprune.formats.conv.im2col` the kernels run on: every output pixel is one sample,
and column k of X meets column k of the GEMM weight. The patches are unfolded a slice of the
batch at a time, so calibration never holds more than about ``CHUNK_ELEMENTS`` of them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.conv import ConvGeometry, im2col
from .calibrate import LayerStats

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 patches per step


class ConvInputStats(LayerStats):
    """LayerStats over the unfolded patches of a (groups=1) conv's input."""

    def __init__(self, conv: nn.Conv2d, device, hessian: bool):
        self.geometry = ConvGeometry.of(conv)
        super().__init__(self.geometry.k, device, hessian)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        if x.shape[0] == 0:
            return
        ho, wo = self.geometry.output_size(x.shape[2], x.shape[3])
        per_image = max(1, ho * wo * self.geometry.k)
        step = max(1, CHUNK_ELEMENTS // per_image)
        for i in range(0, x.shape[0], step):
            cols, _ = im2col(x[i:i + step], self.geometry)
            super().add(cols)
