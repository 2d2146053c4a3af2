"""Shared test helpers: random packed weights and dtype-aware comparison against fp64."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseprune.formats import BlockSparseWeight, HybridWeight, Semi24Weight
from sparseprune.ops import bsr, hybrid, semi24

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Absolute floor as a fraction of the output scale, per dtype (the relative part is 2x torch's own error).
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def random_24_mask(n: int, k: int, device="cpu") -> torch.Tensor:
    """Random 2:4 mask: two random positions out of every 4 (never all zero, never a no-op)."""
    g = torch.rand(n, k // 4, 4, device=device).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(2, g, True).reshape(n, k)


def random_block_mask(n, k, block, density, device="cpu") -> torch.Tensor:
    nbr, nbc = n // block[0], k // block[1]
    m = torch.rand(nbr, nbc, device=device) < density
    if density > 0 and not m.any():
        m[0, 0] = True
    return m


def expand_blocks(block_mask: torch.Tensor, block) -> torch.Tensor:
    """[N/bh, K/bw] block mask -> [N, K] element mask (written here, not taken from the library)."""
    return block_mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def random_weight(kind: str, n: int, k: int, dtype=torch.float32, block=(32, 32), density=0.5, device="cpu"):
    """(packed weight, masked dense fp32 weight) with fresh normal values (never zeros).

    The dense weight is the random weight times the masks it was packed with, computed here and
    not decoded from the packed form, so a kernel is compared against what was meant, not against
    the library's own unpacking (which is checked separately against the same weight)."""
    w = torch.randn(n, k, device=device).to(dtype)
    if kind == "semi24":
        mask = random_24_mask(n, k, device)
        packed = Semi24Weight.from_dense(w, mask)
    elif kind == "bsr":
        bm = random_block_mask(n, k, block, density, device)
        mask = expand_blocks(bm, block)
        packed = BlockSparseWeight.from_dense(w, block, bm)
    elif kind == "hybrid":
        bm = random_block_mask(n, k, block, density, device)
        m24 = random_24_mask(n, k, device)
        mask = m24 & expand_blocks(bm, block)
        packed = HybridWeight.from_dense(w * m24, block, bm)
    else:
        raise ValueError(kind)
    packed.validate()
    want = (w * mask).float()
    assert torch.equal(packed.to_dense().float(), want), f"{kind}: packing lost or moved values"
    return packed, want


def has_pattern(w: torch.Tensor, kind: str, block=None, sparsity=None, n: int = 2, m: int = 4) -> bool:
    """Independent check (numpy, not the library's ``satisfies``) that ``w``'s zeros form the pattern.

    kind: "nm" (at most n nonzeros in every m consecutive inputs of a row), "block" (whole
    bh x bw blocks zero, ``sparsity`` of them when given, to within one block) or "hybrid" (both)."""
    a = w.detach().float().cpu().numpy() != 0
    rows, cols = a.shape
    if kind == "unstructured":
        return sparsity is not None and 1 - a.mean() >= sparsity - 1e-9
    ok = True
    if kind in ("nm", "hybrid"):
        if cols % m:
            return False
        ok = int(a.reshape(rows, cols // m, m).sum(axis=2).max(initial=0)) <= n
    if ok and kind in ("block", "hybrid"):
        bh, bw = block
        if rows % bh or cols % bw:
            return False
        nonempty = a.reshape(rows // bh, bh, cols // bw, bw).any(axis=(1, 3))
        frac_empty = 1 - nonempty.mean()
        # a layer prunes a whole number of blocks: the fraction may fall short by less than one block
        ok = frac_empty > sparsity - 1 / nonempty.size if sparsity is not None else frac_empty > 0
    return bool(ok)


def pattern_of(pat, sparsity=None) -> dict:
    """has_pattern() keywords for a library Pattern (its kind, block size and N:M only)."""
    if pat.kind == "nm":
        return dict(kind="nm", n=pat.n, m=pat.m)
    if pat.kind == "unstructured":
        return dict(kind="unstructured", sparsity=sparsity)
    return dict(kind=pat.kind, block=tuple(pat.block_size), sparsity=sparsity)


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, w_dense: torch.Tensor, bias=None):
    """Kernel error vs fp64 must be within 2x torch's own error in the same dtype plus a small floor."""
    dtype = x.dtype
    assert y.dtype == dtype, f"output dtype {y.dtype} != input dtype {dtype}"
    ref64 = F.linear(x.double(), w_dense.double(), None if bias is None else bias.double())
    assert y.shape == ref64.shape, f"shape {tuple(y.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(y).any(), "NaN in output: an element was not written (poisoned buffer) or computed wrongly"
    if ref64.numel() == 0:
        return
    torch_out = F.linear(x, w_dense.to(dtype), None if bias is None else bias.to(dtype))
    torch_err = (torch_out.double() - ref64).abs().max().item()
    err = (y.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    tol = 2 * torch_err + FLOOR[dtype] * max(scale, 1.0)
    assert err <= tol, f"max error {err:.3g} > tol {tol:.3g} (torch's own error {torch_err:.3g}, scale {scale:.3g})"


def call_op(kind: str, packed, x: torch.Tensor, bias=None) -> torch.Tensor:
    """Runs the C++ op of ``packed``'s format (the backend picked by the tensors' device)."""
    if kind == "semi24":
        return semi24.semi24_linear(x, packed.values, packed.meta, bias)
    if kind == "bsr":
        return bsr.bsr_linear(x, packed.values, packed.crow, packed.col, packed.shape[1], bias)
    return hybrid.hybrid_linear(x, packed.values, packed.meta, packed.crow, packed.col, packed.shape[1], bias)
