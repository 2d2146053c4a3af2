// Inner loops of the sparse kernels (included only from kernels_isa.cpp after kern_simd.h).
//
// Two families:
//  * GEMV loops (small batch): stream the weights once and dot them with NB <= 4 rows of x (fp32).
//    Memory-bound, so the aim is to touch each weight byte once and keep the x rows in L1.
//  * Tile loops (large batch): x is transposed to xT[k][BT] (fp32), and each kept weight is
//    broadcast and FMA'd into NV vectors of BT batch columns. Compute-bound; R rows are register
//    blocked so there are >= 8 independent FMA chains (FMA latency 4 x 2 pipes).
#pragma once
#include "cpu/kern_simd.h"

namespace sparseprune::cpu::SP_ISA {

// ---------------------------------------------------------------- GEMV: 2:4 segments
// One SIMD chunk of 2:4 groups from group g: a[b] += kept weights (values w, 4-bit codes m) times the
// selected x values of batch row b (x + b * xs).
#if defined(__AVX512F__)
// 8 groups = 32 x values = 16 kept weights = one 32-bit meta word. The kept x values are picked
// by a two-register permute (a gather would be the bottleneck): idx[j] = (j/2)*4 + code_j.
constexpr int64_t kSemiChunk = 8;
template <int NB, DType DT>
SP_INLINE void semi_chunk(const typename St<DT>::T* w, const uint8_t* m, int64_t g, const float* x, int64_t xs, vf* a) {
  const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  uint32_t word;
  std::memcpy(&word, m + g / 2, 4);
  const __m512i idx = _mm512_add_epi32(
      _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), sh), _mm512_set1_epi32(3)), base);
  const vf wv = ldv<DT>(w + 2 * g);
  _Pragma("GCC unroll 4") for (int b = 0; b < NB; ++b) {
    const float* xb = x + b * xs + 4 * g;
    a[b] += wv * (vf)_mm512_permutex2var_ps(_mm512_loadu_ps(xb), idx, _mm512_loadu_ps(xb + 16));
  }
}
#elif defined(__AVX2__)
// 4 groups = 16 x values = 8 kept weights = 16 meta bits. AVX2 has no two-register permute and
// vpermps (8 lanes, cross-lane) would be needed twice per chunk; it was the bottleneck on Zen 3. A
// group's 4 x values are one 128-bit lane, so the in-lane vpermilps selects within each group: from
// x[4g..4g+7] it picks groups g and g+1 into lanes 0-1 and 4-5, from x[4g+8..4g+15] groups g+2 and
// g+3 into lanes 2-3 and 6-7, and one blend joins them. vpermilps reads the low 2 bits of each index
// lane, so the index is just the meta bits shifted into place. The weights are reordered to match
// (64-bit pairs g, g+2, g+1, g+3: one vpermpd per chunk, shared by the NB rows). 1.55x the old loop.
constexpr int64_t kSemiChunk = 4;
constexpr int64_t kSemiPrefetch = 1024;
template <int NB, DType DT, bool HI>
SP_INLINE void semi_chunk(const typename St<DT>::T* w, __m256i meta_bc, int64_t g, const float* x, int64_t xs,
                          vf* a) {
  // HI: this chunk's codes are the high 16 bits of the broadcast 32-bit meta word.
  const __m256i sh = HI ? _mm256_setr_epi32(16, 18, 24, 26, 20, 22, 28, 30) : _mm256_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14);
  const __m256i idx = _mm256_srlv_epi32(meta_bc, sh);
  const vf wv = (vf)_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd((__m256)ldv<DT>(w + 2 * g)), 0xD8));
  _Pragma("GCC unroll 4") for (int b = 0; b < NB; ++b) {
    const float* xb = x + b * xs + 4 * g;
    const __m256 lo = _mm256_permutevar_ps(_mm256_loadu_ps(xb), idx);
    const __m256 hi = _mm256_permutevar_ps(_mm256_loadu_ps(xb + 8), idx);
    a[b] += wv * (vf)_mm256_blend_ps(lo, hi, 0xCC);
  }
}
#endif

