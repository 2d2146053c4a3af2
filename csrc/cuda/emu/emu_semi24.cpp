// Emulator entry points for the Semi24 kernels: csrc/cuda/semi24_sm80.cuh compiled unchanged as host C++, driven
// by the same plan_semi24 / launch_semi24_sm80 the .cu calls (and the .cu's early return for empty inputs).
#include "../semi24_sm80.cuh"
#include "emu_host.h"

using namespace sparseprune::cuda;

extern "C" int sp_emu_semi24_linear(int dtype, const sp_emu_device* dev, sp_emu_buf x, int64_t B, int64_t K,
                                    int64_t ldx, sp_emu_buf values, sp_emu_buf meta, int64_t N, sp_emu_buf bias,
                                    sp_emu_buf y, int plan_only, sp_emu_plan* plan_out, char* err, int errlen) {
  try {
    sp_emu::set_device(*dev);
    sp_emu::reset_ctas_run();
    auto fill = [&](sp_emu::Buffers& bufs) {
      auto a = sp_emu::common_args<Semi24Args>(bufs, x, ldx, values, bias, y, B, N, K);
      a.meta = static_cast<const uint32_t*>(bufs.in(meta));
      a.MT = int((N + kTileM - 1) / kTileM);
      a.KS = int((K + kTileK - 1) / kTileK);
      return a;
    };
    const LaunchPlan plan = plan_semi24(B, N, K, sp_emu::limits());
    auto launch = [&](const Semi24Args& a, float* ws) {
      return dtype == SP_EMU_F16 ? launch_semi24_sm80<__half>(a, plan, ws, dev->num_sms, nullptr)
                                 : launch_semi24_sm80<__nv_bfloat16>(a, plan, ws, dev->num_sms, nullptr);
    };
    return sp_emu::run_linear<Semi24Args>(dev, B, N, plan, fill, semi24_args_error, launch, y, plan_only, plan_out,
                                          err, errlen);
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}

extern "C" int sp_emu_pack_semi24(int dtype, const sp_emu_device* dev, sp_emu_buf w, int64_t N, int64_t K,
                                  sp_emu_buf values, sp_emu_buf meta, int* bad, char* err, int errlen) {
  try {
    sp_emu::set_device(*dev);
    sp_emu::Buffers bufs;
    const void* gw = bufs.in(w);
    void* gv = bufs.in(values);
    auto* gm = static_cast<uint32_t*>(bufs.in(meta));
    int* gbad = static_cast<int*>(bufs.scratch(sizeof(int), "bad flag", 0, 4));
    const cudaError_t e = dtype == SP_EMU_F16 ? launch_pack_semi24_sm80<__half>(gw, N, K, gv, gm, gbad, nullptr)
                                             : launch_pack_semi24_sm80<__nv_bfloat16>(gw, N, K, gv, gm, gbad, nullptr);
    if (auto m = sp_emu::launch_outcome(e, bufs); !m.empty()) return sp_emu::report(err, errlen, m);
    bufs.out(gv, values);
    bufs.out(gm, meta);
    *bad = *gbad;
    return 0;
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}
