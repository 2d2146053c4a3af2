// CUDA implementations of sparseprune::cuda_semi24_linear and sparseprune::pack_semi24_sm80
// (tensor checks + launch; the kernels are in semi24_sm80.cuh).
#include <torch/library.h>

#include "cuda/semi24_sm80.cuh"
#include "cuda/torch_cuda_utils.h"

namespace sparseprune::cuda {

at::Tensor cuda_semi24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              int64_t in_features, int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparseprune::cuda_semi24_linear";
  check_linear_inputs(x, values, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, N = out_features;
  const int64_t MT = (N + 15) / 16, KS = (K + 31) / 32;
  // the packed layout only records ceil(K/32): without this check an x with up to 31 more features would be
  // accepted and its extra inputs silently multiplied by the zero padding
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x has ", x.size(-1), " features, the weight expects ", K);
  TORCH_CHECK(K % 4 == 0, op, ": in_features=", K, " must be a multiple of 4");
  TORCH_CHECK(N >= 0, op, ": out_features must be >= 0, got ", N);
  TORCH_CHECK(values.dim() == 4 && values.size(0) == MT && values.size(1) == KS && values.size(2) == 32 &&
                  values.size(3) == 8 && values.is_contiguous(),
              op, ": values must be contiguous [", MT, ", ", KS, ", 32, 8] (pack_semi24_sm80 of a ", N, "x", K,
              " weight), got ", values.sizes());
  TORCH_CHECK(meta.is_cuda() && meta.device() == x.device() && meta.scalar_type() == at::kInt && meta.dim() == 3 &&
                  meta.size(0) == MT && meta.size(1) == KS && meta.size(2) == 16 && meta.is_contiguous(),
              op, ": meta must be contiguous int32 [", MT, ", ", KS, ", 16] on ", x.device());
  TORCH_CHECK(N < (int64_t(1) << 31) && KS < (int64_t(1) << 30), op, ": weight too large for 32-bit tile indices");
  const LinearIO io = prepare_io(x, bias, N, K, op);
  if (io.empty()) return io.y;
  Semi24Args a{};
  set_common_args(a, values, io, N, K);
  a.meta = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  a.MT = int(MT);
  a.KS = int(KS);
  if (const char* why = semi24_args_error(a)) TORCH_CHECK(false, op, ": ", why);
  const DeviceLimits dev = device_limits(x.get_device());
  const LaunchPlan plan = plan_semi24(a.B, N, K, dev);
  const at::Tensor ws = splitk_workspace(plan, x, op);
  const auto stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  float* wsp = ws.defined() ? ws.data_ptr<float>() : nullptr;
  const cudaError_t err = x.scalar_type() == at::kHalf
                              ? launch_semi24_sm80<__half>(a, plan, wsp, dev.num_sms, stream)
                              : launch_semi24_sm80<__nv_bfloat16>(a, plan, wsp, dev.num_sms, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return io.y;
}

std::tuple<at::Tensor, at::Tensor> pack_semi24_sm80_cuda(const at::Tensor& dense) {
  constexpr const char* op = "sparseprune::pack_semi24_sm80";
  check_cuda_half(dense, dense, op, "dense_masked");
  TORCH_CHECK(dense.dim() == 2, op, ": expected a 2-D [N, K] weight, got ", dense.sizes());
  const c10::cuda::CUDAGuard guard(dense.device());
  const int64_t N = dense.size(0), K = dense.size(1);
  TORCH_CHECK(K % 4 == 0, op, ": K=", K, " must be a multiple of 4 for 2:4 packing");
  const int64_t MT = (N + 15) / 16, KS = (K + 31) / 32;
  auto w = dense.contiguous();
  auto values = at::empty({MT, KS, 32, 8}, dense.options());
  auto meta = at::zeros({MT, KS, 16}, dense.options().dtype(at::kInt));
  auto bad = at::zeros({1}, dense.options().dtype(at::kInt));
  if (MT * KS > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream(dense.get_device()).stream();
    auto* mp = reinterpret_cast<uint32_t*>(meta.data_ptr<int32_t>());
    const cudaError_t err =
        dense.scalar_type() == at::kHalf
            ? launch_pack_semi24_sm80<__half>(w.data_ptr(), N, K, values.data_ptr(), mp, bad.data_ptr<int>(), stream)
            : launch_pack_semi24_sm80<__nv_bfloat16>(w.data_ptr(), N, K, values.data_ptr(), mp, bad.data_ptr<int>(),
                                                      stream);
    TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
    // packing is offline (module prepare), so a sync to report a bad weight is fine
    TORCH_CHECK(bad.item<int>() == 0, op, ": weight is not 2:4: some group of 4 inputs keeps more than 2 nonzeros");
  }
  return {values, meta};
}

}  // namespace sparseprune::cuda

TORCH_LIBRARY_IMPL(sparseprune, CUDA, m) {
  m.impl("cuda_semi24_linear", &sparseprune::cuda::cuda_semi24_linear);
  m.impl("pack_semi24_sm80", &sparseprune::cuda::pack_semi24_sm80_cuda);
}
