// The AMX tile primitives the bf16 tile kernels (amx_kernels.cpp) are written against, in two builds
// of the same names:
//  * real (SP_AMX_EMULATE undefined, compiled with -mamx-tile -mamx-bf16): one intrinsic each.
//  * emulated (SP_AMX_EMULATE=1, plain x86-64): a scalar model of the architectural state and of
//    the instructions as the Intel SDM defines them (palette 1: 8 tiles of at most 16 rows x 64
//    bytes; TILELOADD/TILESTORED/TILEZERO; TDPBF16PS with its DAZ/FTZ/RNE arithmetic and its shape
//    rules, which the model checks and traps on, as the hardware raises #UD/#GP).
// The kernel source is identical in both builds, so the emulated build, which runs on any x86-64 CPU
// (CI's AMD machines included), tests everything of the AMX path except these five instructions.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>

#define SP_INLINE inline __attribute__((always_inline))

namespace sparseprune::cpu::amx_tiles {

constexpr int kTiles = 8;        // palette 1
constexpr int kMaxRows = 16;     // rows per tile
constexpr int kMaxColsb = 64;    // bytes per tile row

// The 64-byte LDTILECFG operand (SDM vol. 1, 3.2 "TILECFG").
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved0[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  // Shape of tile t: r rows of cb bytes.
  void set(int t, int r, int cb) {
    rows[t] = uint8_t(r);
    colsb[t] = uint16_t(cb);
  }
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

#if !defined(SP_AMX_EMULATE)
// ------------------------------------------------------------------------------------ real tiles
// The instructions themselves, as GCC's <amxtileintrin.h> writes them, with two changes: the tile
// number is a template argument (the intrinsics paste a literal into the mnemonic), and loads and
// LDTILECFG declare that they read memory (GCC 12's tileloadd asm does not, so stores of the
// expanded tiles just before it could legally be moved after it).
SP_INLINE void tile_config(const TileConfig& c) { __asm__ volatile("ldtilecfg %0" ::"m"(c) : "memory"); }
SP_INLINE void tile_release() { __asm__ volatile("tilerelease" ::: "memory"); }
template <int T> SP_INLINE void tile_zero() {
  static_assert(T >= 0 && T < kTiles);
  __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int T> SP_INLINE void tile_load(const void* p, int64_t stride) {
  static_assert(T >= 0 && T < kTiles);
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
}
template <int T> SP_INLINE void tile_store(void* p, int64_t stride) {
  static_assert(T >= 0 && T < kTiles);
  __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(T) : "memory");
}
template <int C, int A, int B> SP_INLINE void tile_dpbf16ps() {
  static_assert(C != A && C != B && A != B, "TDPBF16PS needs three distinct tiles");
  static_assert(C >= 0 && C < kTiles && A >= 0 && A < kTiles && B >= 0 && B < kTiles, "tile index out of range");
  __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}
constexpr bool kEmulated = false;

#else
// ------------------------------------------------------------------------------------ emulated tiles
// One tile state per thread, as on the hardware (it is part of each thread's XSAVE state).
struct EmuState {
  TileConfig cfg;
  bool configured = false;
  alignas(64) uint8_t t[kTiles][kMaxRows][kMaxColsb];
};
inline thread_local EmuState emu;

// A broken tile program is a bug of ours that the hardware would fault on: stop loudly.
[[noreturn]] inline void emu_fault(const char* what) {
  std::fprintf(stderr, "sparseprune: emulated AMX fault: %s\n", what);
  __builtin_trap();
}

// LDTILECFG: palette 1 only; reserved bytes and the shapes of tiles 8..15 must be zero; a tile has
// 1..16 rows of 1..64 bytes, or is unconfigured (0 x 0). Loading a config zeroes every tile.
inline void tile_config(const TileConfig& c) {
  if (c.palette != 1) emu_fault("LDTILECFG: palette must be 1");
  for (uint8_t b : c.reserved0)
    if (b) emu_fault("LDTILECFG: reserved bytes must be zero");
  for (int t = 0; t < 16; ++t) {
    if (t >= kTiles && (c.rows[t] || c.colsb[t])) emu_fault("LDTILECFG: palette 1 has 8 tiles");
    if ((c.rows[t] == 0) != (c.colsb[t] == 0)) emu_fault("LDTILECFG: a tile needs both rows and colsb");
    if (c.rows[t] > kMaxRows || c.colsb[t] > kMaxColsb) emu_fault("LDTILECFG: tile larger than 16 x 64 bytes");
  }
  emu.cfg = c;
  emu.configured = true;
  std::memset(emu.t, 0, sizeof(emu.t));
}
inline void tile_release() {
  emu.configured = false;
  std::memset(emu.t, 0, sizeof(emu.t));
}
inline void emu_check_tile(int t) {
  if (!emu.configured) emu_fault("tile instruction before LDTILECFG");
  if (emu.cfg.rows[t] == 0) emu_fault("tile instruction on an unconfigured tile");
}
// A tile row beyond colsb and rows beyond the configured count read as zero (and are kept zero).
template <int T> inline void tile_zero() {
  emu_check_tile(T);
  std::memset(emu.t[T], 0, sizeof(emu.t[T]));
}
template <int T> inline void tile_load(const void* p, int64_t stride) {
  emu_check_tile(T);
  const int rows = emu.cfg.rows[T], cb = emu.cfg.colsb[T];
  std::memset(emu.t[T], 0, sizeof(emu.t[T]));
  for (int r = 0; r < rows; ++r) std::memcpy(emu.t[T][r], static_cast<const uint8_t*>(p) + r * stride, size_t(cb));
}
template <int T> inline void tile_store(void* p, int64_t stride) {
  emu_check_tile(T);
  const int rows = emu.cfg.rows[T], cb = emu.cfg.colsb[T];
  for (int r = 0; r < rows; ++r) std::memcpy(static_cast<uint8_t*>(p) + r * stride, emu.t[T][r], size_t(cb));
}

// bf16 -> fp32 with DAZ (denormal inputs read as signed zero).
inline float emu_bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  if ((h & 0x7f80u) == 0) h &= 0x8000u;
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// FTZ: a denormal fp32 result becomes signed zero (branch-free, so the lane loops vectorize).
inline float emu_ftz(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u &= (u & 0x7f800000u) ? 0xffffffffu : 0x80000000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// TDPBF16PS C, A, B (SDM pseudocode): for m < C.rows, k < A.colsb / 4, n < C.colsb / 4:
//   C[m].fp32[n] += fp32(A[m].bf16[2k]) * fp32(B[k].bf16[2n])
//   C[m].fp32[n] += fp32(A[m].bf16[2k+1]) * fp32(B[k].bf16[2n+1])
// Products of two bf16 values are exact in fp32; each addition rounds to nearest even (the default
// mode this process runs in) and flushes a denormal sum. #UD unless the three tiles are distinct and
// the shapes agree: C.rows == A.rows, C.colsb == B.colsb, A.colsb == 4 * B.rows, all multiples of 4.
inline std::atomic<uint64_t> emu_dp_count{0};  // executed TDPBF16PS: lets tests see the tiles ran

template <int C, int A, int B> inline void tile_dpbf16ps() {
  static_assert(C != A && C != B && A != B, "TDPBF16PS needs three distinct tiles");
  static_assert(C >= 0 && C < kTiles && A >= 0 && A < kTiles && B >= 0 && B < kTiles, "tile index out of range");
  emu_check_tile(C);
  emu_check_tile(A);
  emu_check_tile(B);
  const TileConfig& c = emu.cfg;
  if (c.rows[C] != c.rows[A] || c.colsb[C] != c.colsb[B] || c.colsb[A] != 4 * c.rows[B] || c.colsb[C] % 4 ||
      c.colsb[A] % 4)
    emu_fault("TDPBF16PS: tile shapes do not agree");
  emu_dp_count.fetch_add(1, std::memory_order_relaxed);
  const int M = c.rows[C], KP = c.colsb[A] / 4, N = c.colsb[C] / 4;
  float b[16][2][16] = {};  // B as fp32, split by pair half; lanes >= N stay zero and are never stored
  for (int k = 0; k < KP; ++k)
    for (int n = 0; n < N; ++n) {
      b[k][0][n] = emu_bf16(&emu.t[B][k][4 * n]);
      b[k][1][n] = emu_bf16(&emu.t[B][k][4 * n + 2]);
    }
  for (int m = 0; m < M; ++m) {
    float acc[16];
    std::memcpy(acc, emu.t[C][m], 64);
    for (int k = 0; k < KP; ++k) {
      const float a0 = emu_bf16(&emu.t[A][m][4 * k]), a1 = emu_bf16(&emu.t[A][m][4 * k + 2]);
      for (int n = 0; n < 16; ++n) acc[n] = emu_ftz(acc[n] + a0 * b[k][0][n]);  // per lane: the 2k product
      for (int n = 0; n < 16; ++n) acc[n] = emu_ftz(acc[n] + a1 * b[k][1][n]);  // first, then the 2k+1 one
    }
    std::memcpy(emu.t[C][m], acc, size_t(4 * N));  // bytes past colsb stay zero
  }
}
constexpr bool kEmulated = true;
#endif

}  // namespace sparseprune::cpu::amx_tiles
