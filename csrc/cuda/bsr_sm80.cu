// CUDA implementation of sparseprune::cuda_bsr_linear (tensor checks + launch; kernel in bsr_sm80.cuh).
#include <torch/library.h>

#include "cuda/bsr_sm80.cuh"
#include "cuda/torch_cuda_utils.h"

namespace sparseprune::cuda {

at::Tensor cuda_bsr_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, int64_t in_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparseprune::cuda_bsr_linear";
  check_linear_inputs(x, values, op);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(values.dim() == 3 && values.is_contiguous(), op, ": values must be contiguous [nnzb, bh, bw]");
  const int64_t nnzb = values.size(0), bh = values.size(1), bw = values.size(2), K = in_features;
  TORCH_CHECK(bh % 16 == 0 && bw % 32 == 0, op, ": tensor-core BSR needs bh % 16 == 0 and bw % 32 == 0, got ", bh,
              "x", bw, " blocks");
  TORCH_CHECK(x.size(-1) == K && K % bw == 0, op, ": x has ", x.size(-1), " features, weight expects ", K);
  check_crow_col(crow, col, nnzb, x, op);
  TORCH_CHECK(nnzb < (int64_t(1) << 31) && K < (int64_t(1) << 31), op, ": weight too large for 32-bit indices");
  // crow/col contents are validated on the host when the weight is built (BlockSparseWeight.validate);
  // re-checking them here would need a device sync per call and break CUDA graph capture, so the kernel
  // clamps crow to [0, nnzb] and skips blocks whose col is outside [0, K/bw) instead (bsr_sm80.cuh).
  const int64_t N = (crow.size(0) - 1) * bh;
  TORCH_CHECK(N < (int64_t(1) << 31), op, ": out_features too large");  // the kernel indexes rows in int
  const LinearIO io = prepare_io(x, bias, N, K, op);
  if (io.empty()) return io.y;
  BsrArgs a{};
  set_common_args(a, values, io, N, K);
  a.crow = crow.data_ptr<int32_t>();
  a.col = col.data_ptr<int32_t>();
  a.bh = int(bh);
  a.bw = int(bw);
  a.nnzb = int(nnzb);
  if (const char* why = bsr_args_error(a)) TORCH_CHECK(false, op, ": ", why);
  const DeviceLimits dev = device_limits(x.get_device());
  const LaunchPlan plan = plan_bsr(a.B, N, bh, bw, nnzb, dev);
  const at::Tensor ws = splitk_workspace(plan, x, op);
  float* wsp = ws.defined() ? ws.data_ptr<float>() : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const cudaError_t err = x.scalar_type() == at::kHalf
                              ? launch_bsr_sm80<__half>(a, plan, wsp, dev.num_sms, stream)
                              : launch_bsr_sm80<__nv_bfloat16>(a, plan, wsp, dev.num_sms, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return io.y;
}

}  // namespace sparseprune::cuda

TORCH_LIBRARY_IMPL(sparseprune, CUDA, m) { m.impl("cuda_bsr_linear", &sparseprune::cuda::cuda_bsr_linear); }
