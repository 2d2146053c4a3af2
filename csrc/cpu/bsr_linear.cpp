// CPU implementation of sparseprune::bsr_linear (checks + launch; the kernel is in kernels_impl.h).
#include <torch/library.h>

#include "cpu/torch_utils.h"

namespace sparseprune::cpu {

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                          int64_t in_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparseprune::bsr_linear";
  check_same(x, values, op, "values");
  TORCH_CHECK(values.dim() == 3, op, ": values must be [nnzb, bh, bw], got ", values.sizes());
  const int64_t nnzb = values.size(0), bh = values.size(1), bw = values.size(2);
  TORCH_CHECK(bh > 0 && bw > 0 && in_features % bw == 0, op, ": in_features=", in_features,
              " must be a multiple of the block width ", bw);
  check_bsr_structure(crow, col, nnzb, in_features / bw, op);
  const int64_t N = (crow.size(0) - 1) * bh;
  auto r = prepare_linear(x, N, in_features, bias, op);
  if (r.prob.B == 0) return r.y;
  auto v = values.contiguous();
  bsr_linear(r.prob, v.data_ptr(), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bh, bw);
  return r.y;
}

}  // namespace sparseprune::cpu

TORCH_LIBRARY_IMPL(sparseprune, CPU, m) { m.impl("bsr_linear", &sparseprune::cpu::bsr_linear_cpu); }
