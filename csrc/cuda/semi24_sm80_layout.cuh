// Packed layout of Semi24 weights for mma.sp.m16n8k32 (fp16/bf16) on sm_80+. Torch-free and
// __host__ __device__: the CPU packer (csrc/cpu/pack_sm80.cpp) and the GPU packer
// (pack_semi24_sm80_kernel in csrc/cuda/semi24_sm80.cuh) both call pack_sm80_lane(), so they agree bit for bit;
// tests/test_cuda_layout.py checks the result against the PTX-ISA emulation in sparseprune/cuda_layout.py.
//
//   values [Np/16][Kp/32][32 lanes][8]   lane l's A fragment a0..a7 for tile (m, ks): one 16-byte load
//   meta   [Np/16][Kp/32][16] u32        entry 2g+t = metadata register of lane (g, t), t in {0, 1}
// Np = ceil(N/16)*16, Kp = ceil(K/32)*32; padding holds zero values and the legal nibble 0x4 (0, 1).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SP_HD __host__ __device__ __forceinline__
#else
#define SP_HD inline
#endif

namespace sparseprune::cuda {

constexpr int kTileM = 16, kTileK = 32;
constexpr uint32_t kPadNibble = 0x4;

// Kept positions of group `grp` (4 inputs) of `row`: nonzeros first, then the lowest free slots.
// Returns false when the group keeps more than 2 values. Elements are raw 16-bit patterns (fp16 or
// bf16); +0 and -0 both count as pruned.
SP_HD bool group_positions(const uint16_t* w, int64_t ldw, int64_t N, int64_t K, int64_t row, int64_t grp, int& p0,
                           int& p1) {
  if (row >= N || 4 * grp >= K) {  // padding
    p0 = 0;
    p1 = 1;
    return true;
  }
  const uint16_t* src = w + row * ldw + 4 * grp;
  int nz[4], cnt = 0;
  for (int i = 0; i < 4; ++i)
    if (src[i] & 0x7FFF) nz[cnt++] = i;  // at most 4 entries
  if (cnt > 2) {  // not 2:4; report it, but hand back in-range positions
    p0 = 0;
    p1 = 1;
    return false;
  }
  // fill with the lowest unused positions, then sort ascending
  for (int i = 0; i < 4 && cnt < 2; ++i) {
    bool used = false;
    for (int j = 0; j < cnt; ++j) used |= nz[j] == i;
    if (!used) nz[cnt++] = i;
  }
  p0 = nz[0] < nz[1] ? nz[0] : nz[1];
  p1 = nz[0] < nz[1] ? nz[1] : nz[0];
  return true;
}

SP_HD uint16_t elem_or_zero(const uint16_t* w, int64_t ldw, int64_t N, int64_t K, int64_t row, int64_t col) {
  return (row < N && col < K) ? w[row * ldw + col] : uint16_t(0);
}

// Packs one lane's entry of tile (m, ks): its 8 A values, and (for t < 2) its metadata word.
// Returns false if a group it touches is not 2:4.
SP_HD bool pack_sm80_lane(const uint16_t* w, int64_t ldw, int64_t N, int64_t K, int64_t m, int64_t ks, int lane,
                          uint16_t out[8], uint32_t* meta_word) {
  const int g = lane >> 2, t = lane & 3;
  bool ok = true;
  for (int s = 0; s < 8; ++s) {
    const int64_t row = m * kTileM + g + 8 * ((s >> 1) & 1);
    const int c = 2 * t + (s & 1) + 8 * (s >> 2);  // compressed column in the tile
    const int64_t grp = ks * (kTileK / 4) + (c >> 1);
    int p0, p1;
    ok &= group_positions(w, ldw, N, K, row, grp, p0, p1);
    out[s] = elem_or_zero(w, ldw, N, K, row, 4 * grp + ((c & 1) ? p1 : p0));
  }
  if (t < 2 && meta_word) {
    uint32_t word = 0;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j) {
        int p0, p1;
        ok &= group_positions(w, ldw, N, K, m * kTileM + g + 8 * h, ks * (kTileK / 4) + 4 * t + j, p0, p1);
        word |= uint32_t(p0 | (p1 << 2)) << (16 * h + 4 * j);
      }
    *meta_word = word;
  }
  return ok;
}

}  // namespace sparseprune::cuda
