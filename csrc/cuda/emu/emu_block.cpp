// Emulator entry points for the block-sparse kernels: csrc/cuda/bsr_sm80.cuh and hybrid_sm80.cuh compiled unchanged
// as host C++, driven by the same plan_bsr / plan_hybrid and launch_*_sm80 the .cu files call.
#include "../hybrid_sm80.cuh"  // includes bsr_sm80.cuh
#include "emu_host.h"

using namespace sparseprune::cuda;

namespace {
// The fields BsrArgs and HybridArgs share.
template <typename Args>
Args block_args(sp_emu::Buffers& bufs, const sp_emu_buf& x, int64_t ldx, const sp_emu_buf& values,
                const sp_emu_buf& crow, const sp_emu_buf& col, int64_t B, int64_t N, int64_t K, int64_t nnzb,
                int64_t bh, int64_t bw, const sp_emu_buf& bias, const sp_emu_buf& y) {
  auto a = sp_emu::common_args<Args>(bufs, x, ldx, values, bias, y, B, N, K);
  a.crow = static_cast<const int32_t*>(bufs.in(crow));
  a.col = static_cast<const int32_t*>(bufs.in(col));
  a.bh = int(bh);
  a.bw = int(bw);
  a.nnzb = int(nnzb);
  return a;
}
}  // namespace

extern "C" int sp_emu_bsr_linear(int dtype, const sp_emu_device* dev, sp_emu_buf x, int64_t B, int64_t K,
                                 int64_t ldx, sp_emu_buf values, sp_emu_buf crow, sp_emu_buf col, int64_t nnzb,
                                 int64_t bh, int64_t bw, int64_t N, sp_emu_buf bias, sp_emu_buf y, int plan_only,
                                 sp_emu_plan* plan_out, char* err, int errlen) {
  try {
    sp_emu::set_device(*dev);
    sp_emu::reset_ctas_run();
    auto fill = [&](sp_emu::Buffers& bufs) {
      return block_args<BsrArgs>(bufs, x, ldx, values, crow, col, B, N, K, nnzb, bh, bw, bias, y);
    };
    const LaunchPlan plan = plan_bsr(B, N, bh, bw, nnzb, sp_emu::limits());
    auto launch = [&](const BsrArgs& a, float* ws) {
      return dtype == SP_EMU_F16 ? launch_bsr_sm80<__half>(a, plan, ws, dev->num_sms, nullptr)
                                 : launch_bsr_sm80<__nv_bfloat16>(a, plan, ws, dev->num_sms, nullptr);
    };
    return sp_emu::run_linear<BsrArgs>(dev, B, N, plan, fill, bsr_args_error, launch, y, plan_only, plan_out, err,
                                       errlen);
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}

extern "C" int sp_emu_hybrid_linear(int dtype, const sp_emu_device* dev, sp_emu_buf x, int64_t B, int64_t K,
                                    int64_t ldx, sp_emu_buf values, sp_emu_buf meta, sp_emu_buf crow, sp_emu_buf col,
                                    int64_t nnzb, int64_t bh, int64_t bw, int64_t N, sp_emu_buf bias, sp_emu_buf y,
                                    int plan_only, sp_emu_plan* plan_out, char* err, int errlen) {
  try {
    sp_emu::set_device(*dev);
    sp_emu::reset_ctas_run();
    auto fill = [&](sp_emu::Buffers& bufs) {
      HybridArgs a = block_args<HybridArgs>(bufs, x, ldx, values, crow, col, B, N, K, nnzb, bh, bw, bias, y);
      a.meta = static_cast<const uint32_t*>(bufs.in(meta));
      return a;
    };
    const LaunchPlan plan = plan_hybrid(B, N, bh, bw, nnzb, sp_emu::limits());
    auto launch = [&](const HybridArgs& a, float* ws) {
      return dtype == SP_EMU_F16 ? launch_hybrid_sm80<__half>(a, plan, ws, dev->num_sms, nullptr)
                                 : launch_hybrid_sm80<__nv_bfloat16>(a, plan, ws, dev->num_sms, nullptr);
    };
    return sp_emu::run_linear<HybridArgs>(dev, B, N, plan, fill, hybrid_args_error, launch, y, plan_only, plan_out,
                                          err, errlen);
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}
