// 2:4 GEMM on sparse tensor cores (mma.sp m16n8k32, sm_80+), torch-free.
//
// Computes Y^T = W X^T: the sparse weight is operand A (16 rows per MMA) and tokens are the MMA's N
// (8 per MMA), so a batch of 1 pads to 8 tokens, not 32. W comes pre-packed in fragment order
// (semi24_sm80_layout.cuh): every lane fetches its A fragment with one 16-byte shared load. x tiles go
// through cp.async into XOR-swizzled shared memory and are read with ldmatrix (no bank conflicts).
// STAGES-deep cp.async pipeline over 64-wide K tiles (two m16n8k32 steps). Split-K over grid.y writes fp32
// partials that splitk_reduce_kernel sums, whenever the grid alone would leave SMs idle (plan_semi24). Without
// split-K the output tile is staged through shared memory and stored as 16-byte rows (store_acc_staged).
// grid.x = M blocks x token blocks (M fastest), so the batch is limited by grid.x (2^31 - 1), not grid.y.
#pragma once
#include <algorithm>

#include "mma_utils.cuh"
#include "semi24_sm80_layout.cuh"

namespace sparseprune::cuda {

struct Semi24Args {
  const void* values;    // [MT][KS][32][8] T
  const uint32_t* meta;  // [MT][KS][16]
  const void* x;         // [B][K] T, rows 16-byte aligned (K % 8 == 0)
  int64_t ldx;
  void* y;               // [B][N] T
  int64_t ldy;
  const void* bias;      // [N] T or null
  float* partial;        // [splits][B][N] fp32 when splitting K, else null
  int B, N, K, MT, KS;
  int mblocks;           // CTAs along the weight rows: blockIdx.x = token block * mblocks + M block
  int ktiles_per_split;  // in 64-wide K tiles
};

// Dynamic shared memory of a Semi24 tile config: per stage, A 2 k-steps x 512 B per m-tile, metadata
// 2 x 64 B per m-tile, x BN rows x 128 B.
constexpr int semi24_smem_bytes(int bm, int bn, int stages) { return stages * ((bm / 16) * 1152 + bn * 128); }

// Metadata word for tiles outside the weight (rows >= N): nibble 0b0100 = positions (0, 1), the smallest index
// pair mma.sp::ordered_metadata defines (0b0000, which a zero-fill would give, is undefined behaviour).
constexpr uint32_t kPadMetaWord = 0x44444444u;

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
struct Semi24Config {
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kMI = BM / WARPS_M / 16, kNI = BN / WARPS_N / 8;
  static constexpr int kTilesM = BM / 16;
  // per stage: A 2 k-steps x 512 B per m-tile, metadata 2 x 64 B per m-tile, x BN rows x 128 B
  static constexpr int kABytes = kTilesM * 2 * 512, kEBytes = kTilesM * 2 * 64, kXBytes = BN * 128;
  static constexpr int kStageBytes = kABytes + kEBytes + kXBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(kSmemBytes == semi24_smem_bytes(BM, BN, STAGES));
  static_assert(kMI >= 1 && kNI >= 1 && BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0, "bad tile shape");
  static_assert(kSmemBytes >= staged_epilogue_bytes<BM, BN>(), "epilogue tile must fit the pipeline's smem");
};

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    semi24_sm80_kernel(const Semi24Args p) {
  using Cfg = Semi24Config<T, BM, BN, WARPS_M, WARPS_N, STAGES>;
  SP_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int mtile0 = int(blockIdx.x % unsigned(p.mblocks)) * Cfg::kTilesM;
  const int tok0 = int(blockIdx.x / unsigned(p.mblocks)) * BN;
  const int split = blockIdx.y;
  const int ktiles_total = (p.KS + 1) / 2;
  const int kt_begin = split * p.ktiles_per_split;
  const int kt_end = min(ktiles_total, kt_begin + p.ktiles_per_split);
  const int nk = max(0, kt_end - kt_begin);
  const uint16_t* gv = static_cast<const uint16_t*>(p.values);
  const uint16_t* gx = static_cast<const uint16_t*>(p.x);

  auto load_stage = [&](int stage, int kt) {
    unsigned char* sA = smem + stage * Cfg::kStageBytes;
    unsigned char* sE = sA + Cfg::kABytes;
    unsigned char* sX = sE + Cfg::kEBytes;
    const int ks0 = kt * 2;
    // weights are read exactly once per token tile: .cg keeps them out of L1
    for (int i = tid; i < Cfg::kTilesM * 64; i += Cfg::kThreads) {
      const int mt = i >> 6, kk = (i >> 5) & 1, c = i & 31;
      const int gm = mtile0 + mt, gk = ks0 + kk;
      const bool ok = gm < p.MT && gk < p.KS;
      const uint16_t* src = ok ? gv + ((int64_t(gm) * p.KS + gk) * 32 + c) * 8 : gv;
      cp_async16(sA + (mt * 2 + kk) * 512 + c * 16, src, ok);
    }
    for (int i = tid; i < Cfg::kTilesM * 8; i += Cfg::kThreads) {
      const int mt = i >> 3, kk = (i >> 2) & 1, c = i & 3;
      const int gm = mtile0 + mt, gk = ks0 + kk;
      unsigned char* dst = sE + (mt * 2 + kk) * 64 + c * 16;
      if (gm < p.MT && gk < p.KS) {
        cp_async16(dst, p.meta + (int64_t(gm) * p.KS + gk) * 16 + c * 4, true);
      } else {  // outside the weight: a valid selector for the (zero) padding values, not a zero-fill
        uint4 pad;
        pad.x = pad.y = pad.z = pad.w = kPadMetaWord;
        *reinterpret_cast<uint4*>(dst) = pad;
      }
    }
    for (int i = tid; i < BN * 8; i += Cfg::kThreads) {
      const int r = i >> 3, c = i & 7;
      const int tok = tok0 + r, k = kt * 64 + c * 8;
      const bool ok = tok < p.B && k < p.K;
      const uint16_t* src = ok ? gx + int64_t(tok) * p.ldx + k : gx;
      cp_async16(sX + r * 128 + ((c ^ (r & 7)) * 16), src, ok);  // XOR swizzle: ldmatrix conflict-free
    }
  };

  float acc[Cfg::kMI][Cfg::kNI][4];
  zero_acc(acc);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, kt_begin + s);
    cp_async_commit();
  }
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nxt = it + STAGES - 1;
    if (nxt < nk) load_stage(nxt % STAGES, kt_begin + nxt);
    cp_async_commit();

    const unsigned char* sA = smem + (it % STAGES) * Cfg::kStageBytes;
    const unsigned char* sE = sA + Cfg::kABytes;
    const unsigned char* sX = sE + Cfg::kEBytes;
    const int ks0 = (kt_begin + it) * 2;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      if (ks0 + kk >= p.KS) break;  // odd number of 32-wide k-steps: the last tile has one
      uint32_t b[Cfg::kNI][4];
