// CUDA implementation of sparseprune::cuda_hybrid_linear (tensor checks + launch; kernel in hybrid_sm80.cuh).
#include <torch/library.h>

#include "cuda/hybrid_sm80.cuh"
#include "cuda/torch_cuda_utils.h"

namespace sparseprune::cuda {

at::Tensor cuda_hybrid_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                              const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparseprune::cuda_hybrid_linear";
  check_linear_inputs(x, values, op);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(values.dim() == 5 && values.size(3) == 32 && values.size(4) == 8 && values.is_contiguous(), op,
              ": values must be contiguous [nnzb, bh/16, bw/32, 32, 8] (pack_hybrid_sm80), got ", values.sizes());
  const int64_t nnzb = values.size(0), bh = values.size(1) * 16, bw = values.size(2) * 32, K = in_features;
  TORCH_CHECK(meta.is_cuda() && meta.device() == x.device() && meta.scalar_type() == at::kInt && meta.dim() == 4 &&
                  meta.size(0) == nnzb && meta.size(1) == bh / 16 && meta.size(2) == bw / 32 && meta.size(3) == 16 &&
                  meta.is_contiguous(),
              op, ": meta must be contiguous int32 [", nnzb, ", ", bh / 16, ", ", bw / 32, ", 16] on ", x.device());
  TORCH_CHECK(bh > 0 && bw > 0, op, ": empty block shape");
  TORCH_CHECK(x.size(-1) == K && K % bw == 0, op, ": x has ", x.size(-1), " features, weight expects ", K,
              " (a multiple of the block width ", bw, ")");
  check_crow_col(crow, col, nnzb, x, op);
  TORCH_CHECK(nnzb < (int64_t(1) << 31) && K < (int64_t(1) << 31), op, ": weight too large for 32-bit indices");
  // crow/col contents are validated on the host when the weight is built (HybridWeight.validate); the
  // kernel clamps crow to [0, nnzb] and skips blocks whose col is outside [0, K/bw) instead of re-checking
  // here, which would need a device sync per call and break CUDA graph capture.
  const int64_t N = (crow.size(0) - 1) * bh;
  TORCH_CHECK(N < (int64_t(1) << 31), op, ": out_features too large");
  const LinearIO io = prepare_io(x, bias, N, K, op);
  if (io.empty()) return io.y;
  HybridArgs a{};
  set_common_args(a, values, io, N, K);
  a.meta = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  a.crow = crow.data_ptr<int32_t>();
  a.col = col.data_ptr<int32_t>();
  a.bh = int(bh);
  a.bw = int(bw);
  a.nnzb = int(nnzb);
  if (const char* why = hybrid_args_error(a)) TORCH_CHECK(false, op, ": ", why);
  const DeviceLimits dev = device_limits(x.get_device());
  const LaunchPlan plan = plan_hybrid(a.B, N, bh, bw, nnzb, dev);
  const at::Tensor ws = splitk_workspace(plan, x, op);
  float* wsp = ws.defined() ? ws.data_ptr<float>() : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const cudaError_t err = x.scalar_type() == at::kHalf
                              ? launch_hybrid_sm80<__half>(a, plan, wsp, dev.num_sms, stream)
                              : launch_hybrid_sm80<__nv_bfloat16>(a, plan, wsp, dev.num_sms, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return io.y;
}

}  // namespace sparseprune::cuda

TORCH_LIBRARY_IMPL(sparseprune, CUDA, m) { m.impl("cuda_hybrid_linear", &sparseprune::cuda::cuda_hybrid_linear); }
