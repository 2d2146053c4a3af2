// Block-sparse (BSR) GEMM on dense tensor cores (mma.sync m16n8k16, sm_80+), torch-free.
//
// Y^T = W X^T over the stored blocks only. A CTA owns BM weight rows inside one block row (bh % BM == 0)
// and BN tokens; it walks that block row's stored blocks in 32-wide K chunks (bw % 32 == 0), each chunk
// one cp.async pipeline stage: the weight chunk [BM][32] and the matching x chunk [BN][32] (x columns
// col*bw + 32j...), both XOR-swizzled for conflict-free ldmatrix. Empty block rows still write bias/zero.
// crow/col are clamped/checked on the device (never read out of bounds); the output tile is staged through
// shared memory for 16-byte stores. Split-K (grid.y = splits, when the grid alone would leave SMs idle, e.g.
// decode): split s of a CTA takes chunks [nk * s / splits, nk * (s + 1) / splits) of its block row's nk chunks
// and writes fp32 partials that splitk_reduce_kernel sums. grid.x = M blocks x token blocks (M fastest).
#pragma once
#include <algorithm>

#include "mma_utils.cuh"

namespace sparseprune::cuda {

struct BsrArgs {
  const void* values;   // [nnzb][bh][bw] T
  const int32_t* crow;  // [N/bh + 1]
  const int32_t* col;   // [nnzb]
  const void* x;        // [B][K] T, rows 16-byte aligned
  int64_t ldx;
  void* y;              // [B][N] T
  int64_t ldy;
  const void* bias;
  float* partial;       // [splits][B][N] fp32 when splitting K, else null
  int B, N, K, bh, bw;
  int nnzb;             // values.size(0): bound for the device-side crow clamp
  int mblocks;          // N / BM: blockIdx.x = token block * mblocks + M block
  int splits;           // K splits (grid.y)
};

// This split's share [begin, end) of the nk K chunks of a CTA's block row: contiguous and balanced, so every
// split of every row gets within one chunk of nk / splits (possibly none).
__device__ __forceinline__ void split_range(int nk, int split, int splits, int& begin, int& end) {
  begin = int(int64_t(nk) * split / splits);
  end = int(int64_t(nk) * (split + 1) / splits);
}

// Stored-block range of block row br, clamped to [0, nnzb] and non-decreasing. crow/col are validated on
// the host when the weight is built (validate()), but the op cannot re-check them per call without a
// device->host sync (slow, and illegal under CUDA graph capture); these clamps cost two min/max and keep
// a corrupted crow from sending loads outside values/col.
__device__ __forceinline__ void clamped_block_range(const int32_t* crow, int br, int nnzb, int& begin, int& end) {
  begin = min(max(crow[br], 0), nnzb);
  end = min(max(crow[br + 1], begin), nnzb);
}

// A stored block whose column index is outside [0, K/bw) is skipped (contributes nothing): reading x at
// col*bw would be out of bounds. Same reasoning as above: a device-side guard instead of a host sync.
__device__ __forceinline__ bool block_col_ok(int c, int K, int bw) { return c >= 0 && c < K / bw; }

constexpr int bsr_smem_bytes(int bm, int bn, int stages) { return stages * (bm + bn) * 64; }

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
struct BsrConfig {
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kMI = BM / WARPS_M / 16, kNI = BN / WARPS_N / 8;
  static constexpr int kStageBytes = (BM + BN) * 64;  // 32 halves per row
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(kSmemBytes == bsr_smem_bytes(BM, BN, STAGES));
  static_assert(kMI >= 1 && kNI >= 2 && kNI % 2 == 0, "each warp covers >= 16 rows and a multiple of 16 tokens");
  static_assert(kSmemBytes >= staged_epilogue_bytes<BM, BN>(), "epilogue tile must fit the pipeline's smem");
};

// 64-byte rows: 4 chunks of 16 B; rows r and r+2 share banks, so XOR the chunk with (r >> 1) & 3.
__device__ __forceinline__ int swz64(int r, int c) { return r * 64 + ((c ^ ((r >> 1) & 3)) * 16); }

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N) bsr_sm80_kernel(const BsrArgs p) {
  using Cfg = BsrConfig<BM, BN, WARPS_M, WARPS_N, STAGES>;
  SP_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int row0 = int(blockIdx.x % unsigned(p.mblocks)) * BM;  // first weight row of this CTA
  const int tok0 = int(blockIdx.x / unsigned(p.mblocks)) * BN;
  const int split = blockIdx.y;
  const int br = row0 / p.bh, row_in_block = row0 - br * p.bh;
  int b_begin, b_end;
  clamped_block_range(p.crow, br, p.nnzb, b_begin, b_end);
  const int chunks_per_block = p.bw / 32;
  int i_begin, i_end;  // this split's chunks of the block row
  split_range((b_end - b_begin) * chunks_per_block, split, p.splits, i_begin, i_end);
  const int nk = i_end - i_begin;
  const uint16_t* gv = static_cast<const uint16_t*>(p.values);
  const uint16_t* gx = static_cast<const uint16_t*>(p.x);

  auto load_stage = [&](int stage, int it) {
    unsigned char* sA = smem + stage * Cfg::kStageBytes;
    unsigned char* sX = sA + BM * 64;
    const int i = i_begin + it;
    const int blk = b_begin + i / chunks_per_block, sub = i % chunks_per_block;
    const int c = p.col[blk];
    const bool col_ok = block_col_ok(c, p.K, p.bw);
    const int64_t kbase = int64_t(col_ok ? c : 0) * p.bw + sub * 32;
    const uint16_t* a = gv + (int64_t(blk) * p.bh + row_in_block) * p.bw + sub * 32;
    for (int j = tid; j < BM * 4; j += Cfg::kThreads) {
      const int r = j >> 2, c = j & 3;
      cp_async16(sA + swz64(r, c), a + int64_t(r) * p.bw + c * 8, true);
    }
    for (int j = tid; j < BN * 4; j += Cfg::kThreads) {
      const int r = j >> 2, c = j & 3;
      const bool ok = col_ok && tok0 + r < p.B;
      cp_async16(sX + swz64(r, c), ok ? gx + int64_t(tok0 + r) * p.ldx + kbase + c * 8 : gx, ok);
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
    const unsigned char* sA = smem + (it % STAGES) * Cfg::kStageBytes;
    const unsigned char* sX = sA + BM * 64;
    // bad column: x was zero-filled, but skip the MMAs too so Inf/NaN weights cannot leak in as 0 * Inf
    if (!block_col_ok(p.col[b_begin + (i_begin + it) / chunks_per_block], p.K, p.bw)) continue;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {  // two k16 halves of the 32-wide chunk
      uint32_t b[Cfg::kNI / 2][4];    // one ldmatrix.x4 = 16 tokens x k16
#pragma unroll
      for (int nj = 0; nj < Cfg::kNI / 2; ++nj) {
        // matrices: (tokens 0-7, k 0-7), (tokens 0-7, k 8-15), (tokens 8-15, k 0-7), (tokens 8-15, k 8-15)
        const int r = warp_n * (BN / WARPS_N) + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int c = kk * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(b[nj], sX + swz64(r, c));
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::kMI; ++mi) {
        // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
        const int r = (warp_m * Cfg::kMI + mi) * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int c = kk * 2 + (lane >> 4);
        uint32_t a[4];
        ldmatrix_x4(a, sA + swz64(r, c));
#pragma unroll
        for (int nj = 0; nj < Cfg::kNI / 2; ++nj) {
          mma_16816<T>(acc[mi][2 * nj], a, b[nj][0], b[nj][1]);
          mma_16816<T>(acc[mi][2 * nj + 1], a, b[nj][2], b[nj][3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  store_cta_result<T, BM, BN, WARPS_N, Cfg::kThreads>(acc, smem, warp_m, warp_n, tid, row0, tok0, split, p);
}

// ---------------------------------------------------------------------------------------------------
// Host side (torch-free): tile configs, the plan, the launch (shared by bsr_sm80.cu and the emulator).
// Needs bh % 16 == 0 and bw % 32 == 0 (checked by the caller). BM = largest of 64/32/16 dividing bh; BN = 16
// tokens for B <= 16 (decode), else 128 (64 for 16-row blocks). Split-K when the CTAs do not cover the SMs and
// the block rows hold >= 8 chunks of 32 inputs on average (>= 4 per split).
// ---------------------------------------------------------------------------------------------------
constexpr std::array<TileConfig, 6> kBsrConfigs = {{
    {64, 16, 4, 1, 4, bsr_smem_bytes(64, 16, 4)},
    {64, 128, 2, 4, 4, bsr_smem_bytes(64, 128, 4)},
    {32, 16, 2, 1, 4, bsr_smem_bytes(32, 16, 4)},
    {32, 128, 2, 4, 4, bsr_smem_bytes(32, 128, 4)},
    {16, 16, 1, 1, 4, bsr_smem_bytes(16, 16, 4)},
    {16, 64, 1, 4, 4, bsr_smem_bytes(16, 64, 4)},
}};

// Plan shared by BSR and hybrid: configs come in (decode, large batch) pairs for BM = 64, 32, 16. One split unit
// is one 32-wide K chunk of a stored block.
template <size_t NC>
inline LaunchPlan plan_block_sparse(const std::array<TileConfig, NC>& table, int64_t small_batch, int64_t B,
                                    int64_t N, int64_t bh, int64_t bw, int64_t nnzb, const DeviceLimits& d) {
  const int pair = bh % 64 == 0 ? 0 : bh % 32 == 0 ? 2 : 4;
  const int cand[] = {pair + (B <= small_batch ? 0 : 1)};
  LaunchPlan p;
  p.config = pick_config(table, cand, d);
  if (p.config < 0) {
    p.error = "no block-sparse tile configuration fits this device's shared memory per block";
    return p;
  }
  p.tile = table[p.config];
  const int64_t mblocks = N / p.tile.bm, nblocks = (B + p.tile.bn - 1) / p.tile.bn;
  const int64_t block_rows = bh > 0 ? N / bh : 0;
  const int64_t avg_chunks = block_rows > 0 ? nnzb * (bw / 32) / block_rows : 0;
  p.splits = choose_splits(mblocks * nblocks, avg_chunks, d.num_sms, 4, B * N, p.units_per_split);
  finish_plan(p, mblocks, nblocks, B, N);
  return p;
}

inline LaunchPlan plan_bsr(int64_t B, int64_t N, int64_t bh, int64_t bw, int64_t nnzb, const DeviceLimits& d) {
  return plan_block_sparse(kBsrConfigs, 16, B, N, bh, bw, nnzb, d);
}

// cp.async reads values and x in 16-byte chunks: both must be 16-byte aligned. Null when fine.
inline const char* bsr_args_error(const BsrArgs& a) {
  if (!aligned16(a.values)) return "values must be 16-byte aligned (cp.async reads 16-byte chunks)";
  if (!aligned16(a.x) || a.ldx % 8) return "x rows must be 16-byte aligned";
  return nullptr;
}

// Runs plan (from plan_bsr); workspace holds plan.workspace_floats floats (null when 0).
template <typename T>
inline cudaError_t launch_bsr_sm80(BsrArgs a, const LaunchPlan& plan, float* workspace, int num_sms,
                                   cudaStream_t stream) {
  if (plan.error || (plan.splits > 1 && !workspace)) return cudaErrorInvalidValue;
  a.mblocks = int(plan.mblocks);
  a.splits = plan.splits;
  a.partial = plan.splits > 1 ? workspace : nullptr;
  return dispatch_config<kBsrConfigs.size()>(plan.config, [&](auto I) {
    constexpr TileConfig c = kBsrConfigs[I];
    using Cfg = BsrConfig<c.bm, c.bn, c.warps_m, c.warps_n, c.stages>;
    static_assert(Cfg::kSmemBytes == c.smem_bytes && Cfg::kThreads == c.threads());
    return launch_planned<T>(bsr_sm80_kernel<T, c.bm, c.bn, c.warps_m, c.warps_n, c.stages>, a, plan, num_sms,
                             stream);
  });
}

}  // namespace sparseprune::cuda