// acc[0..2NB) += kept weights of ng groups (values w, 4-bit codes m) times the selected x values;
// x for batch row b starts at x + b * xs. Groups not covered by the SIMD chunks go to the scalar sums
// sacc[b]. The sums live in registers for the whole segment, in sets that take alternate chunks (FMA
// latency), with the set picked at compile time: a run-time set index kept them in memory, and the
// store-to-load round trip per chunk made the loop compute-bound (AVX2, Zen 3: 1.2x from that alone).
template <int NB, DType DT>
SP_INLINE void semi_seg(const typename St<DT>::T* w, const uint8_t* m, int64_t ng, const float* x, int64_t xs,
                        vf* acc, float* sacc) {
  int64_t g = 0;
#if defined(__AVX512F__)
  vf a[2 * NB];
  _Pragma("GCC unroll 8") for (int i = 0; i < 2 * NB; ++i) a[i] = acc[i];
  for (; g + 2 * kSemiChunk <= ng; g += 2 * kSemiChunk) {
    semi_chunk<NB, DT>(w, m, g, x, xs, a);
    semi_chunk<NB, DT>(w, m, g + kSemiChunk, x, xs, a + NB);
  }
  if (g + kSemiChunk <= ng) {
    semi_chunk<NB, DT>(w, m, g, x, xs, a);
    g += kSemiChunk;
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < 2 * NB; ++i) acc[i] = a[i];
#elif defined(__AVX2__)
  // 2 chunks per 32-bit meta word; 4 sets for a single row (else the FMA chains are the limit), 2 for more.
  constexpr int NS = NB == 1 ? 4 : 2;
  vf a[NS * NB];
  _Pragma("GCC unroll 8") for (int i = 0; i < 2 * NB; ++i) a[i] = acc[i];
  _Pragma("GCC unroll 8") for (int i = 2 * NB; i < NS * NB; ++i) a[i] = vf{};
  for (; g + NS * kSemiChunk <= ng; g += NS * kSemiChunk) {
    // The loop is too busy for the hardware prefetcher to keep enough misses in flight on its own:
    // fetching the weights 1 KB ahead made it 1.2x faster at B = 1 (Zen 3; 512 B: slower, 2 KB: same).
    __builtin_prefetch(reinterpret_cast<const char*>(w + 2 * g) + kSemiPrefetch, 0, 0);
    if (NS == 4) __builtin_prefetch(reinterpret_cast<const char*>(w + 2 * g) + kSemiPrefetch + 64, 0, 0);
    _Pragma("GCC unroll 4") for (int s = 0; s < NS; s += 2) {
      uint32_t word;
      std::memcpy(&word, m + (g + s * kSemiChunk) / 2, 4);
      const __m256i bc = _mm256_set1_epi32(int(word));
      semi_chunk<NB, DT, false>(w, bc, g + s * kSemiChunk, x, xs, a + s * NB);
      semi_chunk<NB, DT, true>(w, bc, g + (s + 1) * kSemiChunk, x, xs, a + (s + 1) * NB);
    }
  }
  for (; g + 2 * kSemiChunk <= ng; g += 2 * kSemiChunk) {  // short segments (hybrid blocks): one meta word
    uint32_t word;
    std::memcpy(&word, m + g / 2, 4);
    const __m256i bc = _mm256_set1_epi32(int(word));
    semi_chunk<NB, DT, false>(w, bc, g, x, xs, a);
    semi_chunk<NB, DT, true>(w, bc, g + kSemiChunk, x, xs, a + NB);
  }
  if (g + kSemiChunk <= ng) {
    uint16_t hw;
    std::memcpy(&hw, m + g / 2, 2);
    semi_chunk<NB, DT, false>(w, _mm256_set1_epi32(int(hw)), g, x, xs, a);
    g += kSemiChunk;
  }
  _Pragma("GCC unroll 8") for (int i = 2 * NB; i < NS * NB; ++i) a[i % (2 * NB)] += a[i];
  _Pragma("GCC unroll 8") for (int i = 0; i < 2 * NB; ++i) acc[i] = a[i];
#else
  (void)acc;
#endif
  for (; g < ng; ++g) {
    const unsigned nib = (m[g >> 1] >> ((g & 1) * 4)) & 0xFu;
    const float w0 = lds<DT>(w + 2 * g), w1 = lds<DT>(w + 2 * g + 1);
    for (int b = 0; b < NB; ++b) {
      const float* xb = x + b * xs + 4 * g;
      sacc[b] += w0 * xb[nib & 3u] + w1 * xb[nib >> 2];
    }
  }
}

