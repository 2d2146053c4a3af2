// 2:4 GEMM on sparse tensor cores (mma.sp m16n8k32, sm_80+), torch-free.
//
// Computes Y^T = W X^T: the sparse weight is operand A (16 rows per MMA) and tokens are the MMA's N
// (8 per MMA), so a batch of 1 pads to 8 tokens, not 32. W comes pre-packed in fragment order
// (semi24_sm80_layout.cuh): every lane fetches its A fragment with one 16-byte shared load. x tiles go
// through cp.async into XOR-swizzled shared memory and are read with ldmatrix (no bank conflicts).
// STAGES-deep cp.async pipeline over 64-wide K tiles (two m16n8k32 steps). Split-K over gridDim.z
// writes fp32 partials that splitk_reduce_kernel sums (small batch on large K fills the GPU). Without split-K
// the output tile is staged through shared memory and stored as 16-byte rows (store_acc_staged).
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
  int ktiles_per_split;  // in 64-wide K tiles
};

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
struct Semi24Config {
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kMI = BM / WARPS_M / 16, kNI = BN / WARPS_N / 8;
  static constexpr int kTilesM = BM / 16;
  // per stage: A 2 k-steps x 512 B per m-tile, metadata 2 x 64 B per m-tile, x BN rows x 128 B
  static constexpr int kABytes = kTilesM * 2 * 512, kEBytes = kTilesM * 2 * 64, kXBytes = BN * 128;
  static constexpr int kStageBytes = kABytes + kEBytes + kXBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(kMI >= 1 && kNI >= 1 && BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0, "bad tile shape");
  static_assert(kSmemBytes >= staged_epilogue_bytes<BM, BN>(), "epilogue tile must fit the pipeline's smem");
};

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    semi24_sm80_kernel(const Semi24Args p) {
  using Cfg = Semi24Config<T, BM, BN, WARPS_M, WARPS_N, STAGES>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int mtile0 = blockIdx.x * Cfg::kTilesM;
  const int tok0 = blockIdx.y * BN;
  const int ktiles_total = (p.KS + 1) / 2;
  const int kt_begin = blockIdx.z * p.ktiles_per_split;
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
      const bool ok = gm < p.MT && gk < p.KS;
      const uint32_t* src = ok ? p.meta + (int64_t(gm) * p.KS + gk) * 16 + c * 4 : p.meta;
      cp_async16(sE + (mt * 2 + kk) * 64 + c * 16, src, ok);
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

  if (p.partial) {  // split-K: fp32 partials, summed (with bias) by splitk_reduce_kernel
    float* partial = p.partial + int64_t(blockIdx.z) * p.B * p.N;
    store_acc<T, Cfg::kMI, Cfg::kNI>(acc, (mtile0 + warp_m * Cfg::kMI) * 16, tok0 + warp_n * (BN / WARPS_N), lane,
                                     p.N, p.B, nullptr, 0, nullptr, partial);
  } else {
    store_cta_acc_staged<T, BM, BN, WARPS_N, Cfg::kThreads>(acc, smem, warp_m, warp_n, tid, mtile0 * 16, tok0, p);
  }
}

// GPU packer: one thread per (tile, lane), the same per-lane routine as the CPU packer.
__global__ void pack_semi24_sm80_kernel(const uint16_t* __restrict__ w, int64_t N, int64_t K, int64_t MT, int64_t KS,
                                        uint16_t* __restrict__ values, uint32_t* __restrict__ meta,
                                        int* __restrict__ bad) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= MT * KS * 32) return;
  const int lane = int(i & 31);
  const int64_t tile = i >> 5;
  uint16_t out[8];
  uint32_t word = 0;
  if (!pack_sm80_lane(w, K, N, K, tile / KS, tile % KS, lane, out, &word)) atomicExch(bad, 1);
  uint4 v;
  v.x = out[0] | (uint32_t(out[1]) << 16);
  v.y = out[2] | (uint32_t(out[3]) << 16);
  v.z = out[4] | (uint32_t(out[5]) << 16);
  v.w = out[6] | (uint32_t(out[7]) << 16);
  reinterpret_cast<uint4*>(values)[i] = v;
  const int g = lane >> 2, t = lane & 3;
  if (t < 2) meta[tile * 16 + 2 * g + t] = word;
}

// ---------------------------------------------------------------------------------------------------
// Host launcher (torch-free). Tile configuration by batch bucket:
//   B <= 8:   64x8,   4 warps stacked on M, 6 stages  (decode: weight-bandwidth bound, deep pipeline)
//   B <= 32:  64x32,  4 warps on M, 4 stages
//   B <= 128: 128x64, 4x2 warps, 4 stages
//   else:     128x128, 2x4 warps (64x32 per warp), 4 stages = 100 KB smem (fits sm_80's 164 KB)
// ---------------------------------------------------------------------------------------------------
template <typename T, int BM, int BN, int WM, int WN, int ST>
inline cudaError_t launch_semi24_cfg(Semi24Args a, int num_sms, cudaStream_t stream, float* workspace,
                                     int64_t workspace_floats) {
  using Cfg = Semi24Config<T, BM, BN, WM, WN, ST>;
  auto kern = semi24_sm80_kernel<T, BM, BN, WM, WN, ST>;
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int mblocks = (a.MT + Cfg::kTilesM - 1) / Cfg::kTilesM, nblocks = (a.B + BN - 1) / BN;
  const int ktiles = (a.KS + 1) / 2;
  // split K when the grid would leave SMs idle; keep >= 4 K tiles per split so the pipeline fills
  int splits = 1;
  const int64_t blocks = int64_t(mblocks) * nblocks;
  if (blocks < num_sms && ktiles >= 8) {
    splits = int(std::min<int64_t>({(2 * num_sms + blocks - 1) / blocks, ktiles / 4, 16}));
    while (splits > 1 && int64_t(splits) * a.B * a.N > workspace_floats) --splits;
  }
  a.ktiles_per_split = (ktiles + splits - 1) / splits;
  splits = (ktiles + a.ktiles_per_split - 1) / a.ktiles_per_split;
  a.partial = splits > 1 ? workspace : nullptr;
  dim3 grid(mblocks, nblocks, splits);
  kern<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(a);
  if (splits > 1) {
    const int64_t n = int64_t(a.B) * a.N;
    const int blocks_r = int(std::min<int64_t>((n + 255) / 256, 4 * num_sms));
    splitk_reduce_kernel<T><<<blocks_r, 256, 0, stream>>>(a.partial, splits, n, a.N, static_cast<const T*>(a.bias),
                                                          static_cast<T*>(a.y));
  }
  return cudaGetLastError();
}

// Workspace (fp32 floats) the launcher may use for split-K partials.
inline int64_t semi24_workspace_floats(int B, int N) { return B <= 32 ? int64_t(16) * B * N : 0; }

template <typename T>
inline cudaError_t launch_semi24_sm80(const Semi24Args& a, int num_sms, cudaStream_t stream, float* workspace,
                                      int64_t workspace_floats) {
  if (a.B <= 8) return launch_semi24_cfg<T, 64, 8, 4, 1, 6>(a, num_sms, stream, workspace, workspace_floats);
  if (a.B <= 32) return launch_semi24_cfg<T, 64, 32, 4, 1, 4>(a, num_sms, stream, workspace, workspace_floats);
  if (a.B <= 128) return launch_semi24_cfg<T, 128, 64, 4, 2, 4>(a, num_sms, stream, workspace, 0);
  return launch_semi24_cfg<T, 128, 128, 2, 4, 4>(a, num_sms, stream, workspace, 0);
}

}  // namespace sparseprune::cuda
