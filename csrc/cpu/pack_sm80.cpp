// CPU implementation of sparseprune::pack_semi24_sm80: masked dense fp16/bf16 W [N, K] -> values and
// metadata in the order the CUDA backend's mma.sp fragments consume them (layout in
// csrc/cuda/semi24_sm80_layout.cuh). The GPU packer shares the same per-lane routine.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/semi24_sm80_layout.cuh"

namespace sparseprune::cpu {

std::tuple<at::Tensor, at::Tensor> pack_semi24_sm80_cpu(const at::Tensor& dense) {
  constexpr const char* op = "sparseprune::pack_semi24_sm80";
  TORCH_CHECK(dense.device().is_cpu(), op, ": expected a CPU tensor, got ", dense.device());
  TORCH_CHECK(dense.scalar_type() == at::kHalf || dense.scalar_type() == at::kBFloat16, op,
              ": mma.sp packing takes float16 or bfloat16, got ", dense.scalar_type());
  TORCH_CHECK(dense.dim() == 2, op, ": expected a 2-D [N, K] weight, got ", dense.sizes());
  const int64_t N = dense.size(0), K = dense.size(1);
  TORCH_CHECK(K % 4 == 0, op, ": K=", K, " must be a multiple of 4 for 2:4 packing");
  const int64_t mt = (N + cuda::kTileM - 1) / cuda::kTileM, ks = (K + cuda::kTileK - 1) / cuda::kTileK;
  auto w = dense.contiguous();
  auto values = at::empty({mt, ks, 32, 8}, dense.options());
  auto meta = at::zeros({mt, ks, 16}, dense.options().dtype(at::kInt));
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* vdst = reinterpret_cast<uint16_t*>(values.data_ptr());
  auto* mdst = reinterpret_cast<uint32_t*>(meta.data_ptr<int32_t>());
  int64_t bad_tile = -1;
#pragma omp parallel for schedule(static) reduction(max : bad_tile)
  for (int64_t tile = 0; tile < mt * ks; ++tile) {
    const int64_t m = tile / ks, k = tile % ks;
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t word = 0;
      const bool ok = cuda::pack_sm80_lane(src, K, N, K, m, k, lane, vdst + (tile * 32 + lane) * 8, &word);
      if (!ok) bad_tile = std::max(bad_tile, tile);
      const int g = lane >> 2, t = lane & 3;
      if (t < 2) mdst[tile * 16 + 2 * g + t] = word;
    }
  }
  TORCH_CHECK(bad_tile < 0, op, ": weight is not 2:4: a group of 4 inputs in rows ", (bad_tile / ks) * 16, "..",
              (bad_tile / ks) * 16 + 15, ", inputs ", (bad_tile % ks) * 32, "..", (bad_tile % ks) * 32 + 31,
              " keeps more than 2 nonzeros");
  return {values, meta};
}

}  // namespace sparseprune::cpu

TORCH_LIBRARY_IMPL(sparseprune, CPU, m) { m.impl("pack_semi24_sm80", &sparseprune::cpu::pack_semi24_sm80_cpu); }
