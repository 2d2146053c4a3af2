// SIMD helpers shared by the per-ISA kernel builds (included only from kernels_isa.cpp, which defines
// SP_ISA). One source serves every level: the vector width follows the compile flags, and plain GCC
// vector extensions carry the arithmetic, so the generic build is the same algorithm on SSE2.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>

#include "cpu/kernels.h"

#ifndef SP_ISA
#error "kern_simd.h is meant for kernels_isa.cpp (compiled once per ISA with SP_ISA defined)"
#endif

#define SP_INLINE inline __attribute__((always_inline))

namespace sparseprune::cpu::SP_ISA {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector
constexpr int RB = 4;   // rows register-blocked in tiled kernels: 4 rows x 4 vectors = 16 of 32 zmm accumulators
#elif defined(__AVX2__)
constexpr int VW = 8;
constexpr int RB = 2;  // 16 ymm: 2 x 4 accumulators leave room for the x rows and the broadcast
#else
constexpr int VW = 4;
constexpr int RB = 2;
#endif
constexpr int NVMAX = 4;          // vectors of batch per tile row
constexpr int BT = NVMAX * VW;    // batch tile (64 fp32 on AVX-512): one transposed x row = 4 vectors

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4), may_alias));

SP_INLINE vf vld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
SP_INLINE void vst(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
SP_INLINE vf vset1(float s) {  // intrinsics: GCC turns a per-lane fill into 16 masked broadcasts
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(s);
#elif defined(__AVX2__)
  return (vf)_mm256_set1_ps(s);
#else
  return (vf)_mm_set1_ps(s);  // SSE is part of the x86-64 baseline
#endif
}
SP_INLINE float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// Storage type per dtype: bf16 and fp16 travel as raw 16-bit words.
template <DType DT> struct St { using T = uint16_t; };
template <> struct St<DType::F32> { using T = float; };

SP_INLINE float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
SP_INLINE float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
#endif
}

template <DType DT> SP_INLINE float lds(const typename St<DT>::T* p) {
  if constexpr (DT == DType::F32) return *p;
  else if constexpr (DT == DType::BF16) return bf16_to_f32(*p);
  else return f16_to_f32(*p);
}

// VW consecutive values as fp32.
template <DType DT> SP_INLINE vf ldv(const typename St<DT>::T* p) {
  if constexpr (DT == DType::F32) {
    return vld(p);
  } else {
#if defined(__AVX512F__)
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (DT == DType::BF16) return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return (vf)_mm512_cvtph_ps(h);
#elif defined(__AVX2__)
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (DT == DType::BF16) return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return (vf)_mm256_cvtph_ps(h);
#else
    vf r;
    for (int i = 0; i < VW; ++i) r[i] = lds<DT>(p + i);
    return r;
#endif
  }
}

// Rounds once to the storage dtype: bf16 round-to-nearest-even with NaN kept (quiet) NaN.
template <DType DT> SP_INLINE void sts(typename St<DT>::T* p, float v) {
  if constexpr (DT == DType::F32) {
    *p = v;
  } else if constexpr (DT == DType::BF16) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u;
    else u += 0x7fffu + ((u >> 16) & 1u);
    *p = uint16_t(u >> 16);
  } else {
#if defined(__F16C__)
    *p = uint16_t(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
#else
    _Float16 h = static_cast<_Float16>(v);
    std::memcpy(p, &h, 2);
#endif
  }
}

// n values to fp32.
template <DType DT> SP_INLINE void to_f32(const typename St<DT>::T* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) vst(dst + i, ldv<DT>(src + i));
  for (; i < n; ++i) dst[i] = lds<DT>(src + i);
}

template <DType DT> using T_ = typename St<DT>::T;

#if defined(__AVX2__)
// 8 consecutive values as fp32 in one 256-bit vector (at every AVX2+ level, AVX-512 included).
template <DType DT> SP_INLINE __m256 ld8(const typename St<DT>::T* p) {
  if constexpr (DT == DType::F32) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (DT == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

// In-register 8x8 transpose: r[i] holds row i on entry, column i on exit.
SP_INLINE void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

SP_INLINE uint32_t ld32(const uint16_t* p) {  // two adjacent 16-bit values as one word (first in the low half)
  uint32_t u;
  std::memcpy(&u, p, 4);
  return u;
}

// ------------------------------------------------------------------ driver helpers (every kernel TU)
// Work is handed out dynamically in about this many pieces: on a shared machine a thread may lose
// its core for a whole scheduler slice, and static splits would then make the others wait for it.
constexpr int64_t kPieces = 64;
SP_INLINE int64_t piece(int64_t n) { return n / kPieces > 1 ? n / kPieces : 1; }

// Below this many multiply-adds a call stays on one thread: waking a second thread costs
// microseconds on an idle machine and up to a scheduler slice on an oversubscribed one, which
// dwarfs a small layer's work (a 128x128 2:4 layer at batch 1 is 8k multiply-adds).
constexpr int64_t kMinParallelMacs = int64_t(1) << 18;
SP_INLINE bool use_threads(int64_t macs) { return macs >= kMinParallelMacs; }

template <DType DT> SP_INLINE void put(const LinearProblem& p, int64_t b, int64_t n, float v) {
  if (p.bias) v += lds<DT>(static_cast<const T_<DT>*>(p.bias) + n);
  sts<DT>(static_cast<T_<DT>*>(p.y) + b * p.N + n, v);
}

// Writes part[r][j] (r < nr rows from n0, j < nb batch rows from b0; row stride ld) with bias, rounded once.
template <DType DT>
void finalize(const LinearProblem& p, const float* part, int64_t n0, int64_t nr, int64_t b0, int64_t nb,
              int64_t ld = BT) {
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t r = 0; r < nr; ++r) put<DT>(p, b0 + j, n0 + r, part[r * ld + j]);
}

// 64-byte aligned scratch (aligned rows keep the tile loads on one cache line each).
struct Scratch {
  float* p = nullptr;
  explicit Scratch(int64_t n) {
    size_t bytes = (size_t(n > 0 ? n : 1) * 4 + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

}  // namespace sparseprune::cpu::SP_ISA