// ---------------------------------------------------------------- GEMV: dense segments (BSR)
// Sums in registers for the segment, as in semi_seg.
template <int NB, DType DT>
SP_INLINE void dense_seg(const typename St<DT>::T* w, int64_t len, const float* x, int64_t xs, vf* acc,
                         float* sacc) {
  vf a[2 * NB];
  _Pragma("GCC unroll 8") for (int i = 0; i < 2 * NB; ++i) a[i] = acc[i];
  int64_t c = 0;
  for (; c + 2 * VW <= len; c += 2 * VW) {
    const vf w0 = ldv<DT>(w + c), w1 = ldv<DT>(w + c + VW);
    _Pragma("GCC unroll 4") for (int b = 0; b < NB; ++b) {
      a[b] += w0 * vld(x + b * xs + c);
      a[NB + b] += w1 * vld(x + b * xs + c + VW);
    }
  }
  for (; c + VW <= len; c += VW) {
    const vf w0 = ldv<DT>(w + c);
    _Pragma("GCC unroll 4") for (int b = 0; b < NB; ++b) a[b] += w0 * vld(x + b * xs + c);
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < 2 * NB; ++i) acc[i] = a[i];
  for (; c < len; ++c) {
    const float w0 = lds<DT>(w + c);
    for (int b = 0; b < NB; ++b) sacc[b] += w0 * x[b * xs + c];
  }
}

// ---------------------------------------------------------------- tiles (xT row stride BT)
// part[r][0..NV*VW) += W[r][0..bw) . xT[c][...] for R rows of a dense block (row stride ldw).
// Each xT row load feeds R*NV FMAs.
template <int R, int NV>
SP_INLINE void bsr_tile(const float* w, int64_t ldw, int64_t bw, const float* xs, float* part) {
  vf acc[R][NV];
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) acc[r][v] = vld(part + r * BT + v * VW);
  for (int64_t c = 0; c < bw; ++c) {
    vf xv[NV];
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) xv[v] = vld(xs + c * BT + v * VW);
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const vf wb = vset1(w[r * ldw + c]);
      _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) acc[r][v] += wb * xv[v];
    }
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) vst(part + r * BT + v * VW, acc[r][v]);
}

// part[r] += 2:4 row r (kept values w[r], codes m[r], ng groups from the segment start) times xT.
// Rows do not share x rows (different codes), so R rows only add independent FMA chains.
// The row and vector loops must be fully unrolled, or GCC keeps acc[][] on the stack.
template <int R, int NV>
SP_INLINE void semi_tile(const float* const* w, const uint8_t* const* m, int64_t ng, const float* xs, float* part) {
  vf acc[R][NV];
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) acc[r][v] = vld(part + r * BT + v * VW);
#define SP_SEMI_STEP(r, wval, k)                                              \
  do {                                                                        \
    const vf wb_ = vset1(wval);                                               \
    const float* xr_ = xs + (k) * BT;                                         \
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) acc[r][v] += wb_ * vld(xr_ + v * VW);        \
  } while (0)
  int64_t g = 0;
  for (; g + 2 <= ng; g += 2) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const unsigned byte = m[r][g >> 1];
      const float* wr = w[r] + 2 * g;
      const int64_t k0 = 4 * g;
      SP_SEMI_STEP(r, wr[0], k0 + (byte & 3u));
      SP_SEMI_STEP(r, wr[1], k0 + ((byte >> 2) & 3u));
      SP_SEMI_STEP(r, wr[2], k0 + 4 + ((byte >> 4) & 3u));
      SP_SEMI_STEP(r, wr[3], k0 + 4 + (byte >> 6));
    }
  }
  if (g < ng) {  // odd group count: the last group is the low nibble
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const unsigned byte = m[r][g >> 1];
      const float* wr = w[r] + 2 * g;
      SP_SEMI_STEP(r, wr[0], 4 * g + (byte & 3u));
      SP_SEMI_STEP(r, wr[1], 4 * g + ((byte >> 2) & 3u));
    }
  }
