// CPU implementation of sparseprune::hybrid_linear (checks + launch; the kernel is in kernels_impl.h).
#include <torch/library.h>

#include "cpu/torch_utils.h"

namespace sparseprune::cpu {

at::Tensor hybrid_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparseprune::hybrid_linear";
  check_same(x, values, op, "values");
  TORCH_CHECK(values.dim() == 3, op, ": values must be [nnzb, bh, bw/2], got ", values.sizes());
  const int64_t nnzb = values.size(0), bh = values.size(1), bw = values.size(2) * 2;
  TORCH_CHECK(bh > 0 && bw > 0 && bw % 8 == 0, op, ": block width ", bw, " must be a positive multiple of 8");
  TORCH_CHECK(in_features % bw == 0, op, ": in_features=", in_features, " must be a multiple of the block width ", bw);
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.device().is_cpu(), op, ": meta must be a uint8 CPU tensor");
  TORCH_CHECK(meta.dim() == 3 && meta.size(0) == nnzb && meta.size(1) == bh && meta.size(2) == bw / 8, op,
              ": meta must be [", nnzb, ", ", bh, ", ", bw / 8, "], got ", meta.sizes());
  check_bsr_structure(crow, col, nnzb, in_features / bw, op);
  const int64_t N = (crow.size(0) - 1) * bh;
  auto r = prepare_linear(x, N, in_features, bias, op);
  if (r.prob.B == 0) return r.y;
  auto v = values.contiguous();
  auto m = meta.contiguous();
  hybrid_linear(r.prob, v.data_ptr(), m.data_ptr<uint8_t>(), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bh,
                bw);
  return r.y;
}

}  // namespace sparseprune::cpu

TORCH_LIBRARY_IMPL(sparseprune, CPU, m) { m.impl("hybrid_linear", &sparseprune::cpu::hybrid_linear_cpu); }
