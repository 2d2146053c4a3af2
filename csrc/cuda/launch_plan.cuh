// Launch planning shared by the CUDA launchers (csrc/cuda/*.cu) and the CPU emulator (csrc/cuda/emu): which
// tile config a batch gets on a given device, how many K splits, how much split-K workspace and which grid.
// Pure host code, torch-free, so the emulated tests exercise exactly the choices a GPU would make.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>

namespace sparseprune::cuda {

// What the planner needs to know about the device (cudaDeviceProp fields).
struct DeviceLimits {
  int num_sms;     // multiProcessorCount
  int smem_optin;  // sharedMemPerBlockOptin: the most dynamic shared memory one CTA may opt in to
};

// One tile configuration of a kernel family: BM weight rows x BN tokens per CTA, a WARPS_M x WARPS_N warp
// grid, STAGES-deep cp.async pipeline, and the dynamic shared memory that takes.
struct TileConfig {
  int bm, bn, warps_m, warps_n, stages, smem_bytes;
  constexpr int threads() const { return 32 * warps_m * warps_n; }
};

// CUDA grid limits: grid.x up to 2^31 - 1, grid.y and grid.z up to 65535.
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int kMaxGridYZ = 65535;
// Split-K never asks for more fp32 partials than this (the workspace is allocated per call).
constexpr int64_t kMaxSplitWorkspaceBytes = int64_t(64) << 20;
constexpr int kMaxSplits = 16;

// The launch of one kernel family for one call. Grid: x = mblocks * nblocks CTAs (weight-row blocks vary
// fastest, so consecutive CTAs share a token tile; tokens are never on grid.y, whose limit is 65535),
// y = splits. error is set (and nothing may be launched) when no config fits the device or the grid is too big.
struct LaunchPlan {
  int config = -1;               // index into the family's config table
  TileConfig tile{};             // that config
  int64_t mblocks = 0, nblocks = 0;
  int splits = 1;                // K splits; 1 = no split-K (the output is written directly)
  int64_t units_per_split = 0;   // family-specific K work units per split (semi24: 64-wide K tiles)
  int64_t workspace_floats = 0;  // fp32 partials [splits][B][N] when splits > 1, else 0
  const char* error = nullptr;
  int64_t grid_x() const { return mblocks * nblocks; }
};

// Picks the first config in candidates[] whose shared memory fits the device's opt-in limit (sm_86/sm_89 allow
// 101,376 B per block, sm_80 166,912 B, sm_90 232,448 B).
template <size_t N, size_t M>
inline int pick_config(const std::array<TileConfig, N>& table, const int (&candidates)[M], const DeviceLimits& d) {
  for (int c : candidates)
    if (table[c].smem_bytes <= d.smem_optin) return c;
  return -1;
}

// How many ways to split K. Only when the grid leaves SMs idle (ctas < num_sms): aim at about two CTAs per
// SM, keep at least min_units K work units per split so each split's pipeline fills, at most kMaxSplits, and
// at most kMaxSplitWorkspaceBytes of partials. Returns the split count normalised so none is empty:
// per = ceil(units / splits), splits = ceil(units / per).
inline int choose_splits(int64_t ctas, int64_t units, int num_sms, int64_t min_units, int64_t floats_per_split,
                         int64_t& per_split) {
  int64_t s = 1;
  if (ctas > 0 && ctas < num_sms && units >= 2 * min_units) {
    s = std::min<int64_t>({(2 * int64_t(num_sms) + ctas - 1) / ctas, units / min_units, kMaxSplits});
    while (s > 1 && s * floats_per_split * 4 > kMaxSplitWorkspaceBytes) --s;
  }
  per_split = units > 0 ? (units + s - 1) / s : 0;
  if (per_split > 0) s = (units + per_split - 1) / per_split;
  return int(std::max<int64_t>(s, 1));
}

// Fills the grid fields and checks them against the CUDA limits.
inline void finish_plan(LaunchPlan& p, int64_t mblocks, int64_t nblocks, int64_t B, int64_t N) {
  p.mblocks = mblocks;
  p.nblocks = nblocks;
  p.workspace_floats = p.splits > 1 ? int64_t(p.splits) * B * N : 0;
  if (mblocks * nblocks > kMaxGridX) p.error = "too many CTAs for one launch (grid.x > 2^31 - 1): batch too large";
  if (p.splits > kMaxGridYZ) p.error = "too many K splits";
}

// Per-device cache of a device property struct, filled once per device even when several host threads ask at
// once (std::call_once): a plain "filled" flag would let two threads fill it concurrently and a third read it
// half-written. query(device, props) fills props and may throw; a throw leaves the entry unfilled for a retry.
template <typename Props, int kMaxDevices = 64>
class PerDeviceCache {
 public:
  template <typename Query>
  const Props& get(int device, Query&& query) {
    std::call_once(once_[device], [&] { query(device, props_[device]); });
    return props_[device];
  }
  static constexpr int max_devices() { return kMaxDevices; }

 private:
  std::array<std::once_flag, kMaxDevices> once_{};
  std::array<Props, kMaxDevices> props_{};
};

}  // namespace sparseprune::cuda