#undef SP_SEMI_STEP
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) vst(part + r * BT + v * VW, acc[r][v]);
}

#if defined(__AVX512BF16__)
// ---------------------------------------------------------------- bf16 tiles (AVX512-BF16)
// vdpbf16ps adds a.bf16[2i] * b.bf16[2i] + a.bf16[2i+1] * b.bf16[2i+1] into fp32 lane i, so x is
// stored as bf16 PAIRS per batch column: one 32-bit word (low half = first input) per column, BT
// columns per pair row (4 zmm). A weight pair is broadcast as one 32-bit word. bf16 x bf16 products
// are exact in fp32; like the fp32 path, sums are fp32 and the output is rounded once.
// (vdpbf16ps flushes bf16 denormals, ~1e-38, to zero: far below the bf16 output precision.)
typedef uint32_t u32a __attribute__((aligned(64)));

SP_INLINE __m512 dpbf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// BSR: xs = pair rows xP[kp][BT] (word = x[2kp] | x[2kp+1] << 16), w = bf16 block rows (stride ldw);
// nkp = bw / 2 pairs. Each xP row load feeds R*NV dot products (2 MACs per lane each).
template <int R, int NV>
SP_INLINE void bsr_tile_bf16(const uint16_t* w, int64_t ldw, int64_t nkp, const uint32_t* xs, float* part) {
  __m512 acc[R][NV];
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_load_ps(part + r * BT + v * VW);
  for (int64_t c = 0; c < nkp; ++c) {
    __m512i xv[NV];
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) xv[v] = _mm512_load_si512(xs + c * BT + v * VW);
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const __m512i wb = _mm512_set1_epi32(int(ld32(w + r * ldw + 2 * c)));
      _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) acc[r][v] = dpbf16(acc[r][v], wb, xv[v]);
    }
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) _mm512_store_ps(part + r * BT + v * VW, acc[r][v]);
}

// 2:4 in bf16: per batch tile, a pair table holds for every group g the 6 ordered position pairs
// (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) as pair rows xC[g][6][BT], followed (after all G groups) by the 4
// diagonal pairs (p,p) of every group, xD[g][4][BT], which only malformed codes use (kept apart so the
// rows valid codes read are contiguous). A group's two kept weights form one pair word, so one
// vdpbf16ps does both against the two selected inputs: half the loads and FMAs of the fp32 tile.
constexpr int kSlots = 6, kDiag = 4, kCombos = kSlots + kDiag;
constexpr int kPrepG = 16;  // groups per prepared entry row (one zmm of pair words / offsets)

