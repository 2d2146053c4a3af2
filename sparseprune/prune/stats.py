"""Calibration statistics of a layer's GEMM inputs, gathered by the pre-hooks of calibrate.py.

``LayerStats`` holds what the scoring methods need of an nn.Linear's inputs X [tokens, in].
``ConvInputStats`` does the same for a Conv2d's unfolded patches, in the weight's K order: Wanda
scores a conv weight by |W[:, k]| * ||X_k|| and SparseGPT reconstructs it from H = 2 X^T X / n, where
X [N*Ho*Wo, kh*kw*C] is the input unfolded by the same :func:`~sparseprune.formats.conv.im2col` the
kernels run on (every output pixel is one sample, column k of X meets column k of the GEMM weight).
The patches are unfolded a slice of the batch at a time, so calibration never holds more than about
``CHUNK_ELEMENTS`` of them. ``stats_for`` picks the kind for a module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.conv import ConvGeometry, im2col


class LayerStats:
    """Running statistics of one layer's inputs X [tokens, in], accumulated in fp32.

    ``sq_mean``: mean over tokens of x_j^2 (so ||X_j||_2 = sqrt(n * sq_mean)); ``mean``: mean of x_j
    (channel pruning's bias compensation). ``H``: SparseGPT's 2 X^T X / n (kept as a running mean
    so it never overflows), only when ``hessian=True``.
    """

    def __init__(self, in_features: int, device, hessian: bool):
        self.in_features = in_features
        self.n = 0
        self.sq_mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features)
        t = x.shape[0]
        if t == 0:
            return
        x = x.to(device=self.sq_mean.device, dtype=torch.float32)
        total = self.n + t
        self.sq_mean.mul_(self.n / total).add_(x.pow(2).sum(0), alpha=1.0 / total)
        self.mean.mul_(self.n / total).add_(x.sum(0), alpha=1.0 / total)
        if self.H is not None:
            xs = x * (2.0 / total) ** 0.5
            self.H.mul_(self.n / total).addmm_(xs.t(), xs)
        self.n = total

    def col_norm(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens, per input j."""
        return (self.sq_mean * self.n).sqrt()

    def permuted(self, perm: torch.Tensor) -> "LayerStats":
        """The statistics of the inputs taken in ``perm`` order."""
        out = LayerStats.__new__(LayerStats)
        out.in_features, out.n = self.in_features, self.n
        perm = perm.to(self.sq_mean.device)
        out.sq_mean = self.sq_mean[perm]
        out.mean = self.mean[perm]
        out.H = None if self.H is None else self.H[perm][:, perm]
        return out


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


def stats_for(module: nn.Module, hessian: bool) -> LayerStats:
    """Statistics of ``module``'s GEMM inputs: a Conv2d's unfolded patches, else an nn.Linear's rows."""
    w = module.weight
    if isinstance(module, nn.Conv2d):
        return ConvInputStats(module, w.device, hessian)
    return LayerStats(module.in_features, w.device, hessian)
