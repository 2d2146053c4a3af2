// Hybrid (BSR whose stored blocks are 2:4) GEMM on sparse tensor cores (mma.sp m16n8k32, sm_80+), torch-free.
//
// Y^T = W X^T over the stored blocks only. The blocks come pre-packed in the Semi24 fragment order
// (semi24_sm80_layout.cuh; sparseprune.cuda.pack_hybrid_sm80): values [nnzb][bh/16][bw/32][32 lanes][8] and
// meta [nnzb][bh/16][bw/32][16], so a lane's A fragment is one 16-byte shared load and its metadata one
// 4-byte load, exactly as in the Semi24 kernel. A CTA owns BM weight rows inside one block row (bh % BM == 0)
// and BN tokens, and walks that block row's stored blocks in 32-wide K steps; each step is one cp.async
// pipeline stage holding the A tiles [BM/16][512 B], their metadata [BM/16][64 B] and the x chunk [BN][32]
// (XOR-swizzled 64-byte rows, read with ldmatrix). 2:4 halves the weight bytes and the MMA count of BSR.
// Like the BSR kernel it clamps crow and skips bad col entries on the device (no host sync), stages the
// output tile through shared memory for 16-byte stores, splits K the same way when the grid alone would leave
// SMs idle (split_range; fp32 partials summed by splitk_reduce_kernel), and puts tokens on grid.x.
#pragma once
#include <algorithm>

#include "bsr_sm80.cuh"  // clamped_block_range, block_col_ok, swz64
#include "mma_utils.cuh"

