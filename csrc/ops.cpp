// The one place every sparseprune op is declared. Backends register implementations in their own
// files (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(sparseprune, CPU, m), csrc/cuda/*.cu for CUDA);
// fake (meta) kernels for torch.compile are registered from Python beside each op's wrapper.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(sparseprune, m) {
  // y = x @ W^T + bias with W stored as Semi24 (2:4): values (N, K/2), meta (N, ceil(K/8)) uint8.
  m.def("semi24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
  // W stored as BSR: values (nnzb, bh, bw), crow (N/bh + 1) int32, col (nnzb) int32.
  m.def("bsr_linear(Tensor x, Tensor values, Tensor crow, Tensor col, int in_features, Tensor? bias) -> Tensor");
  // BSR whose blocks are Semi24: values (nnzb, bh, bw/2), meta (nnzb, bh, bw/8) uint8.
  m.def(
      "hybrid_linear(Tensor x, Tensor values, Tensor meta, Tensor crow, Tensor col, int in_features, "
      "Tensor? bias) -> Tensor");
  // CUDA backend (csrc/cuda): 2:4 weight re-packed into mma.sp fragment order (sparseprune/cuda_layout.py):
  // values [ceil(N/16), ceil(K/32), 32, 8], meta [ceil(N/16), ceil(K/32), 16] int32.
  m.def("pack_semi24_sm80(Tensor dense_masked) -> (Tensor, Tensor)");
  m.def(
      "cuda_semi24_linear(Tensor x, Tensor values, Tensor meta, int in_features, int out_features, Tensor? bias) "
      "-> Tensor");
  // BSR in the canonical layout, run on dense tensor cores over the stored blocks only.
  m.def("cuda_bsr_linear(Tensor x, Tensor values, Tensor crow, Tensor col, int in_features, Tensor? bias) -> Tensor");
  m.def("cuda_hybrid_linear(Tensor x, Tensor values, Tensor meta, Tensor crow, Tensor col, int in_features, Tensor? bias) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "sparseprune native extension: op registrations and build information";
  mod.def("build_info", []() {
    py::dict d;
    d["backends"] = std::string(SP_BACKENDS);
    d["cuda_archs"] = std::string(SP_CUDA_ARCHS);
    d["torch_version"] = std::string(SP_TORCH_VERSION);
    d["cpu_isas"] = std::string(SP_CPU_ISAS);
    d["openmp"] = true;
    return d;
  }, "Which backends, CUDA architectures and CPU ISA levels this build contains.");
  mod.def("cpu_isa", []() { return std::string(sparseprune::cpu::active_isa_name()); },
          "The CPU ISA level the dispatcher picked at run time (SPARSEPRUNE_CPU_ISA overrides).");
  mod.def("cpu_amx", []() { return std::string(sparseprune::cpu::amx_status()); },
          "Whether the amx level can run here, and if not why (CPU, OS tile-state permission, build).");
  mod.def("_amx_emulated_dots", []() { return sparseprune::cpu::amx_emulated_dot_count(); },
          "Test aid: TDPBF16PS instructions run on the emulated tiles (SPARSEPRUNE_CPU_ISA=amx_emulated) so far.");
}