// Prepares ng <= 16 groups of one row: wp[g] = weight pair word (halves swapped when the code has
// p0 > p1, which then reads the (p1, p0) row), op[g] = offset (uint32 units) of the group's pair row
// from xs = xC + g_first * 6 * BT; dbase = offset of group g_first's diagonal rows from xs.
// m points at the byte holding group 0 (low nibble).
SP_INLINE void semi_prep_bf16(const uint16_t* w, const uint8_t* m, int64_t ng, int32_t dbase, uint32_t* wp,
                              int32_t* op) {
  // nibble p0 | p1 << 2 -> row offset among the group's 6 (or 4 diagonal) rows, and which nibbles
  // have p0 > p1 (weights swapped) or p0 == p1 (diagonal).
  const __m512i slot = _mm512_setr_epi32(0, 0, 1 * BT, 2 * BT, 0, 1 * BT, 3 * BT, 4 * BT, 1 * BT, 3 * BT, 2 * BT,
                                         5 * BT, 2 * BT, 4 * BT, 5 * BT, 3 * BT);
  constexpr int kSwap = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 7) | (1 << 11);
  constexpr int kDiagNib = (1 << 0) | (1 << 5) | (1 << 10) | (1 << 15);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i half = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i one = _mm512_set1_epi32(1);
  uint64_t mw = 0;  // fixed-size copies: a variable-size memcpy becomes a libc call
  if (ng == kPrepG) {
    std::memcpy(&mw, m, 8);
  } else if (ng == kPrepG / 2) {
    uint32_t h;
    std::memcpy(&h, m, 4);
    mw = h;
  } else {
    for (int64_t i = 0; i < (ng + 1) / 2; ++i) mw |= uint64_t(m[i]) << (8 * i);
  }
  const __mmask16 live = ng == kPrepG ? __mmask16(0xFFFF) : __mmask16((1u << ng) - 1);
  const __m512i nib = _mm512_and_si512(
      _mm512_srlv_epi32(_mm512_permutexvar_epi32(half, _mm512_set1_epi64(int64_t(mw))), sh), _mm512_set1_epi32(15));
  const __mmask16 swap = _mm512_test_epi32_mask(_mm512_srlv_epi32(_mm512_set1_epi32(kSwap), nib), one);
  const __mmask16 diag = _mm512_test_epi32_mask(_mm512_srlv_epi32(_mm512_set1_epi32(kDiagNib), nib), one);
  // main: g * 6 * BT + slot; diagonal: dbase + g * 4 * BT + p * BT (p = nib & 3, as BT = 64 = 1 << 6)
  const __m512i g6 = _mm512_add_epi32(_mm512_slli_epi32(lane, 8), _mm512_slli_epi32(lane, 7));  // g * 384
  __m512i off = _mm512_add_epi32(g6, _mm512_permutexvar_epi32(nib, slot));
  const __m512i dg = _mm512_add_epi32(_mm512_set1_epi32(dbase),
                                      _mm512_add_epi32(_mm512_slli_epi32(lane, 8),
                                                       _mm512_slli_epi32(_mm512_and_si512(nib, _mm512_set1_epi32(3)), 6)));
  off = _mm512_mask_mov_epi32(off, diag, dg);
  __m512i wv = _mm512_maskz_loadu_epi32(live, w);
  wv = _mm512_mask_ror_epi32(wv, swap, wv, 16);
  _mm512_store_si512(wp, wv);
  _mm512_store_si512(op, off);
}
static_assert(BT == 64 && kSlots * BT == 384 && kDiag * BT == 256, "semi_prep_bf16 offsets assume BT = 64");

// Prefetches a pair table segment of ng groups (its 6 main rows per group), e.g. the next block's.
SP_INLINE void prefetch_pairs(const uint32_t* xs, int64_t ng, int nv) {
  const char* b = reinterpret_cast<const char*>(xs);
  for (int64_t g = 0; g < ng * kSlots; ++g)
    for (int v = 0; v < nv; ++v) __builtin_prefetch(b + (g * BT + v * VW) * 4, 0, 3);
}

// part[r] += prepared 2:4 row r (entries wp/op + r * kPrepG) times the pair table segment xs.
template <int R, int NV>
SP_INLINE void semi_tile_bf16(const uint32_t* wp, const int32_t* op, int64_t ng, const uint32_t* xs, float* part) {
  __m512 acc[R][NV];
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_load_ps(part + r * BT + v * VW);
  for (int64_t g = 0; g < ng; ++g) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const __m512i wb = _mm512_set1_epi32(int(wp[r * kPrepG + g]));
      const uint32_t* xr = xs + op[r * kPrepG + g];
      _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v)
        acc[r][v] = dpbf16(acc[r][v], wb, _mm512_load_si512(xr + v * VW));
    }
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) _mm512_store_ps(part + r * BT + v * VW, acc[r][v]);
}
#endif  // __AVX512BF16__

}  // namespace sparseprune::cpu::SP_ISA