namespace sparseprune::cuda {

struct HybridArgs {
  const void* values;    // [nnzb][bh/16][bw/32][32][8] T
  const uint32_t* meta;  // [nnzb][bh/16][bw/32][16]
  const int32_t* crow;   // [N/bh + 1]
  const int32_t* col;    // [nnzb]
  const void* x;         // [B][K] T, rows 16-byte aligned
  int64_t ldx;
  void* y;               // [B][N] T
  int64_t ldy;
  const void* bias;
  float* partial;        // [splits][B][N] fp32 when splitting K, else null
  int B, N, K, bh, bw, nnzb;
  int mblocks;           // N / BM: blockIdx.x = token block * mblocks + M block
  int splits;            // K splits (grid.y)
};

// Per stage: A tiles BM/16 x 512 B, their metadata BM/16 x 64 B, x BN rows x 64 B; at least the epilogue tile.
constexpr int hybrid_smem_bytes(int bm, int bn, int stages) {
  return stages * ((bm / 16) * 576 + bn * 64) > bn * (bm + 8) * 2 ? stages * ((bm / 16) * 576 + bn * 64)
                                                                  : bn * (bm + 8) * 2;
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
struct HybridConfig {
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kMI = BM / WARPS_M / 16, kNI = BN / WARPS_N / 8;
  static constexpr int kTilesM = BM / 16;
  static constexpr int kABytes = kTilesM * 512, kEBytes = kTilesM * 64, kXBytes = BN * 64;
  static constexpr int kStageBytes = kABytes + kEBytes + kXBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes > staged_epilogue_bytes<BM, BN>()
                                        ? STAGES * kStageBytes
                                        : staged_epilogue_bytes<BM, BN>();
  static_assert(kMI >= 1 && kNI >= 1 && BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0, "bad tile shape");
  static_assert(kSmemBytes == hybrid_smem_bytes(BM, BN, STAGES));
};

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N) hybrid_sm80_kernel(const HybridArgs p) {
  using Cfg = HybridConfig<BM, BN, WARPS_M, WARPS_N, STAGES>;
  SP_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int row0 = int(blockIdx.x % unsigned(p.mblocks)) * BM;  // first weight row of this CTA
  const int tok0 = int(blockIdx.x / unsigned(p.mblocks)) * BN;
  const int split = blockIdx.y;
  const int br = row0 / p.bh, rtile0 = (row0 - br * p.bh) / 16;  // row tile inside the block
  int b_begin, b_end;
  clamped_block_range(p.crow, br, p.nnzb, b_begin, b_end);
  const int ksteps = p.bw / 32, rtiles = p.bh / 16;
  int i_begin, i_end;  // this split's k-steps of the block row
  split_range((b_end - b_begin) * ksteps, split, p.splits, i_begin, i_end);
  const int nk = i_end - i_begin;
  const uint16_t* gv = static_cast<const uint16_t*>(p.values);
  const uint16_t* gx = static_cast<const uint16_t*>(p.x);

  auto load_stage = [&](int stage, int it) {
    unsigned char* sA = smem + stage * Cfg::kStageBytes;
    unsigned char* sE = sA + Cfg::kABytes;
    unsigned char* sX = sE + Cfg::kEBytes;
    const int i = i_begin + it;
    const int blk = b_begin + i / ksteps, sub = i % ksteps;
    const int c = p.col[blk];
    const bool col_ok = block_col_ok(c, p.K, p.bw);
    // tile (blk, rtile0 + mt, sub); blk < nnzb by the clamp, so A/E reads are always in bounds.
    // Weights are read once per token tile: .cg keeps them out of L1.
    const int64_t tile0 = (int64_t(blk) * rtiles + rtile0) * ksteps + sub;
    for (int j = tid; j < Cfg::kTilesM * 32; j += Cfg::kThreads) {
      const int mt = j >> 5, l = j & 31;
      cp_async16(sA + mt * 512 + l * 16, gv + ((tile0 + int64_t(mt) * ksteps) * 32 + l) * 8, true);
    }
    for (int j = tid; j < Cfg::kTilesM * 4; j += Cfg::kThreads) {
      const int mt = j >> 2, q = j & 3;
      cp_async16(sE + mt * 64 + q * 16, p.meta + (tile0 + int64_t(mt) * ksteps) * 16 + q * 4, true);
    }
    const int64_t kbase = int64_t(col_ok ? c : 0) * p.bw + sub * 32;
    for (int j = tid; j < BN * 4; j += Cfg::kThreads) {
      const int r = j >> 2, q = j & 3;
      const bool ok = col_ok && tok0 + r < p.B;
      cp_async16(sX + swz64(r, q), ok ? gx + int64_t(tok0 + r) * p.ldx + kbase + q * 8 : gx, ok);
    }
  };

  float acc[Cfg::kMI][Cfg::kNI][4];
  zero_acc(acc);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nxt = it + STAGES - 1;
    if (nxt < nk) load_stage(nxt % STAGES, nxt);
    cp_async_commit();
    // bad column: x was zero-filled, but skip the MMAs too so Inf/NaN weights cannot leak in as 0 * Inf
    if (!block_col_ok(p.col[b_begin + (i_begin + it) / ksteps], p.K, p.bw)) continue;
    const unsigned char* sA = smem + (it % STAGES) * Cfg::kStageBytes;
    const unsigned char* sE = sA + Cfg::kABytes;
    const unsigned char* sX = sE + Cfg::kEBytes;
    uint32_t b[Cfg::kNI][4];
#pragma unroll
    for (int ni = 0; ni < Cfg::kNI; ++ni) {
      // matrix j = tokens 0-7 x k 8j..8j+7: register j holds b_{2j}, b_{2j+1} (k = 8j + 2t, n = g)
      const int r = warp_n * (BN / WARPS_N) + ni * 8 + (lane & 7);
      ldmatrix_x4(b[ni], sX + swz64(r, lane >> 3));
    }
#pragma unroll
    for (int mi = 0; mi < Cfg::kMI; ++mi) {
      const int mt = warp_m * Cfg::kMI + mi;
      const uint4 av = *reinterpret_cast<const uint4*>(sA + mt * 512 + lane * 16);
      const uint32_t a[4] = {av.x, av.y, av.z, av.w};
      // lanes t = 2, 3 read t = 0, 1's word: selector 0 ignores it, and the load stays conflict-free
      const uint32_t e = *reinterpret_cast<const uint32_t*>(sE + mt * 64 + ((lane >> 2) * 2 + (lane & 1)) * 4);
#pragma unroll
      for (int ni = 0; ni < Cfg::kNI; ++ni) mma_sp_16832<T>(acc[mi][ni], a, b[ni], e);
    }
  }
  cp_async_wait<0>();
  store_cta_result<T, BM, BN, WARPS_N, Cfg::kThreads>(acc, smem, warp_m, warp_n, tid, row0, tok0, split, p);
}

