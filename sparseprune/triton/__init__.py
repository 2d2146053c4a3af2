"""Triton backend: Semi24, BlockSparse and Hybrid kernels as ``torch.ops.sparseprune.triton_*``.

Importing this module registers ``TritonBackend`` (``backends._OPTIONAL["triton"]``). It runs on
CUDA devices of compute capability >= 8.0, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how CI tests the kernels without a GPU.

Each op is a ``torch.library.triton_op`` whose kernels launch through ``wrap_triton``, so
``torch.compile(fullgraph=True)`` traces into them and CUDA graphs capture them. In eager mode the
backend calls the same host launchers directly, skipping the custom-op dispatch overhead (tens
of microseconds, more than a batch-1 kernel takes).
"""

from __future__ import annotations

import torch

from sparseprune.backends import Backend, register_backend

from . import _common
from .bsr import bsr_forward, triton_bsr
from .hybrid import hybrid_forward, triton_hybrid
from .semi24 import semi24_forward, triton_semi24

__all__ = ["TritonBackend", "triton_semi24", "triton_bsr", "triton_hybrid"]


class TritonBackend(Backend):
    name = "triton"
    kinds = ("semi24", "bsr", "hybrid")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def unavailable_reason(self, device):
        return _common.unavailable_reason(device)

    def unsupported_reason(self, weight, device):
        why = super().unsupported_reason(weight, device)
        if why is None and weight.kind in ("bsr", "hybrid"):
            bh, bw = weight.block_size
            if max(bh, bw) > _common.MAX_BLOCK_DIM:
                return f"backend 'triton' supports block sides up to {_common.MAX_BLOCK_DIM}, got {bh}x{bw}"
        return why

    def forward(self, module, x):
        compiling = torch.compiler.is_compiling()
        if module.kind == "semi24":
            if compiling:
                return torch.ops.sparseprune.triton_semi24(x, module.values, module.meta, module.bias)
            return semi24_forward(x, module.values, module.meta, module.bias)
        if module.kind == "bsr":
            if compiling:
                return torch.ops.sparseprune.triton_bsr(x, module.values, module.crow, module.col,
                                                       module.in_features, module.bias)
            return bsr_forward(x, module.values, module.crow, module.col, module.in_features, module.bias)
        if compiling:
            return torch.ops.sparseprune.triton_hybrid(x, module.values, module.meta, module.crow, module.col,
                                                      module.in_features, module.bias)
        return hybrid_forward(x, module.values, module.meta, module.crow, module.col, module.in_features, module.bias)


register_backend(TritonBackend())
