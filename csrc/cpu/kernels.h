// Torch-free CPU kernel interface. kernels_isa.cpp is compiled once per ISA level (generic, AVX2,
// AVX-512, AVX-512+BF16) into its own namespace, amx_kernels.cpp (bf16 on AMX tiles) twice: for real
// tiles (namespace amx) and on an emulation of them (amx_emu, for tests); dispatch.cpp picks one at run
// time. The torch-facing files (semi24_linear.cpp, ...) check tensors and call these.
#pragma once
#include <cstdint>
#include <cstdlib>

namespace sparseprune::cpu {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// y[B, N] = x[B, K] @ W^T + bias. x, y, bias and the weight values share one dtype; y may not
// alias x. Rows of x and y are contiguous with strides K and N. Accumulation is always fp32.
struct LinearProblem {
  const void* x;
  void* y;
  const void* bias;  // nullptr: no bias
  int64_t B, N, K;
  DType dtype;
};

// Semi24: values [N, K/2], meta [N, meta_stride] bytes. Group g of 4 inputs keeps positions
// p0 < p1, stored as the nibble p0 | p1 << 2 in byte g/2 (low nibble for even g).
// Any byte value is memory-safe: a position is 2 bits, so it never leaves its group.
void semi24_linear(const LinearProblem& p, const void* values, const uint8_t* meta, int64_t meta_stride);

// BSR: values [nnzb, bh, bw]; crow [N/bh + 1]; col [nnzb]. Caller has verified crow is
// non-decreasing from 0 to nnzb and every col is in [0, K/bw).
void bsr_linear(const LinearProblem& p, const void* values, const int32_t* crow, const int32_t* col,
                int64_t bh, int64_t bw);

// Hybrid: BSR structure as above; block values [nnzb, bh, bw/2], meta [nnzb, bh, bw/8] (bw % 8 == 0).
void hybrid_linear(const LinearProblem& p, const void* values, const uint8_t* meta, const int32_t* crow,
                   const int32_t* col, int64_t bh, int64_t bw);

// A batch-size knob from the environment, read per call (tests and benchmarks switch it between calls):
// a positive integer, else dflt. SPARSEPRUNE_AMX_MIN_BATCH (dispatch.cpp), SPARSEPRUNE_GEMV_MAX_BATCH
// (kernels_isa.cpp) move the switch points between kernel paths, to measure them on another CPU.
inline int64_t env_batch(const char* name, int64_t dflt) {
  if (const char* s = std::getenv(name)) {
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    if (end != s && *end == '\0' && v >= 1) return v;
  }
  return dflt;
}

// Name of the ISA level in use: "amx", "avx512bf16", "avx512", "avx2" or "generic"; "amx_emulated" when
// SPARSEPRUNE_CPU_ISA asks for the AMX kernels on emulated tiles.
const char* active_isa_name();

// Why the amx level is or is not available here, e.g. "enabled", "CPU lacks AMX-TILE/AMX-BF16" or the
// OS refusing the tile state (Linux grants it per process on request).
const char* amx_status();

// TDPBF16PS instructions the emulated tiles have executed in this process (tests use it to see that a
// call really ran on the tiles).
uint64_t amx_emulated_dot_count();

}  // namespace sparseprune::cpu