// ---------------------------------------------------------------------------------------------------
// Host side (torch-free): tile configs, the plan, the launch (shared by hybrid_sm80.cu and the emulator).
// Needs bh % 16 == 0 and bw % 32 == 0 (checked by the caller). BM = largest of 64/32/16 dividing bh.
//   B <= 16: BN = 16, one warp per 16 rows, 6 stages (decode: weight-bandwidth bound; a stage is only
//            BM/16 * 576 B of weights, so a deep pipeline keeps enough bytes in flight)
//   else:    BN = 64, 4 warps, 4 stages
// Split-K as for BSR (plan_block_sparse): one split unit is one 32-wide k-step of a stored block.
// ---------------------------------------------------------------------------------------------------
constexpr std::array<TileConfig, 6> kHybridConfigs = {{
    {64, 16, 4, 1, 6, hybrid_smem_bytes(64, 16, 6)},
    {64, 64, 2, 2, 4, hybrid_smem_bytes(64, 64, 4)},
    {32, 16, 2, 1, 6, hybrid_smem_bytes(32, 16, 6)},
    {32, 64, 2, 2, 4, hybrid_smem_bytes(32, 64, 4)},
    {16, 16, 1, 1, 6, hybrid_smem_bytes(16, 16, 6)},
    {16, 64, 1, 4, 4, hybrid_smem_bytes(16, 64, 4)},
}};

inline LaunchPlan plan_hybrid(int64_t B, int64_t N, int64_t bh, int64_t bw, int64_t nnzb, const DeviceLimits& d) {
  return plan_block_sparse(kHybridConfigs, 16, B, N, bh, bw, nnzb, d);
}

// cp.async reads values, meta and x in 16-byte chunks: all must be 16-byte aligned. Null when fine.
inline const char* hybrid_args_error(const HybridArgs& a) {
  if (!aligned16(a.values)) return "values must be 16-byte aligned (cp.async reads 16-byte chunks)";
  if (!aligned16(a.meta)) return "meta must be 16-byte aligned (cp.async reads 16-byte chunks)";
  if (!aligned16(a.x) || a.ldx % 8) return "x rows must be 16-byte aligned";
  return nullptr;
}

// Runs plan (from plan_hybrid); workspace holds plan.workspace_floats floats (null when 0).
template <typename T>
inline cudaError_t launch_hybrid_sm80(HybridArgs a, const LaunchPlan& plan, float* workspace, int num_sms,
                                      cudaStream_t stream) {
  if (plan.error || (plan.splits > 1 && !workspace)) return cudaErrorInvalidValue;
  a.mblocks = int(plan.mblocks);
  a.splits = plan.splits;
  a.partial = plan.splits > 1 ? workspace : nullptr;
  return dispatch_config<kHybridConfigs.size()>(plan.config, [&](auto I) {
    constexpr TileConfig c = kHybridConfigs[I];
    using Cfg = HybridConfig<c.bm, c.bn, c.warps_m, c.warps_n, c.stages>;
    static_assert(Cfg::kSmemBytes == c.smem_bytes && Cfg::kThreads == c.threads());
    return launch_planned<T>(hybrid_sm80_kernel<T, c.bm, c.bn, c.warps_m, c.warps_n, c.stages>, a, plan, num_sms,
                             stream);
  });
}

}  // namespace sparseprune::cuda
