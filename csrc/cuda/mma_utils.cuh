// PTX wrappers, epilogues and launch helpers shared by the CUDA kernels (torch-free). sm_80+: cp.async,
// ldmatrix, mma.sync, mma.sp.
//
// Built two ways: by nvcc for the GPU, and as plain host C++ with SP_CUDA_EMU defined for the SIMT emulator in
// csrc/cuda/emu (tests only). The kernels are the same source either way; the emulator replaces exactly the
// device primitives in the one #if below (the PTX wrappers, the dynamic shared array, kernel launches) and,
// in emu/emu_runtime.h, the CUDA built-ins (threadIdx & co., __syncthreads, atomicExch, half types).
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

#include "launch_plan.cuh"

#if defined(SP_CUDA_EMU)
#include "emu/emu_runtime.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace sparseprune::cuda {

#if defined(SP_CUDA_EMU)
// Host implementations of the wrappers below (warp-collective, checked): emu/emu_primitives.h.
#include "emu/emu_primitives.h"
#define SP_DYNAMIC_SMEM(name) unsigned char* const name = ::sp_emu::dynamic_smem()
#else
// The CTA's dynamic shared memory (size given at launch).
#define SP_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1 (.cg); pred=false writes 16 zero bytes instead of reading.
// Both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// D = A(16x32, 2:4 compressed to 16x16) * B(32x8) + D, fp32 accumulate, sparsity selector 0.
// ordered_metadata: ptxas recommends it on sm_80/90 and newer archs accept only this form; our
// nibbles are always p0 < p1 (see semi24_sm80_layout.cuh).
template <typename T>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
}

// D = A(16x16) * B(16x8) + D, dense, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Host side: launches kern on grid x block with smem bytes of dynamic shared memory. Returns the launch error.
template <typename... P, typename... A>
inline cudaError_t launch_kernel(void (*kern)(P...), dim3 grid, dim3 block, int smem, cudaStream_t stream,
                                 const A&... args) {
  kern<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
}
#endif  // SP_CUDA_EMU

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}
template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

// Zeroes a warp's fp32 accumulator fragments (MI x NI tiles of 16x8, four values per lane each).
template <int MI, int NI>
__device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4]) {
#pragma unroll
  for (int a = 0; a < MI; ++a)
#pragma unroll
    for (int b = 0; b < NI; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
}

// Accumulator tile epilogue shared by the GEMMs computing Y^T = W X^T: acc[mi][ni] is the 16x8 tile at
// weight rows row0 + 16 mi, tokens tok0 + 8 ni. Writes y[token][row] (+ bias) or fp32 partials.
template <typename T, int MI, int NI>
__device__ __forceinline__ void store_acc(const float (&acc)[MI][NI][4], int row0, int tok0, int lane, int N, int B,
                                          T* y, int64_t ldy, const T* bias, float* partial) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * mi + g + 8 * h;
      if (row >= N) continue;
      const float b = (bias && !partial) ? to_float(bias[row]) : 0.f;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int tok = tok0 + 8 * ni + 2 * t + j;
          if (tok >= B) continue;
          const float v = acc[mi][ni][2 * h + j];
          if (partial) partial[int64_t(tok) * N + row] = v;
          else y[int64_t(tok) * ldy + row] = from_float<T>(v + b);
        }
    }
}

// Shared-memory bytes store_acc_staged needs for a BM x BN CTA tile.
template <int BM, int BN>
constexpr int staged_epilogue_bytes() { return BN * (BM + 8) * 2; }

// Same result as store_acc (non-split path), but coalesced: the CTA's accumulators (weight rows row0..+BM,
// tokens tok0..+BN) are first written, with bias, to shared memory transposed to y's order ([token][row],
// rows padded by 8 halves so the fragment scatter spreads over banks), then every thread copies 16-byte
// chunks of one token's row run to y. The fragment layout would otherwise make each warp store 2-byte
// values 2*ldy bytes apart. Reuses the pipeline's shared memory: call after the last cp.async has landed.
// Called by all threads of the CTA (it has barriers).
template <typename T, int MI, int NI, int BM, int BN, int THREADS>
__device__ __forceinline__ void store_acc_staged(const float (&acc)[MI][NI][4], unsigned char* smem, int wrow0,
                                                 int wtok0, int tid, int row0, int tok0, int N, int B, T* y,
                                                 int64_t ldy, const T* bias) {
  constexpr int LD = BM + 8;
  T* s = reinterpret_cast<T*>(smem);
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
  __syncthreads();  // every warp is done reading the last pipeline stage
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wrow0 + 16 * mi + g + 8 * h;
      const float b = (bias && row0 + r < N) ? to_float(bias[row0 + r]) : 0.f;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) s[(wtok0 + 8 * ni + 2 * t + j) * LD + r] = from_float<T>(acc[mi][ni][2 * h + j] + b);
    }
  __syncthreads();
  const bool vec = ldy % 8 == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0;
  for (int i = tid; i < BN * (BM / 8); i += THREADS) {
    const int tr = i / (BM / 8), c = (i % (BM / 8)) * 8;
    const int tok = tok0 + tr, col = row0 + c;
    if (tok >= B || col >= N) continue;
    T* dst = y + int64_t(tok) * ldy + col;
    const T* src = s + tr * LD + c;
    if (vec && col + 8 <= N) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && col + e < N; ++e) dst[e] = src[e];
    }
  }
}

