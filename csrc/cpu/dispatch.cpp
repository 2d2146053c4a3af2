// Picks the kernel build for the CPU we are running on (never the one we were compiled on).
// SPARSEPRUNE_CPU_ISA=generic|avx2|avx512|avx512bf16 forces a lower level, which is how the tests cover
// every code path on one machine; asking for a level the CPU lacks falls back to the best one.
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

#define SP_DECLARE_ISA(ns)                                                                                         \
  namespace sparseprune::cpu::ns {                                                                                 \
  void semi24_linear(const LinearProblem&, const void*, const uint8_t*, int64_t);                                  \
  void bsr_linear(const LinearProblem&, const void*, const int32_t*, const int32_t*, int64_t, int64_t);            \
  void hybrid_linear(const LinearProblem&, const void*, const uint8_t*, const int32_t*, const int32_t*, int64_t,   \
                     int64_t);                                                                                     \
  }
SP_DECLARE_ISA(generic)
SP_DECLARE_ISA(avx2)
SP_DECLARE_ISA(avx512)
SP_DECLARE_ISA(avx512bf16)

namespace sparseprune::cpu {
namespace {

enum class Isa { Generic, Avx2, Avx512, Avx512Bf16 };

// What the CPU supports: probed once (cpuid is not free and this runs on every op call).
Isa best_supported() {
  static const Isa best = [] {
    __builtin_cpu_init();
    Isa best = Isa::Generic;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      best = Isa::Avx2;
    if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = Isa::Avx512;
    // AVX512-BF16 (vdpbf16ps): Cooper Lake, Sapphire Rapids and later, Zen 4 and later. GCC >= 12 knows the name.
    if (best == Isa::Avx512 && __builtin_cpu_supports("avx512bf16")) best = Isa::Avx512Bf16;
    return best;
  }();
  return best;
}

Isa detect() {
  const Isa best = best_supported();
  if (const char* want = std::getenv("SPARSEPRUNE_CPU_ISA")) {
    Isa w = best;
    if (!std::strcmp(want, "generic")) w = Isa::Generic;
    else if (!std::strcmp(want, "avx2")) w = Isa::Avx2;
    else if (!std::strcmp(want, "avx512")) w = Isa::Avx512;
    else if (!std::strcmp(want, "avx512bf16")) w = Isa::Avx512Bf16;
    if (int(w) < int(best)) return w;  // never a level the CPU lacks
  }
  return best;
}

// The override is read per call (a getenv) so tests can switch ISA by setting the variable.
Isa isa() { return detect(); }

}  // namespace

const char* active_isa_name() {
  switch (isa()) {
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

#define SP_DISPATCH(fn, ...)                          \
  switch (isa()) {                                    \
    case Isa::Avx512Bf16: return avx512bf16::fn(__VA_ARGS__); \
    case Isa::Avx512: return avx512::fn(__VA_ARGS__); \
    case Isa::Avx2: return avx2::fn(__VA_ARGS__);     \
    default: return generic::fn(__VA_ARGS__);         \
  }

void semi24_linear(const LinearProblem& p, const void* values, const uint8_t* meta, int64_t meta_stride) {
  SP_DISPATCH(semi24_linear, p, values, meta, meta_stride)
}
void bsr_linear(const LinearProblem& p, const void* values, const int32_t* crow, const int32_t* col, int64_t bh,
                int64_t bw) {
  SP_DISPATCH(bsr_linear, p, values, crow, col, bh, bw)
}
void hybrid_linear(const LinearProblem& p, const void* values, const uint8_t* meta, const int32_t* crow,
                   const int32_t* col, int64_t bh, int64_t bw) {
  SP_DISPATCH(hybrid_linear, p, values, meta, crow, col, bh, bw)
}

}  // namespace sparseprune::cpu
