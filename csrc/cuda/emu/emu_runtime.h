// The CUDA language and runtime pieces our kernels use, implemented on the host for the SIMT emulator.
// Test-only: compiled with SP_CUDA_EMU into build/cuda_emu/libsp_cuda_emu.so, never into the extension or the
// wheel. csrc/cuda/mma_utils.cuh includes this instead of the CUDA headers; the kernel headers compile unchanged.
//
// Execution model (emu_core.cpp): a launch runs its CTAs one after another; a CTA's threads are fibers on one
// OS thread, switched only where CUDA lets threads wait for each other (__syncthreads, warp-collective
// instructions), so __syncthreads is a real barrier and ldmatrix/mma exchange fragments between the 32 lanes
// of a warp at one call site. threadIdx & co. read the running fiber's state.
#pragma once
#if !defined(SP_CUDA_EMU)
#error "emu_runtime.h is the CPU emulation of CUDA: compile with -DSP_CUDA_EMU"
#endif
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>

// ---- language keywords -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict

// ---- vector and half types (bit-exact IEEE conversions, round to nearest even) --------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

namespace sp_emu {
float half_bits_to_float(uint16_t h);
uint16_t float_to_half_bits(float f);
float bf16_bits_to_float(uint16_t h);
uint16_t float_to_bf16_bits(float f);
}  // namespace sp_emu

inline float __half2float(__half h) { return sp_emu::half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{sp_emu::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return sp_emu::bf16_bits_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{sp_emu::float_to_bf16_bits(f)}; }

// ---- runtime API subset -----------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace sp_emu {
// The function body a launch runs per thread (type-erased kernel call).
struct KernelBody {
  void (*call)(const void* ctx);
  const void* ctx;
};
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, int dyn_smem, KernelBody body);
cudaError_t set_func_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t take_last_error();
const char* error_string(cudaError_t e);

// The running fiber's built-ins, set by the scheduler each time it switches a fiber in (emu_core.cpp).
extern thread_local uint3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

void syncthreads(const std::source_location& loc);

// The PTX instructions behind mma_utils.cuh's wrappers (emu_primitives.h calls these).
enum class MmaType { f16, bf16 };
// cp.async.cg.shared.global [smem], [gmem], cp_size, src_size: strict mode, see emu_core.cpp.
void cp_async(void* smem, const void* gmem, int cp_size, int src_size, const std::source_location& loc);
void cp_async_commit(const std::source_location& loc);
void cp_async_wait(int n, const std::source_location& loc);
// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (warp-collective).
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, const std::source_location& loc);
// mma.sp{::ordered_metadata}.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (warp-collective).
void mma_sp_m16n8k32(MmaType t, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e,
                     int selector, bool ordered_metadata, const std::source_location& loc);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (warp-collective).
void mma_m16n8k16(MmaType t, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                  const std::source_location& loc);
int atomic_exch(int* addr, int value);
unsigned char* dynamic_smem();
}  // namespace sp_emu

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return sp_emu::set_func_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
inline cudaError_t cudaGetLastError() { return sp_emu::take_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return sp_emu::error_string(e); }

// ---- built-ins --------------------------------------------------------------------------------------
#define threadIdx (::sp_emu::g_thread_idx)
#define blockIdx (::sp_emu::g_block_idx)
#define blockDim (::sp_emu::g_block_dim)
#define gridDim (::sp_emu::g_grid_dim)

inline void __syncthreads(const std::source_location loc = std::source_location::current()) {
  sp_emu::syncthreads(loc);
}
inline int atomicExch(int* addr, int value) { return sp_emu::atomic_exch(addr, value); }

// CUDA's device min/max (integer overloads the kernels use unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }

namespace sp_emu {
// Type-erased launch: every thread of every CTA calls kern(args...) with its own copies of the arguments.
template <typename... P, typename... A>
inline cudaError_t launch(void (*kern)(P...), dim3 grid, dim3 block, int smem, const A&... args) {
  struct Ctx {
    void (*kern)(P...);
    const std::tuple<const A&...> args;
  };
  Ctx ctx{kern, std::tuple<const A&...>(args...)};
  KernelBody body{[](const void* c) {
                    const Ctx& x = *static_cast<const Ctx*>(c);
                    std::apply([&](const A&... a) { x.kern(a...); }, x.args);
                  },
                  &ctx};
  return run_grid(reinterpret_cast<const void*>(kern), grid, block, smem, body);
}
}  // namespace sp_emu
