// CPU implementation of sparseprune::semi24_linear (checks + launch; the kernel is in kernels_impl.h).
#include <torch/library.h>

#include "cpu/torch_utils.h"

namespace sparseprune::cpu {

at::Tensor semi24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparseprune::semi24_linear";
  check_same(x, values, op, "values");
  TORCH_CHECK(values.dim() == 2, op, ": values must be [N, K/2], got ", values.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.device().is_cpu(), op, ": meta must be a uint8 CPU tensor");
  const int64_t N = values.size(0), K = values.size(1) * 2;
  TORCH_CHECK(K % 4 == 0, op, ": K=", K, " must be a multiple of 4");
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 7) / 8, op, ": meta must be [", N, ", ",
              (K + 7) / 8, "], got ", meta.sizes());
  auto r = prepare_linear(x, N, K, bias, op);
  if (r.prob.B == 0) return r.y;
  auto v = values.contiguous();
  auto m = meta.contiguous();
  semi24_linear(r.prob, v.data_ptr(), m.data_ptr<uint8_t>(), m.size(1));
  return r.y;
}

}  // namespace sparseprune::cpu

TORCH_LIBRARY_IMPL(sparseprune, CPU, m) { m.impl("semi24_linear", &sparseprune::cpu::semi24_linear_cpu); }
