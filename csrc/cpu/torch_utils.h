// Tensor checks shared by the CPU op files. Python validates formats before any kernel runs;
// these checks are the second line: C++ never trusts an index it did not check itself.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>

#include "cpu/kernels.h"

namespace sparseprune::cpu {

inline DType to_kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (CPU kernels take float32, bfloat16, float16)");
  }
}

inline void check_same(const at::Tensor& x, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " does not match x dtype ", x.scalar_type());
}

// Flattens x to [B, K] (contiguous), checks bias, allocates y [..., N], and fills the problem.
struct PreparedLinear {
  at::Tensor x2d, y, bias;
  LinearProblem prob;
};

inline PreparedLinear prepare_linear(const at::Tensor& x, int64_t N, int64_t K, const std::optional<at::Tensor>& bias,
                                     const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features in its last dimension, the weight expects ", K);
  PreparedLinear r;
  r.prob.dtype = to_kernel_dtype(x, op);
  r.x2d = x.reshape({-1, K}).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  r.y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  // Test aid: SPARSEPRUNE_POISON=1 fills the output with NaN first, so any element a kernel
  // forgets to write shows up in the comparison against the reference.
  if (const char* poison = std::getenv("SPARSEPRUNE_POISON"); poison && poison[0] == '1')
    r.y.fill_(std::numeric_limits<float>::quiet_NaN());
  if (bias.has_value() && bias->defined()) {
    check_same(x, *bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ", bias->sizes());
    r.bias = bias->contiguous();
  }
  r.prob.x = r.x2d.data_ptr();
  r.prob.y = r.y.data_ptr();
  r.prob.bias = r.bias.defined() ? r.bias.data_ptr() : nullptr;
  r.prob.B = r.x2d.size(0);
  r.prob.N = N;
  r.prob.K = K;
  return r;
}

// crow: [n_block_rows + 1] int32 from 0 to nnzb, non-decreasing; col: [nnzb] int32 in [0, n_block_cols).
inline void check_bsr_structure(const at::Tensor& crow, const at::Tensor& col, int64_t nnzb, int64_t n_block_cols,
                                const char* op) {
  TORCH_CHECK(crow.scalar_type() == at::kInt && col.scalar_type() == at::kInt, op,
              ": crow and col must be int32, got ", crow.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK(crow.dim() == 1 && crow.size(0) >= 1 && crow.is_contiguous(), op, ": crow must be a contiguous 1-D tensor");
  TORCH_CHECK(col.dim() == 1 && col.size(0) == nnzb && col.is_contiguous(), op, ": col must be contiguous with ",
              nnzb, " entries (one per stored block), got ", col.sizes());
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int64_t rows = crow.size(0) - 1;
  TORCH_CHECK(cr[0] == 0 && cr[rows] == nnzb, op, ": crow must start at 0 and end at nnzb=", nnzb, ", got ", cr[0],
              " and ", cr[rows]);
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(cr[i] <= cr[i + 1], op, ": crow decreases at block row ", i);
  const int32_t* c = col.data_ptr<int32_t>();
  for (int64_t i = 0; i < nnzb; ++i)
    TORCH_CHECK(c[i] >= 0 && c[i] < n_block_cols, op, ": col[", i, "]=", c[i], " is outside [0, ", n_block_cols, ")");
}

}  // namespace sparseprune::cpu
