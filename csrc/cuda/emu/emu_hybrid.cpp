// Emulator entry point for the hybrid kernels: csrc/cuda/hybrid_sm80.cuh compiled unchanged as host C++, driven
// by the same plan_hybrid / launch_hybrid_sm80 the .cu calls.
#include "../hybrid_sm80.cuh"
#include "emu_host.h"

using namespace sparseprune::cuda;

extern "C" int sp_emu_hybrid_linear(int dtype, const sp_emu_device* dev, sp_emu_buf x, int64_t B, int64_t K,
                                    int64_t ldx, sp_emu_buf values, sp_emu_buf meta, sp_emu_buf crow, sp_emu_buf col,
                                    int64_t nnzb, int64_t bh, int64_t bw, int64_t N, sp_emu_buf bias, sp_emu_buf y,
                                    int plan_only, sp_emu_plan* plan_out, char* err, int errlen) {
  try {
    sp_emu::set_device(*dev);
    sp_emu::reset_ctas_run();
    const LaunchPlan plan = plan_hybrid(B, N, bh, bw, nnzb, sp_emu::limits());
    sp_emu::fill_plan(plan_out, plan);
    if (B == 0 || N == 0) return 0;  // the .cu returns the empty output without launching
    if (plan.error) return sp_emu::report(err, errlen, plan.error);
    if (plan_only) return 0;
    sp_emu::Buffers bufs;
    HybridArgs a{};
    a.values = bufs.in(values);
    a.meta = static_cast<const uint32_t*>(bufs.in(meta));
    a.crow = static_cast<const int32_t*>(bufs.in(crow));
    a.col = static_cast<const int32_t*>(bufs.in(col));
    a.x = bufs.in(x);
    a.ldx = ldx;
    a.y = bufs.in(y);
    a.ldy = N;
    a.bias = bufs.in(bias);
    a.B = int(B);
    a.N = int(N);
    a.K = int(K);
    a.bh = int(bh);
    a.bw = int(bw);
    a.nnzb = int(nnzb);
    if (const char* why = hybrid_args_error(a)) return sp_emu::report(err, errlen, why);
    float* ws = plan.workspace_floats
                    ? static_cast<float*>(bufs.scratch(plan.workspace_floats * 4, "split-K workspace", 0xFF))
                    : nullptr;
    const cudaError_t e = dtype == SP_EMU_F16 ? launch_hybrid_sm80<__half>(a, plan, ws, dev->num_sms, nullptr)
                                             : launch_hybrid_sm80<__nv_bfloat16>(a, plan, ws, dev->num_sms, nullptr);
    if (plan_out) plan_out->ctas_run = sp_emu::ctas_run();
    if (auto m = sp_emu::launch_outcome(e, bufs); !m.empty()) return sp_emu::report(err, errlen, m);
    bufs.out(a.y, y);
    return 0;
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}
