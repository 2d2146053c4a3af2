"""CPU emulation of the ``mma.sp.m16n8k32`` (fp16/bf16) operand and metadata layout.

It is what lets us check the CUDA backend's packed layout without a GPU. Per warp and per m16n8k32 step
(lane = 4 * groupID + threadID_in_group, written g and t):

* A is the 16x32 sparse tile stored compressed as 16x16 (two kept of every 4 along K). Each lane holds
  8 halves a0..a7: a_s sits at row ``g + 8 * ((s >> 1) & 1)`` and compressed column
  ``2t + (s & 1) + 8 * (s >> 2)`` (the same ownership as dense m16n8k16's A). Compressed columns 2j, 2j+1
  are the two kept values of group j (original columns 4j..4j+3).
* Metadata: one 32-bit register per lane. Sparsity selector 0: lanes with t in {0, 1} supply it
  (selector 1: t in {2, 3}; CUTLASS and Sparse-Marlin use selector 1 for a second m16 tile that shares
  the register, we always use 0). Lane (g, t) with h = t & 1 covers original columns 16h .. 16h + 15:
  bits [4j, 4j+4) hold group 4h + j of row g, bits [16 + 4j, 16 + 4j + 4) the same group of row g + 8.
  A nibble is ``p0 | p1 << 2`` (lower index in the low 2 bits), p0 < p1, i.e. exactly the canonical
  Semi24 nibble.
* B (32x8, "col", i.e. x rows as stored) holds b0..b7 per lane: k = ``2t + (s & 1) + 8 * (s >> 1)``, n = g.
* C/D (16x8 fp32): c_s at row ``g + 8 * (s >> 1)``, column ``2t + (s & 1)``.

Where each fact comes from (checked November 2026; no GPU was available to run the instruction):

* PTX ISA 9.7.14.6.1 "Sparse matrix storage" (mirror ptx.poole.ai): 2:4 granularity for .f16/.bf16
  m16n8k16/m16n8k32; "Values 0b0000, 0b0101, 0b1010, 0b1111 are invalid values for metadata"; in a group
  of four consecutive threads, the threads named by the sparsity selector store the metadata. LLVM's
  NVVM intrinsic table (llvm-project PR 154984) gives m16n8k32 f16/bf16 a selector range of [0, 2).
* NVIDIA forum ("Fragment layout of multiplicand A ... m16n8k32 fp16") and the PTX text: the A fragment
  of sparse m16n8k32 has the dense m16n8k16 A ownership (a_slot_coords below).
* MLIR integration test ``sparse-mma-2-4-f16.mlir`` (llvm-project, run on sm_80 hardware, links the PTX
  figure "sparse-mma-metadata-16832-f16bf16"): with selector 0, lane (g, t) takes its low 16 bits from
  meta[g][t % 2] and its high 16 bits from meta[g + 8][t % 2], where meta[row][h] is the int16 of the 16
  columns 16h..16h+15 of that row, nibbles little-endian (group j at bits 4j).
* CUTLASS ``tools/util/include/cutlass/util/host_reorder.h`` ``reorder_meta`` + ``ColumnMajorInterleaved<2>``
  (re-implemented in PyTorch's ``torch/sparse/_semi_structured_conversions.py``, the layout PyTorch's
  CUTLASS semi-structured kernels run on GPUs): per 32 rows and 32 columns, 32-bit word L = 4g + t holds
  (rows g, g + 8; columns 0-15) for t = 0, (rows g, g + 8; columns 16-31) for t = 1 and the same for rows
  g + 16, g + 24 for t = 2, 3; the words are ldmatrix-loaded so lane L receives word L, and
  Sparse-Marlin (``marlin/common/mma.h``, ``mma_sp(..., frag_m[j / 2], j % 2)``) issues selector 0 for the
  first m16 tile and 1 for the second. tests/test_cuda_layout.py::test_metadata_matches_cutlass_reorder
  compares our words with torch's implementation bit for bit on random 2:4 weights.
* PyTorch ``_sparse_semi_structured_from_dense`` nibble table: [1,1,0,0] -> 0b0100, [1,0,1,0] -> 0b1000,
  ... "lower two bits in the encoding are index of the True value at the lowest index"; groups with
  fewer than two nonzeros still name two distinct positions.
* ``mma.sp::ordered_metadata`` (PTX ISA 8.5+): same operands; as we read the PTX text, the two indices of a
  group must be in increasing order (our p0 < p1 always holds, which suits both forms). The PTX text says plain ``mma.sp`` "may have substantially
  reduced performance on some target architectures" and ptxas 13 advises the ordered form.

Conclusion: the mapping the kernel was written with is the one above; confidence high for the bit layout
(two independent implementations agree bit for bit), unverified by running the instruction here.

Packed layout produced by ``pack_semi24_sm80`` (and :func:`pack_reference` here), for W [N, K]:

* ``Np = ceil(N / 16) * 16``, ``Kp = ceil(K / 32) * 32``, padding is zero values with nibble 0x4
  (positions 0, 1: a legal ordered code).
* values ``[Np/16, Kp/32, 32, 8]``: tile (m, ks) = rows 16m.., columns 32ks..; lane-major, so lane l
  reads its whole A fragment with one 16-byte load at ``l * 16`` bytes (conflict-free in shared memory).
* meta ``[Np/16, Kp/32, 16]`` int32: entry ``2g + t`` is lane (g, t)'s metadata register (t in {0, 1}).

Hybrid blocks (bh % 16 == 0, bw % 32 == 0) are packed by stacking the stored dense blocks into one
``[nnzb * bh, bw]`` matrix and packing that (:func:`pack_hybrid_reference`): block b, row tile r, k-step s
is tile ``(b * bh/16 + r, s)``, so the result reshapes to values ``[nnzb, bh/16, bw/32, 32, 8]`` and meta
``[nnzb, bh/16, bw/32, 16]`` without any padding.
"""

