// Picks the kernel build for the CPU we are running on (never the one we were compiled on).
// SPARSEPRUNE_CPU_ISA=generic|avx2|avx512|avx512bf16|amx forces a lower level, which is how the tests cover
// every code path on one machine; asking for a level the CPU lacks falls back to the best one.
// SPARSEPRUNE_CPU_ISA=amx_emulated runs the AMX tile kernels on a scalar model of the tiles (any x86-64
// CPU; slow: for tests), with the best level up to avx512bf16 for everything the tiles do not take.
// SPARSEPRUNE_AMX_MIN_BATCH=<n> sets the smallest batch the AMX tiles take (default below).
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/kernels.h"

// The AMX builds return bool: they take a call (true) or leave it to the level below (false: not bf16, a
// block shape too small for tiles, a non-finite x for the 2:4 formats).
#define SP_DECLARE_OPS(ns, ret)                                                                                    \
  namespace sparseprune::cpu::ns {                                                                                 \
  ret semi24_linear(const LinearProblem&, const void*, const uint8_t*, int64_t);                                   \
  ret bsr_linear(const LinearProblem&, const void*, const int32_t*, const int32_t*, int64_t, int64_t);             \
  ret hybrid_linear(const LinearProblem&, const void*, const uint8_t*, const int32_t*, const int32_t*, int64_t,    \
                    int64_t);                                                                                      \
  }
SP_DECLARE_OPS(generic, void)
SP_DECLARE_OPS(avx2, void)
SP_DECLARE_OPS(avx512, void)
SP_DECLARE_OPS(avx512bf16, void)
#if SP_HAVE_AMX
SP_DECLARE_OPS(amx, bool)
#endif
SP_DECLARE_OPS(amx_emu, bool)
namespace sparseprune::cpu::amx_emu {
uint64_t emulated_dot_count();
}

namespace sparseprune::cpu {
namespace {

enum class Isa { Generic, Avx2, Avx512, Avx512Bf16, Amx, AmxEmulated };

// Smallest batches the AMX tiles take by default: the AVX-512 GEMV (weights streamed once, x rows in
// registers) is what runs below, and it beat the tiles at batch 1 on an Emerald Rapids prototype. The
// defaults hand the tiles exactly the batches the AVX-512 tile path would otherwise get (GEMV limits
// in kernels_isa.cpp); the crossover on real AMX has not been measured yet (see the benchmarks).
constexpr int64_t kAmxMinBatchSemi = 5;  // semi24 and hybrid
constexpr int64_t kAmxMinBatchBsr = 3;

// Linux keeps the 8 KB AMX tile state out of a process until it asks (kernel >= 5.16).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct AmxProbe {
  bool ok = false;
  std::string status;
};

AmxProbe probe_amx() {
  AmxProbe r;
#if !SP_HAVE_AMX
  r.status = "not built (the compiler lacks -mamx-tile/-mamx-bf16)";
  return r;
#else
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) {
    r.status = "CPU lacks AMX-TILE/AMX-BF16";
    return r;
  }
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) {
    r.status = "OS has not enabled XSAVE";
    return r;
  }
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) {
    r.status = "OS does not enable the AMX tile state (XCR0 bits 17-18)";
    return r;
  }
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    r.status = std::string("OS refused the AMX tile state: arch_prctl(ARCH_REQ_XCOMP_PERM) failed: ") +
               std::strerror(errno);
    return r;
  }
  r.ok = true;
  r.status = "enabled";
  return r;
#endif
}

const AmxProbe& amx_probe() {
  static const AmxProbe p = probe_amx();
  return p;
}

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
    // AMX (Sapphire Rapids and later Xeons): its fallbacks are the avx512bf16 kernels.
    if (best == Isa::Avx512Bf16 && amx_probe().ok) best = Isa::Amx;
    return best;
  }();
  return best;
}

Isa detect() {
  const Isa best = best_supported();
  if (const char* want = std::getenv("SPARSEPRUNE_CPU_ISA")) {
    if (!std::strcmp(want, "amx_emulated")) return Isa::AmxEmulated;  // any CPU: the tiles are emulated
    Isa w = best;
    if (!std::strcmp(want, "generic")) w = Isa::Generic;
    else if (!std::strcmp(want, "avx2")) w = Isa::Avx2;
    else if (!std::strcmp(want, "avx512")) w = Isa::Avx512;
    else if (!std::strcmp(want, "avx512bf16")) w = Isa::Avx512Bf16;
    else if (!std::strcmp(want, "amx")) w = Isa::Amx;
    if (int(w) < int(best)) return w;  // never a level the CPU lacks
  }
  return best;
}

// The override is read per call (a getenv) so tests can switch ISA by setting the variable.
Isa isa() { return detect(); }

// The level that runs what the AMX tiles leave (and everything below AMX).
Isa vector_level(Isa i) {
  if (i == Isa::Amx) return Isa::Avx512Bf16;
  if (i == Isa::AmxEmulated) return best_supported() == Isa::Amx ? Isa::Avx512Bf16 : best_supported();
  return i;
}

}  // namespace

const char* active_isa_name() {
  switch (isa()) {
    case Isa::AmxEmulated: return "amx_emulated";
    case Isa::Amx: return "amx";
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

const char* amx_status() { return amx_probe().status.c_str(); }
uint64_t amx_emulated_dot_count() { return amx_emu::emulated_dot_count(); }

// AMX first when the level and the batch ask for it and the tiles take the call, else the vector level.
#if SP_HAVE_AMX
#define SP_TRY_AMX_REAL(fn, ...) \
  if (i == Isa::Amx && amx::fn(__VA_ARGS__)) return;
#else
#define SP_TRY_AMX_REAL(fn, ...)
#endif
#define SP_DISPATCH(min_batch, fn, ...)                                                 \
  const Isa i = isa();                                                                  \
  if (i >= Isa::Amx && p.B >= env_batch("SPARSEPRUNE_AMX_MIN_BATCH", min_batch)) {   \
    SP_TRY_AMX_REAL(fn, __VA_ARGS__)                                                    \
    if (i == Isa::AmxEmulated && amx_emu::fn(__VA_ARGS__)) return;                      \
  }                                                                                     \
  switch (vector_level(i)) {                                                            \
    case Isa::Avx512Bf16: return avx512bf16::fn(__VA_ARGS__);                           \
    case Isa::Avx512: return avx512::fn(__VA_ARGS__);                                   \
    case Isa::Avx2: return avx2::fn(__VA_ARGS__);                                       \
    default: return generic::fn(__VA_ARGS__);                                           \
  }

void semi24_linear(const LinearProblem& p, const void* values, const uint8_t* meta, int64_t meta_stride) {
  SP_DISPATCH(kAmxMinBatchSemi, semi24_linear, p, values, meta, meta_stride)
}
void bsr_linear(const LinearProblem& p, const void* values, const int32_t* crow, const int32_t* col, int64_t bh,
                int64_t bw) {
  SP_DISPATCH(kAmxMinBatchBsr, bsr_linear, p, values, crow, col, bh, bw)
}
void hybrid_linear(const LinearProblem& p, const void* values, const uint8_t* meta, const int32_t* crow,
                   const int32_t* col, int64_t bh, int64_t bw) {
  SP_DISPATCH(kAmxMinBatchSemi, hybrid_linear, p, values, meta, crow, col, bh, bw)
}

}  // namespace sparseprune::cpu
