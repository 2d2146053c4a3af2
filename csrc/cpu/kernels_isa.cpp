// Compiled once per ISA level (SP_ISA = generic | avx2 | avx512, see CMakeLists.txt).
// FIRST VERSION: straightforward fp32-accumulating loops; the tuned kernels replace these.
#include <omp.h>

#include <cstring>
#include <vector>

#include "cpu/kernels.h"

#define SP_CAT2(a, b) a##b
#define SP_CAT(a, b) SP_CAT2(a, b)

namespace sparseprune::cpu::SP_ISA {

namespace {
inline float load(const void* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: {
      uint32_t u = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    default: return static_cast<float>(static_cast<const _Float16*>(p)[i]);
  }
}
inline void store(void* p, int64_t i, float v, DType dt) {
  switch (dt) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      if ((u & 0x7fffffffu) > 0x7f800000u) {
        u = (u | 0x00400000u);  // quiet NaN
      } else {
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
      }
      static_cast<uint16_t*>(p)[i] = uint16_t(u >> 16);
      break;
    }
    default: static_cast<_Float16*>(p)[i] = static_cast<_Float16>(v);
  }
}
}  // namespace

void semi24_linear(const LinearProblem& p, const void* values, const uint8_t* meta, int64_t meta_stride) {
  const int64_t G = p.K / 4;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t n = 0; n < p.N; ++n) {
      float acc = p.bias ? load(p.bias, n, p.dtype) : 0.f;
      for (int64_t g = 0; g < G; ++g) {
        uint8_t nib = (meta[n * meta_stride + g / 2] >> ((g & 1) * 4)) & 0xF;
        acc += load(values, n * (p.K / 2) + 2 * g, p.dtype) * load(p.x, b * p.K + 4 * g + (nib & 3), p.dtype);
        acc += load(values, n * (p.K / 2) + 2 * g + 1, p.dtype) * load(p.x, b * p.K + 4 * g + (nib >> 2), p.dtype);
      }
      store(p.y, b * p.N + n, acc, p.dtype);
    }
}

void bsr_linear(const LinearProblem& p, const void* values, const int32_t* crow, const int32_t* col, int64_t bh,
                int64_t bw) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t br = n / bh, r = n % bh;
      float acc = p.bias ? load(p.bias, n, p.dtype) : 0.f;
      for (int64_t i = crow[br]; i < crow[br + 1]; ++i)
        for (int64_t c = 0; c < bw; ++c)
          acc += load(values, (i * bh + r) * bw + c, p.dtype) * load(p.x, b * p.K + col[i] * bw + c, p.dtype);
      store(p.y, b * p.N + n, acc, p.dtype);
    }
}

void hybrid_linear(const LinearProblem& p, const void* values, const uint8_t* meta, const int32_t* crow,
                   const int32_t* col, int64_t bh, int64_t bw) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t br = n / bh, r = n % bh;
      float acc = p.bias ? load(p.bias, n, p.dtype) : 0.f;
      for (int64_t i = crow[br]; i < crow[br + 1]; ++i) {
        const uint8_t* m = meta + (i * bh + r) * (bw / 8);
        const int64_t vbase = (i * bh + r) * (bw / 2), xbase = b * p.K + col[i] * bw;
        for (int64_t g = 0; g < bw / 4; ++g) {
          uint8_t nib = (m[g / 2] >> ((g & 1) * 4)) & 0xF;
          acc += load(values, vbase + 2 * g, p.dtype) * load(p.x, xbase + 4 * g + (nib & 3), p.dtype);
          acc += load(values, vbase + 2 * g + 1, p.dtype) * load(p.x, xbase + 4 * g + (nib >> 2), p.dtype);
        }
      }
      store(p.y, b * p.N + n, acc, p.dtype);
    }
}

}  // namespace sparseprune::cpu::SP_ISA