from __future__ import annotations

import torch

TILE_M, TILE_K = 16, 32
PAD_NIBBLE = 0x4  # positions (0, 1)


def packed_shapes(n: int, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    mt, ks = (n + TILE_M - 1) // TILE_M, (k + TILE_K - 1) // TILE_K
    return (mt, ks, 32, 8), (mt, ks, 16)


def a_slot_coords(lane: int, s: int) -> tuple[int, int]:
    """(row, compressed column) of A slot ``s`` (0..7) held by ``lane``."""
    g, t = lane >> 2, lane & 3
    return g + 8 * ((s >> 1) & 1), 2 * t + (s & 1) + 8 * (s >> 2)


def b_slot_coords(lane: int, s: int) -> tuple[int, int]:
    """(k, n) of B slot ``s`` (0..7) held by ``lane``."""
    g, t = lane >> 2, lane & 3
    return 2 * t + (s & 1) + 8 * (s >> 1), g


def c_slot_coords(lane: int, s: int) -> tuple[int, int]:
    """(row, column) of accumulator slot ``s`` (0..3) held by ``lane``."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (s >> 1), 2 * t + (s & 1)


def meta_lane_fields(lane: int, selector: int = 0) -> list[tuple[int, int, int]] | None:
    """[(bit offset, row, group within the 16x32 tile)] of the metadata register of ``lane``, or None
    when that lane does not supply metadata for ``selector``."""
    g, t = lane >> 2, lane & 3
    if t // 2 != selector:
        return None
    half = t & 1
    return [(16 * h + 4 * j, g + 8 * h, 4 * half + j) for h in range(2) for j in range(4)]


def _choose_positions(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """wg [..., 4] -> (kept values [..., 2], nibbles [...]): nonzeros first, then the lowest free slots."""
    keep = wg != 0
    if (keep.sum(-1) > 2).any():
        raise ValueError("weight is not 2:4: a group of 4 keeps more than 2 values")
    key = keep.to(torch.int16) * 8 + (3 - torch.arange(4, dtype=torch.int16))
    pos = key.topk(2, dim=-1).indices.sort(dim=-1).values
    vals = torch.gather(wg, -1, pos)
    return vals, (pos[..., 0] | (pos[..., 1] << 2)).to(torch.int64)


def pack_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-python packer: masked dense W [N, K] (K % 4 == 0) -> (values, meta) in the sm80 layout."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"K={k} must be a multiple of 4")
    vshape, mshape = packed_shapes(n, k)
    mt, ks = vshape[0], vshape[1]
    np_, kp = mt * TILE_M, ks * TILE_K
    wp = torch.zeros(np_, kp, dtype=w.dtype)
    wp[:n, :k] = w
    vals, nib = _choose_positions(wp.reshape(np_, kp // 4, 4))  # [Np, Kp/4, 2], [Np, Kp/4]
    # pad rows and pad groups get the legal code (0, 1) with zero values
    pad = torch.zeros(np_, kp // 4, dtype=torch.bool)
    pad[n:, :] = True
    pad[:, k // 4:] = True
    nib = torch.where(pad, torch.full_like(nib, PAD_NIBBLE), nib)
    comp = vals.reshape(np_, kp // 2)  # compressed columns
    values = torch.empty(vshape, dtype=w.dtype)
    meta = torch.zeros(mshape, dtype=torch.int64)
    for lane in range(32):
        for s in range(8):
            r, c = a_slot_coords(lane, s)
            # rows r of every m-tile, compressed column c of every k-step
            values[:, :, lane, s] = comp.reshape(mt, TILE_M, ks, 16)[:, r, :, c]
        fields = meta_lane_fields(lane)
        if fields is None:
            continue
        g, t = lane >> 2, lane & 3
        nb = nib.reshape(mt, TILE_M, ks, 8)
        word = torch.zeros(mt, ks, dtype=torch.int64)
        for bit, r, grp in fields:
            word |= nb[:, r, :, grp] << bit
        meta[:, :, 2 * g + t] = word
    meta = torch.where(meta >= 2**31, meta - 2**32, meta).to(torch.int32)
    return values.contiguous(), meta.contiguous()


def lane_registers(values: torch.Tensor, meta: torch.Tensor, m: int, ks: int) -> tuple[list, list]:
    """What each lane loads for tile (m, ks): (A slots [32][8] tensors, metadata words [32] ints)."""
    a = [values[m, ks, lane] for lane in range(32)]
    e = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        e.append(int(meta[m, ks, 2 * g + (t & 1)].item()) & 0xFFFFFFFF)  # t = 2, 3 read a copy; ignored
    return a, e


def decompress_tile(a_regs, e_regs, selector: int = 0) -> torch.Tensor:
    """The 16x32 dense A the instruction sees, from per-lane A slots and metadata registers."""
    comp = torch.empty(TILE_M, 16, dtype=torch.float64)
    for lane in range(32):
        for s in range(8):
            r, c = a_slot_coords(lane, s)
            comp[r, c] = float(a_regs[lane][s])
    dense = torch.zeros(TILE_M, TILE_K, dtype=torch.float64)
    seen = torch.zeros(TILE_M, 8, dtype=torch.bool)
    for lane in range(32):
        fields = meta_lane_fields(lane, selector)
        if fields is None:
            continue
        for bit, r, grp in fields:
            nib = (e_regs[lane] >> bit) & 0xF
            p0, p1 = nib & 3, nib >> 2
            if not p0 < p1:
                raise ValueError(f"metadata nibble {nib:#x} (row {r}, group {grp}) is not ordered p0 < p1")
            dense[r, 4 * grp + p0] = comp[r, 2 * grp]
            dense[r, 4 * grp + p1] = comp[r, 2 * grp + 1]
            seen[r, grp] = True
    if not seen.all():
        raise ValueError("metadata does not cover every (row, group) of the tile")
    return dense


def emulate_mma_sp(a_regs, e_regs, b: torch.Tensor, c: torch.Tensor, selector: int = 0) -> torch.Tensor:
    """Emulates one mma.sp m16n8k32: B [32, 8] and C [16, 8] are distributed into lane fragments and
    D is gathered back from the lanes' accumulator slots, the way the warp holds them."""
    b_regs = [[b[b_slot_coords(lane, s)] for s in range(8)] for lane in range(32)]
    b_dense = torch.empty(TILE_K, 8, dtype=torch.float64)
    for lane in range(32):
        for s in range(8):
            b_dense[b_slot_coords(lane, s)] = float(b_regs[lane][s])
    a_dense = decompress_tile(a_regs, e_regs, selector)
    d_full = a_dense @ b_dense + c.double()
    d = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(32):
        for s in range(4):
            rc = c_slot_coords(lane, s)
            d[rc] = d_full[rc]
    return d


def unpack(values: torch.Tensor, meta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Dense [N, K] read back through the instruction's view of every tile."""
    mt, ks = values.shape[0], values.shape[1]
    out = torch.zeros(mt * TILE_M, ks * TILE_K, dtype=torch.float64)
    for m in range(mt):
        for s in range(ks):
            a, e = lane_registers(values, meta, m, s)
            out[m * 16:(m + 1) * 16, s * 32:(s + 1) * 32] = decompress_tile(a, e)
    return out[:n, :k]


def emulate_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int) -> torch.Tensor:
    """Y = X W^T computed as Y^T = W X^T, one emulated mma.sp per (m-tile, 8-token tile, k-step)."""
    b_, k = x.shape
    mt, ks = values.shape[0], values.shape[1]
    xp = torch.zeros(((b_ + 7) // 8) * 8, ks * TILE_K, dtype=torch.float64)
    xp[:b_, :k] = x.double()
    yt = torch.zeros(mt * TILE_M, xp.shape[0], dtype=torch.float64)
    for m in range(mt):
        for s in range(ks):
            a, e = lane_registers(values, meta, m, s)
            for nt in range(xp.shape[0] // 8):
                bt = xp[nt * 8:(nt + 1) * 8, s * 32:(s + 1) * 32].t()  # [32, 8]: k x tokens
                acc = yt[m * 16:(m + 1) * 16, nt * 8:(nt + 1) * 8]
                yt[m * 16:(m + 1) * 16, nt * 8:(nt + 1) * 8] = emulate_mma_sp(a, e, bt, acc)
    return yt[:n, :b_].t()


def pack_hybrid_reference(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 blocks [nnzb, bh, bw] (bh % 16 == 0, bw % 32 == 0) -> (values [nnzb, bh/16, bw/32, 32, 8],
    meta [nnzb, bh/16, bw/32, 16]) in the sm80 layout."""
    nnzb, bh, bw = blocks.shape
    if bh % TILE_M or bw % TILE_K:
        raise ValueError(f"hybrid sm80 packing needs bh % 16 == 0 and bw % 32 == 0, got {bh}x{bw}")
    v, m = pack_reference(blocks.reshape(nnzb * bh, bw))
    return v.reshape(nnzb, bh // TILE_M, bw // TILE_K, 32, 8), m.reshape(nnzb, bh // TILE_M, bw // TILE_K, 16)


def emulate_hybrid_linear(x, values, meta, crow, col, bh: int, bw: int, n: int) -> torch.Tensor:
    """Y = X W^T over the stored hybrid blocks, one emulated mma.sp per (row tile, token tile, k-step)."""
    out = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for br in range(len(crow) - 1):
        for blk in range(int(crow[br]), int(crow[br + 1])):
            xs = x[:, int(col[blk]) * bw:(int(col[blk]) + 1) * bw]
            v = values[blk].reshape(-1, bw // TILE_K, 32, 8)
            m = meta[blk].reshape(-1, bw // TILE_K, 16)
            out[:, br * bh:(br + 1) * bh] += emulate_linear(xs, v, m, bh)
    return out