#pragma unroll
      for (int ni = 0; ni < Cfg::kNI; ++ni) {
        const int r = warp_n * (BN / WARPS_N) + ni * 8 + (lane & 7);
        const int c = kk * 4 + (lane >> 3);
        ldmatrix_x4(b[ni], sX + r * 128 + ((c ^ (r & 7)) * 16));
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::kMI; ++mi) {
        const int mt = warp_m * Cfg::kMI + mi;
        const uint4 av = *reinterpret_cast<const uint4*>(sA + (mt * 2 + kk) * 512 + lane * 16);
        const uint32_t a[4] = {av.x, av.y, av.z, av.w};
        const uint32_t e =
            *reinterpret_cast<const uint32_t*>(sE + (mt * 2 + kk) * 64 + ((lane >> 2) * 2 + (lane & 1)) * 4);
#pragma unroll
        for (int ni = 0; ni < Cfg::kNI; ++ni) mma_sp_16832<T>(acc[mi][ni], a, b[ni], e);
      }
    }
  }
  cp_async_wait<0>();
  store_cta_result<T, BM, BN, WARPS_N, Cfg::kThreads>(acc, smem, warp_m, warp_n, tid, mtile0 * 16, tok0, split, p);
}

// GPU packer: one thread per (tile, lane), the same per-lane routine as the CPU packer. T (__half or
// __nv_bfloat16) only names the dtype: packing moves raw 16-bit patterns. A template, so the header can be
// included by several translation units without defining the kernel twice.
template <typename T>
__global__ void pack_semi24_sm80_kernel(const T* __restrict__ w, int64_t N, int64_t K, int64_t MT, int64_t KS,
                                        T* __restrict__ values, uint32_t* __restrict__ meta, int* __restrict__ bad) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= MT * KS * 32) return;
  const int lane = int(i & 31);
  const int64_t tile = i >> 5;
  uint16_t out[8];
  uint32_t word = 0;
  if (!pack_sm80_lane(reinterpret_cast<const uint16_t*>(w), K, N, K, tile / KS, tile % KS, lane, out, &word))
    atomicExch(bad, 1);
  uint4 v;
  v.x = out[0] | (uint32_t(out[1]) << 16);
  v.y = out[2] | (uint32_t(out[3]) << 16);
  v.z = out[4] | (uint32_t(out[5]) << 16);
  v.w = out[6] | (uint32_t(out[7]) << 16);
  reinterpret_cast<uint4*>(values)[i] = v;
  const int g = lane >> 2, t = lane & 3;
  if (t < 2) meta[tile * 16 + 2 * g + t] = word;
}

template <typename T>
inline cudaError_t launch_pack_semi24_sm80(const void* w, int64_t N, int64_t K, void* values, uint32_t* meta,
                                           int* bad, cudaStream_t stream) {
  const int64_t MT = (N + kTileM - 1) / kTileM, KS = (K + kTileK - 1) / kTileK, threads = MT * KS * 32;
  if (threads == 0) return cudaSuccess;
  return launch_kernel(pack_semi24_sm80_kernel<T>, dim3(unsigned((threads + 255) / 256)), dim3(256), 0, stream,
                       static_cast<const T*>(w), N, K, MT, KS, static_cast<T*>(values), meta, bad);
}

