// Host versions of the PTX wrappers in csrc/cuda/mma_utils.cuh, with the same names and signatures (plus a
// defaulted call site, which the warp-collective checks compare across lanes). Included by mma_utils.cuh inside
// namespace sparseprune::cuda when SP_CUDA_EMU is defined; the work is done in emu_core.cpp.
// (No #pragma once and no #includes: this is a fragment of mma_utils.cuh.)

inline void cp_async16(void* smem, const void* gmem, bool pred,
                       const std::source_location loc = std::source_location::current()) {
  ::sp_emu::cp_async(smem, gmem, 16, pred ? 16 : 0, loc);
}
inline void cp_async_commit(const std::source_location loc = std::source_location::current()) {
  ::sp_emu::cp_async_commit(loc);
}
template <int N>
inline void cp_async_wait(const std::source_location loc = std::source_location::current()) {
  ::sp_emu::cp_async_wait(N, loc);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem,
                        const std::source_location loc = std::source_location::current()) {
  ::sp_emu::ldmatrix_x4(r, smem, loc);
}

template <typename T>
constexpr ::sp_emu::MmaType emu_mma_type() {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16 operands");
  return std::is_same_v<T, __half> ? ::sp_emu::MmaType::f16 : ::sp_emu::MmaType::bf16;
}

// Same instruction as the GPU wrapper: mma.sp::ordered_metadata, sparsity selector 0.
template <typename T>
inline void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e,
                         const std::source_location loc = std::source_location::current()) {
  ::sp_emu::mma_sp_m16n8k32(emu_mma_type<T>(), d, a, b, e, /*selector=*/0, /*ordered_metadata=*/true, loc);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                      const std::source_location loc = std::source_location::current()) {
  ::sp_emu::mma_m16n8k16(emu_mma_type<T>(), d, a, b0, b1, loc);
}

// Kernel launch: runs the whole grid on the calling thread before returning (the stream is ignored).
template <typename... P, typename... A>
inline cudaError_t launch_kernel(void (*kern)(P...), dim3 grid, dim3 block, int smem, cudaStream_t,
                                 const A&... args) {
  return ::sp_emu::launch(kern, grid, block, smem, args...);
}
