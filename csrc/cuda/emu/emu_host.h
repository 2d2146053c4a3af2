// Emulator internals shared by its translation units (not seen by the kernels): the emulated device, guarded
// allocations for kernel arguments, and error reporting.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../launch_plan.cuh"
#include "emu_api.h"

namespace sp_emu {

// The device the planners and the launch checks see, and the fiber schedule (set per API call).
void set_device(const sp_emu_device& d);
const sp_emu_device& device();

// Message of the last failed launch (kernel, block, thread, what went wrong), cleared when taken.
std::string take_error_message();
void set_error_message(const std::string& m);
// CTAs executed since the last reset (tests check the planned grid really ran).
int64_t ctas_run();
void reset_ctas_run();

// A kernel argument in its own mapping between two inaccessible guard pages. Placement 0 puts the data's end
// against the back guard page (reads or writes past the end fault; the few bytes of alignment slack are
// canaries), placement 1 puts its start against the front guard page. The address range is registered, so
// cp.async and atomics can check they stay inside a tensor, and a fault is reported with the tensor's name.
class Guarded {
 public:
  Guarded(int64_t bytes, int64_t align, int64_t misalign, const std::string& name, int placement);
  ~Guarded();
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  void* data() const { return data_; }
  int64_t bytes() const { return bytes_; }
  const std::string& name() const { return name_; }
  // Canary bytes around the data untouched? Else describes the first overwritten one.
  std::string check_canaries() const;

 private:
  char* map_ = nullptr;
  size_t map_bytes_ = 0;
  char* usable_ = nullptr;  // first byte after the front guard page
  size_t usable_bytes_ = 0;
  char* data_ = nullptr;
  int64_t bytes_ = 0;
  std::string name_;
};

// The guarded copies of one API call's buffers.
class Buffers {
 public:
  // Copies b into a guarded allocation (null data pointer when b.bytes == 0 and b.ptr is null).
  void* in(const sp_emu_buf& b);
  // A guarded allocation of n bytes filled with `fill` (poison), for outputs and workspaces.
  void* scratch(int64_t bytes, const char* name, unsigned char fill, int64_t align = 256);
  // Copies the guarded bytes at p back into b.ptr.
  void out(const void* p, const sp_emu_buf& b) const;
  // First canary violation of any buffer, or "".
  std::string check_canaries() const;

 private:
  std::vector<std::unique_ptr<Guarded>> all_;
};

// Helpers of the extern "C" entry points.
inline int report(char* err, int errlen, const std::string& msg) {
  if (err && errlen > 0) {
    const size_t n = std::min(msg.size(), size_t(errlen - 1));
    msg.copy(err, n);
    err[n] = 0;
  }
  return 1;
}
inline sparseprune::cuda::DeviceLimits limits() { return {device().num_sms, device().smem_optin}; }
inline void fill_plan(sp_emu_plan* out, const sparseprune::cuda::LaunchPlan& p) {
  if (!out) return;
  *out = sp_emu_plan{};
  out->config = p.config;
  out->bm = p.tile.bm;
  out->bn = p.tile.bn;
  out->warps_m = p.tile.warps_m;
  out->warps_n = p.tile.warps_n;
  out->stages = p.tile.stages;
  out->threads = p.tile.threads();
  out->smem_bytes = p.tile.smem_bytes;
  out->mblocks = p.mblocks;
  out->nblocks = p.nblocks;
  out->grid_x = p.grid_x();
  out->splits = p.splits;
  out->units_per_split = p.units_per_split;
  out->workspace_floats = p.workspace_floats;
}
// After a launch: the CUDA error (with the emulator's diagnosis) or a canary violation, else "".
std::string launch_outcome(int err_code, const Buffers& bufs);

// The fields every kernel's argument struct shares (set_common_args in torch_cuda_utils.h), from guarded copies.
template <typename Args>
Args common_args(Buffers& bufs, const sp_emu_buf& x, int64_t ldx, const sp_emu_buf& values, const sp_emu_buf& bias,
                 const sp_emu_buf& y, int64_t B, int64_t N, int64_t K) {
  Args a{};
  a.values = bufs.in(values);
  a.x = bufs.in(x);
  a.ldx = ldx;
  a.y = bufs.in(y);
  a.ldy = N;
  a.bias = bufs.in(bias);
  a.B = int(B);
  a.N = int(N);
  a.K = int(K);
  return a;
}

// The body of every *_linear entry point, in the .cu's order: plan (on the emulated device), nothing to launch for
// an empty output (LinearIO::empty), refuse what the planner refuses, fill the kernel arguments from guarded copies
// (fill(bufs) -> Args with y inside), refuse misaligned operands (args_error), allocate the split-K workspace
// poisoned, launch(args, plan, workspace), then copy y back.
template <typename Args, typename Fill, typename ArgsError, typename Launch>
int run_linear(const sp_emu_device* dev, int64_t B, int64_t N, const sparseprune::cuda::LaunchPlan& plan, Fill&& fill,
               ArgsError&& args_error, Launch&& launch, const sp_emu_buf& y, int plan_only, sp_emu_plan* plan_out,
               char* err, int errlen) {
  fill_plan(plan_out, plan);
  if (B == 0 || N == 0) return 0;
  if (plan.error) return report(err, errlen, plan.error);
  if (plan_only) return 0;
  Buffers bufs;
  const Args a = fill(bufs);
  if (const char* why = args_error(a)) return report(err, errlen, why);
  float* ws = plan.workspace_floats
                  ? static_cast<float*>(bufs.scratch(plan.workspace_floats * 4, "split-K workspace", 0xFF))
                  : nullptr;
  const int e = launch(a, ws);
  if (plan_out) plan_out->ctas_run = ctas_run();
  if (auto m = launch_outcome(e, bufs); !m.empty()) return report(err, errlen, m);
  bufs.out(a.y, y);
  return 0;
}

}  // namespace sp_emu
