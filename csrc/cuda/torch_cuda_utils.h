// Tensor checks shared by the torch-facing CUDA files (no ATen/cuda/CUDAContext.h: it pulls cusparse.h).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#include "cuda/launch_plan.cuh"

namespace sparseprune::cuda {

// Properties of a device, queried once per device and shared by every thread (ops run concurrently from several
// host threads; PerDeviceCache fills each entry exactly once).
inline const cudaDeviceProp& device_props(int device) {
  static PerDeviceCache<cudaDeviceProp> cache;
  TORCH_CHECK(device >= 0 && device < cache.max_devices(), "sparseprune: CUDA device index ", device, " out of range");
  return cache.get(device, [](int d, cudaDeviceProp& p) { C10_CUDA_CHECK(cudaGetDeviceProperties(&p, d)); });
}

// What the launch planners need: SM count and the opt-in shared memory per block, which decides the tile config
// (sm_86/sm_89 allow 101,376 B, less than the largest Semi24 config uses).
inline DeviceLimits device_limits(int device) {
  const auto& p = device_props(device);
  return DeviceLimits{p.multiProcessorCount, int(p.sharedMemPerBlockOptin)};
}

// The kernels use cp.async, ldmatrix and mma.sp: compute capability 8.0 or newer.

inline void check_sm80(const at::Tensor& x, const char* op) {
  const auto& p = device_props(x.get_device());
  TORCH_CHECK(p.major >= 8, op, ": needs a GPU with compute capability >= 8.0 (sparse tensor cores, cp.async); ",
              p.name, " is sm_", p.major, p.minor);
}

inline void check_cuda_half(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float16 or bfloat16 (tensor-core kernels), got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " does not match x dtype ", x.scalar_type());
}

// The checks every *_linear op starts with: x a CUDA tensor, x and values float16/bfloat16 of one dtype on
// x's device, and an sm_80+ GPU.
inline void check_linear_inputs(const at::Tensor& x, const at::Tensor& values, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  check_cuda_half(x, x, op, "x");
  check_cuda_half(values, x, op, "values");
  check_sm80(x, op);
}

// The BSR block index of the block ops (bsr, hybrid): crow and col contiguous int32 1-D on x's device, one
// col entry per stored block. Their contents are not read here (that would need a device sync).
inline void check_crow_col(const at::Tensor& crow, const at::Tensor& col, int64_t nnzb, const at::Tensor& x,
                           const char* op) {
  for (const auto* t : {&crow, &col})
    TORCH_CHECK(t->is_cuda() && t->device() == x.device() && t->scalar_type() == at::kInt && t->dim() == 1 &&
                    t->is_contiguous(),
                op, ": crow and col must be contiguous int32 1-D tensors on ", x.device());
  TORCH_CHECK(col.size(0) == nnzb && crow.size(0) >= 1, op, ": col must have one entry per stored block");
}

// The optional bias checked (x's device and dtype, shape [N]) and made contiguous; undefined when absent.
inline at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N, const char* op) {
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_cuda_half(*bias, x, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ", bias->sizes());
    b = bias->contiguous();
  }
  return b;
}

inline at::Tensor new_output(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  // Test aid: SPARSEPRUNE_POISON=1 fills outputs with NaN so unwritten elements fail comparisons.
  if (const char* poison = std::getenv("SPARSEPRUNE_POISON"); poison && poison[0] == '1')
    y.fill_(std::numeric_limits<float>::quiet_NaN());
  return y;
}

// x as [B, K8] with K8 = K rounded up to 8 and 16-byte aligned rows (cp.async moves 16 bytes).
inline at::Tensor x_for_cp_async(const at::Tensor& x, int64_t K) {
  auto x2 = x.reshape({-1, K}).contiguous();
  const bool aligned = K % 8 == 0 && reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 == 0;
  if (aligned) return x2;
  const int64_t K8 = (K + 7) / 8 * 8;
  auto xp = at::zeros({x2.size(0), K8}, x2.options());
  xp.narrow(1, 0, K).copy_(x2);
  return xp;
}

// What every op needs once its weight-specific checks passed: the output y [..., N] (poisoned in
// tests), x as x_for_cp_async prepared it, and the checked bias (undefined when absent).
struct LinearIO {
  at::Tensor y, x2, bias;
  bool empty() const { return x2.size(0) == 0 || y.size(-1) == 0; }  // nothing to launch: y is the answer
};

inline LinearIO prepare_io(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t N, int64_t K,
                           const char* op) {
  LinearIO io;
  io.y = new_output(x, N);
  io.x2 = x_for_cp_async(x, K);
  TORCH_CHECK(io.x2.size(0) < (int64_t(1) << 31), op, ": batch too large");  // the kernels index tokens in int
  if (!io.empty()) io.bias = checked_bias(bias, x, N, op);
  return io;
}

// fp32 split-K partials for plan (on x's device), only when the plan splits K; undefined otherwise. The caching
// allocator makes this cheap, and private to a captured CUDA graph.
inline at::Tensor splitk_workspace(const LaunchPlan& plan, const at::Tensor& x, const char* op) {
  TORCH_CHECK(!plan.error, op, ": ", plan.error);
  return plan.workspace_floats ? at::empty({plan.workspace_floats}, x.options().dtype(at::kFloat)) : at::Tensor();
}

// Fills the fields the kernels' argument structs share: weight values, x2 [B, ldx], y [B, N], the
// bias (may be absent) and B, N, K.
template <typename Args>
inline void set_common_args(Args& a, const at::Tensor& values, const LinearIO& io, int64_t N, int64_t K) {
  a.values = values.data_ptr();
  a.x = io.x2.data_ptr();
  a.ldx = io.x2.size(1);
  a.y = io.y.data_ptr();
  a.ldy = N;
  a.bias = io.bias.defined() ? io.bias.data_ptr() : nullptr;
  a.B = int(io.x2.size(0));
  a.N = int(N);
  a.K = int(K);
}

}  // namespace sparseprune::cuda
