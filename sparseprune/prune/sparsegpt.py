"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with reconstruction of the kept weights.

With H = 2 X X^T / n over the calibration inputs X of a layer, pruning weight w_ij and
updating the not-yet-processed weights of row i by -w_ij / [H^-1]_jj * [H^-1]_j,: minimizes
the layer's output error ||X W^T - X W'^T||. Columns are processed left to right using the
upper Cholesky factor of H^-1 (each step's inverse of the remaining sub-Hessian), with lazy
batch updates: inside a block of 128 columns updates are applied immediately, the rest of the
matrix is updated once per block (one GEMM).

Masks: N:M chooses the group's pruned weights when the sweep reaches the group's first column
(saliency w^2 / [U]_jj^2 with the weights as updated so far); unstructured chooses per block of
128 columns; block and hybrid choose the blocks first by OBS saliency w^2 / [H^-1]_jj summed
over each block, then reconstruct the kept weights (hybrid adds the adaptive 2:4 inside them).

Memory: H, its inverse and a float copy of W, about 3 x in^2 + out x in floats (a 4096x4096
layer: about 200 MB); activations are never stored (H is accumulated by the calibration hooks).
"""

from __future__ import annotations

import torch

from .masks import block_scores, expand_block_mask, keep_top
from .methods import PruningMethod, register_method
from .patterns import Pattern
from .wanda import _need_stats


def damped_hessian(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp * I with dead inputs fixed, dead-input mask). damp = percdamp * mean(diag H)."""
    H = H.float().clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0  # inputs that were always zero: any value works, their weights are dropped
    mean = diag.mean()
    diag.add_(percdamp * mean)
    return H, dead


def hessian_inverse(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H^-1 of the damped Hessian via Cholesky, dead-input mask); more damping if needed."""
    last = None
    for extra in (1.0, 10.0, 100.0, 1000.0):
        Hd, dead = damped_hessian(H, percdamp * extra)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info.item()) == 0:
            return torch.cholesky_inverse(L), dead
        last = info
    raise RuntimeError(f"SparseGPT: the calibration Hessian is not positive definite even with "
                       f"{100 * percdamp * 1000:.0f}% damping (cholesky info={int(last.item())})")


def obs_prune(W: torch.Tensor, H: torch.Tensor, *, nm: tuple[int, int] | None = None, sparsity: float | None = None,
              forced_prune: torch.Tensor | None = None, blocksize: int = 128, percdamp: float = 0.01):
    """SparseGPT's sweep. Returns (keep mask, new W) in fp32.

    ``nm=(n, m)`` keeps n of every m inputs (chosen adaptively); ``sparsity`` prunes that fraction
    of each block of ``blocksize`` columns (unstructured); ``forced_prune`` [out, in] marks weights
    that must go (pruned blocks), on top of the adaptive choice (if any).
    """
    W = W.detach().float().clone()
    rows, cols = W.shape
    Hinv_full, dead = hessian_inverse(H.to(W.device), percdamp)
    W[:, dead] = 0
    # Upper Cholesky factor of H^-1: row j holds the OBS update for column j given columns < j are done.
    U = torch.linalg.cholesky(Hinv_full, upper=True)
    del Hinv_full
    if nm is not None:
        n_keep, m = nm
        n_prune = m - n_keep
        blocksize = max(m, blocksize - blocksize % m)  # groups never straddle two blocks
    prune = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool) if forced_prune is None else forced_prune[:, i1:i2].clone()
        if nm is None and sparsity is not None and sparsity > 0:
            sal = W1.pow(2) / d1.pow(2)[None, :]
            if forced_prune is not None:
                sal = sal.masked_fill(mask1, float("-inf"))
            k = int(sal.numel() * sparsity)
            if k > 0:
                idx = sal.reshape(-1).topk(k, largest=False).indices
                mask1.view(-1)[idx] = True
        for i in range(count):
            w = W1[:, i]
            d = U1[i, i]
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i:i + nm[1]].pow(2) / d1[i:i + nm[1]].pow(2)[None, :]
                if n_prune > 0:
                    idx = sal.topk(n_prune, dim=1, largest=False).indices
                    mask1.scatter_(1, i + idx, True)
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        prune[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    keep = ~prune
    W[:, dead] = 0
    return keep, W


class SparseGPT(PruningMethod):
    name = "sparsegpt"
    needs_calibration = True
    needs_hessian = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def scores(self, weight: torch.Tensor, stats=None) -> torch.Tensor:
        """OBS saliency w^2 / [H^-1]_jj (the loss increase of removing one weight alone).

        With only input norms available (the global-budget pre-pass), the Wanda score squared,
        which is the same saliency under a diagonal Hessian.
        """
        _need_stats(stats, self.name)
        w = weight.detach().float()
        if getattr(stats, "H", None) is None:
            return w.pow(2) * stats.col_norm().to(w.device).pow(2)[None, :]
        Hinv, dead = hessian_inverse(stats.H.to(w.device), self.percdamp)
        sal = w.pow(2) / torch.diagonal(Hinv)[None, :]
        return sal.masked_fill(dead[None, :], 0.0)

    def prune_layer(self, weight: torch.Tensor, pattern: Pattern, sparsity: float | None, *,
                    stats=None, block_keep: torch.Tensor | None = None):
        _need_stats(stats, self.name)
        if getattr(stats, "H", None) is None:
            raise ValueError("sparsegpt needs the Hessian of the layer inputs (stats.H); calibrate with "
                             "sparseprune.prune.calibrate")
        s = pattern.sparsity if sparsity is None else sparsity
        kw = dict(blocksize=self.blocksize, percdamp=self.percdamp)
        if pattern.kind == "nm":
            keep, w = obs_prune(weight, stats.H, nm=(pattern.n, pattern.m), **kw)
        elif pattern.kind == "unstructured":
            if block_keep is not None:
                keep, w = obs_prune(weight, stats.H, forced_prune=~block_keep.to(weight.device), **kw)
            else:
                if s is None:
                    raise ValueError("unstructured pruning needs a sparsity")
                keep, w = obs_prune(weight, stats.H, sparsity=s, **kw)
        else:
            if block_keep is None:
                if s is None:
                    raise ValueError(f"{pattern.kind} pruning needs a sparsity (fraction of blocks to prune)")
                # block_scores is an L2 norm, so sqrt(saliency) ranks blocks by their summed saliency
                block_keep = keep_top(block_scores(self.scores(weight, stats).sqrt(), pattern.block_size), s)
            forced = ~expand_block_mask(block_keep.to(weight.device), pattern.block_size)
            keep, w = obs_prune(weight, stats.H, nm=(2, 4) if pattern.kind == "hybrid" else None,
                                forced_prune=forced, **kw)
        return keep, w.to(weight.dtype)


register_method(SparseGPT())