// ---------------------------------------------------------------------------------------------------
// Host side (torch-free): tile configs, the plan, the launch. plan_semi24 is what the .cu and the emulator
// both call, so the emulated tests run the configs and splits a GPU would pick.
//   B <= 8:   64x8,   4 warps stacked on M, 6 stages  (decode: weight-bandwidth bound, deep pipeline)
//   B <= 32:  64x32,  4 warps on M, 4 stages
//   B <= 128: 128x64, 4x2 warps, 4 stages
//   else:     128x128, 2x4 warps (64x32 per warp), 4 stages = 102,400 B of shared memory, which sm_80 (166,912 B
//             per block) and sm_90 (232,448 B) allow but sm_86/sm_89 (101,376 B) do not: there the same tile
//             runs with 3 stages (76,800 B).
// Split-K (plan_semi24) whenever the CTAs of that config do not cover the SMs and K has >= 8 tiles of 64.
// ---------------------------------------------------------------------------------------------------
constexpr std::array<TileConfig, 5> kSemi24Configs = {{
    {64, 8, 4, 1, 6, semi24_smem_bytes(64, 8, 6)},
    {64, 32, 4, 1, 4, semi24_smem_bytes(64, 32, 4)},
    {128, 64, 4, 2, 4, semi24_smem_bytes(128, 64, 4)},
    {128, 128, 2, 4, 4, semi24_smem_bytes(128, 128, 4)},
    {128, 128, 2, 4, 3, semi24_smem_bytes(128, 128, 3)},
}};

inline LaunchPlan plan_semi24(int64_t B, int64_t N, int64_t K, const DeviceLimits& d) {
  static constexpr int kDecode[] = {0}, kSmall[] = {1}, kMid[] = {2}, kLarge[] = {3, 4};
  LaunchPlan p;
  p.config = B <= 8     ? pick_config(kSemi24Configs, kDecode, d)
             : B <= 32  ? pick_config(kSemi24Configs, kSmall, d)
             : B <= 128 ? pick_config(kSemi24Configs, kMid, d)
                        : pick_config(kSemi24Configs, kLarge, d);
  if (p.config < 0) {
    p.error = "no Semi24 tile configuration fits this device's shared memory per block (sharedMemPerBlockOptin)";
    return p;
  }
  p.tile = kSemi24Configs[p.config];
  const int64_t MT = (N + kTileM - 1) / kTileM, KS = (K + kTileK - 1) / kTileK, ktiles = (KS + 1) / 2;
  const int64_t mblocks = (MT + p.tile.bm / 16 - 1) / (p.tile.bm / 16), nblocks = (B + p.tile.bn - 1) / p.tile.bn;
  // >= 4 K tiles (256 inputs) per split so each split's pipeline fills
  p.splits = choose_splits(mblocks * nblocks, ktiles, d.num_sms, 4, B * N, p.units_per_split);
  finish_plan(p, mblocks, nblocks, B, N);
  return p;
}

// What the kernel reads with cp.async must be 16-byte aligned: the packed values and metadata (a tensor view at
// an odd offset is not) and x's rows (x_for_cp_async pads K to 8). Null when fine.
inline const char* semi24_args_error(const Semi24Args& a) {
  if (!aligned16(a.values)) return "values must be 16-byte aligned (cp.async reads 16-byte chunks)";
  if (!aligned16(a.meta)) return "meta must be 16-byte aligned (cp.async reads 16-byte chunks)";
  if (!aligned16(a.x) || a.ldx % 8) return "x rows must be 16-byte aligned";
  return nullptr;
}

// Runs plan (from plan_semi24); workspace holds plan.workspace_floats floats (null when 0).
template <typename T>
inline cudaError_t launch_semi24_sm80(Semi24Args a, const LaunchPlan& plan, float* workspace, int num_sms,
                                      cudaStream_t stream) {
  if (plan.error || (plan.splits > 1 && !workspace)) return cudaErrorInvalidValue;
  a.mblocks = int(plan.mblocks);
  a.ktiles_per_split = int(plan.units_per_split);
  a.partial = plan.splits > 1 ? workspace : nullptr;
  return dispatch_config<kSemi24Configs.size()>(plan.config, [&](auto I) {
    constexpr TileConfig c = kSemi24Configs[I];
    using Cfg = Semi24Config<T, c.bm, c.bn, c.warps_m, c.warps_n, c.stages>;
    static_assert(Cfg::kSmemBytes == c.smem_bytes && Cfg::kThreads == c.threads());
    return launch_planned<T>(semi24_sm80_kernel<T, c.bm, c.bn, c.warps_m, c.warps_n, c.stages>, a, plan, num_sms,
                             stream);
  });
}

}  // namespace sparseprune::cuda
