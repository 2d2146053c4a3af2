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
// acc[0..2NB) += kept weights of ng groups (values w, 4-bit codes m) times the selected x values;
// x for batch row b starts at x + b * xs. Two accumulator sets alternate to hide FMA latency.
// Groups not covered by the SIMD chunk go to the scalar sums sacc[b].
template <int NB, DType DT>
SP_INLINE void semi_seg(const typename St<DT>::T* w, const uint8_t* m, int64_t ng, const float* x, int64_t xs,
                        vf* acc, float* sacc) {
  int64_t g = 0;
#if defined(__AVX512F__)
  // 8 groups = 32 x values = 16 kept weights = one 32-bit meta word. The kept x values are picked
  // by a two-register permute (a gather would be the bottleneck): idx[j] = (j/2)*4 + code_j.
  const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  int par = 0;
  for (; g + 8 <= ng; g += 8, par ^= NB) {
    uint32_t word;
    std::memcpy(&word, m + g / 2, 4);
    const __m512i idx =
        _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), sh), three), base);
    const vf wv = ldv<DT>(w + 2 * g);
    for (int b = 0; b < NB; ++b) {
      const float* xb = x + b * xs + 4 * g;
      const __m512 xsel = _mm512_permutex2var_ps(_mm512_loadu_ps(xb), idx, _mm512_loadu_ps(xb + 16));
      acc[par + b] += wv * (vf)xsel;
    }
  }
#elif defined(__AVX2__)
  // 4 groups = 16 x values = 8 kept weights = 16 meta bits. vpermps only sees 8 lanes: permute both
  // halves with the same index (low 3 bits) and take lanes 0-3 from the low half, 4-7 from the high.
  const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  int par = 0;
  for (; g + 4 <= ng; g += 4, par ^= NB) {
    uint16_t hw;
    std::memcpy(&hw, m + g / 2, 2);
    const __m256i idx =
        _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(hw)), sh), three), base);
    const vf wv = ldv<DT>(w + 2 * g);
    for (int b = 0; b < NB; ++b) {
      const float* xb = x + b * xs + 4 * g;
      const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb), idx);
      const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + 8), idx);
      acc[par + b] += wv * (vf)_mm256_blend_ps(lo, hi, 0xF0);
    }
  }
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
template <int NB, DType DT>
SP_INLINE void dense_seg(const typename St<DT>::T* w, int64_t len, const float* x, int64_t xs, vf* acc,
                         float* sacc) {
  int64_t c = 0;
  for (; c + 2 * VW <= len; c += 2 * VW) {
    const vf w0 = ldv<DT>(w + c), w1 = ldv<DT>(w + c + VW);
    for (int b = 0; b < NB; ++b) {
      acc[b] += w0 * vld(x + b * xs + c);
      acc[NB + b] += w1 * vld(x + b * xs + c + VW);
    }
  }
  for (; c + VW <= len; c += VW) {
    const vf w0 = ldv<DT>(w + c);
    for (int b = 0; b < NB; ++b) acc[b] += w0 * vld(x + b * xs + c);
  }
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

}  // namespace sparseprune::cpu::SP_ISA