// store_acc_staged for the warp grid the three GEMMs share: warp (warp_m, warp_n) of a WARPS_M x WARPS_N CTA
// holds MI 16-row tiles from CTA row warp_m * MI * 16 and NI 8-token tiles from CTA token warp_n * (BN / WARPS_N).
// p supplies N, B, y, ldy and bias (the kernels' argument structs). Called by all threads of the CTA.
template <typename T, int BM, int BN, int WARPS_N, int THREADS, int MI, int NI, typename Args>
__device__ __forceinline__ void store_cta_acc_staged(const float (&acc)[MI][NI][4], unsigned char* smem, int warp_m,
                                                     int warp_n, int tid, int row0, int tok0, const Args& p) {
  store_acc_staged<T, MI, NI, BM, BN, THREADS>(acc, smem, warp_m * MI * 16, warp_n * (BN / WARPS_N), tid, row0, tok0,
                                               p.N, p.B, static_cast<T*>(p.y), p.ldy, static_cast<const T*>(p.bias));
}

// The CTA's result: with split-K (p.partial set) this split's fp32 partials [split][B][N] straight from the fragments
// (splitk_reduce_kernel adds them up with the bias), else the bias-added output through store_cta_acc_staged.
// Called by all threads of the CTA after the last cp.async has landed.
template <typename T, int BM, int BN, int WARPS_N, int THREADS, int MI, int NI, typename Args>
__device__ __forceinline__ void store_cta_result(const float (&acc)[MI][NI][4], unsigned char* smem, int warp_m,
                                                 int warp_n, int tid, int row0, int tok0, int split, const Args& p) {
  if (p.partial) {
    store_acc<T, MI, NI>(acc, row0 + warp_m * MI * 16, tok0 + warp_n * (BN / WARPS_N), tid & 31, p.N, p.B, nullptr,
                         0, nullptr, p.partial + int64_t(split) * p.B * p.N);
  } else {
    store_cta_acc_staged<T, BM, BN, WARPS_N, THREADS>(acc, smem, warp_m, warp_n, tid, row0, tok0, p);
  }
}

// Host side: raises kern's dynamic shared-memory limit to smem_bytes (needed above 48 KB), then launches it
// on grid x threads with that much shared memory. Returns the first CUDA error.
template <typename Args>
inline cudaError_t launch_with_smem(void (*kern)(const Args), dim3 grid, int threads, int smem_bytes, const Args& a,
                                    cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  return launch_kernel(kern, grid, dim3(threads), smem_bytes, stream, a);
}

// y[b][n] = sum over splits of partial[s][b][n] (+ bias): the split-K reduction.
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, int splits, int64_t BN, int N,
                                     const T* __restrict__ bias, T* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < BN; i += int64_t(gridDim.x) * blockDim.x) {
    float v = bias ? to_float(bias[i % N]) : 0.f;
    for (int s = 0; s < splits; ++s) v += partial[s * BN + i];
    y[i] = from_float<T>(v);
  }
}

// Launches splitk_reduce_kernel over B x N outputs: 256 threads per CTA, grid-stride, at most 4 CTAs per SM.
template <typename T>
inline cudaError_t launch_splitk_reduce(const float* partial, int splits, int B, int N, const void* bias, void* y,
                                        int num_sms, cudaStream_t stream) {
  const int64_t n = int64_t(B) * N;
  const int blocks = int(std::min<int64_t>((n + 255) / 256, 4 * int64_t(num_sms)));
  return launch_kernel(splitk_reduce_kernel<T>, dim3(blocks), dim3(256), 0, stream, partial, splits, n, N,
                       static_cast<const T*>(bias), static_cast<T*>(y));
}

// Launches kern as plan says (grid.x = M blocks x token blocks, grid.y = K splits, the config's threads and shared
// memory), then, when K is split, the reduction of the fp32 partials in a.partial into a.y (+ bias).
template <typename T, typename Args>
inline cudaError_t launch_planned(void (*kern)(const Args), const Args& a, const LaunchPlan& plan, int num_sms,
                                  cudaStream_t stream) {
  cudaError_t err = launch_with_smem(kern, dim3(unsigned(plan.grid_x()), unsigned(plan.splits)), plan.tile.threads(),
                                     plan.tile.smem_bytes, a, stream);
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch_splitk_reduce<T>(a.partial, plan.splits, a.B, a.N, a.bias, a.y, num_sms, stream);
}

// Calls launch(std::integral_constant<int, I>) for I == config, one of 0..N-1: turns the planner's runtime
// config index into the kernel template instantiation of that config.
template <size_t N, typename Launch>
inline cudaError_t dispatch_config(int config, Launch&& launch) {
  return [&]<size_t... I>(std::index_sequence<I...>) {
    cudaError_t r = cudaErrorInvalidValue;
    ((config == int(I) ? (r = launch(std::integral_constant<int, int(I)>{}), 0) : 0), ...);
    return r;
  }(std::make_index_sequence<N>{});
}

// cp.async reads 16-byte chunks: a pointer it reads from must be 16-byte aligned.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace sparseprune::cuda
