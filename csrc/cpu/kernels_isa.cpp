// Compiled once per ISA level (SP_ISA = generic | avx2 | avx512 | avx512bf16, see CMakeLists.txt).
// (bf16 on AMX tiles lives in amx_kernels.cpp; dispatch.cpp sends there what it takes.)
//
// Each op has two paths, chosen by batch size:
//  * small B (gemv_max_*): GEMV. Weights are streamed once; each row runs against groups of up to 4 x rows.
//  * otherwise: tiled. x is transposed into xT[K][BT] fp32 tiles (shared by the threads, up to 8
//    tiles at a time); pieces of output rows are handed out dynamically and run all those tiles.
// All sums are fp32; every output is rounded once to the dtype. At avx512bf16 the bf16 tiled path
// multiplies bf16 pairs with vdpbf16ps (exact products, fp32 sums) instead of widening first.
// Meta codes are 2 bits per position, so any byte value keeps reads inside their group of 4.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "cpu/kern_sparse.h"
#include "cpu/kernels.h"

namespace sparseprune::cpu::SP_ISA {

namespace {

// Largest batch served by the GEMV path (below: the tiled path); 1 thread, 4096x4096, thread CPU time.
// AVX-512, measured on Zen 4: the tiled path costs about the same from B=1 to 16 (per-weight overhead,
// 1 vector per x row), the GEMV grows with B; crossover semi24 and hybrid between 4 and 8, BSR between 2
// and 4 (semi24 re-measured, fp32 and bf16: tiled ~6.0 ms flat over B = 4..16, GEMV 5.9-6.3 ms at B = 4).
// AVX2, measured on Zen 3 (tiled time / GEMV time, > 1: the GEMV is faster): the tiled path has half
// the lanes and widens 16-bit weights block by block, so the GEMV wins longer: semi24 fp32 1.34 / 1.02 /
// 0.88 at B = 5 / 8-9 / 10, bf16 1.97 / 1.52 / 1.22 / 1.13 / 0.96 at B = 5 / 8 / 12 / 13 / 14; BSR 10%
// fp32 1.30 / 1.01 / 0.77 at B = 3 / 5 / 8, bf16 3.0 / 1.37 / 1.05 / 0.92 at B = 3 / 8 / 12 / 16; hybrid
// 25% fp32 1.24-1.55 / 0.91 at B = 3-4 / 5, bf16 1.22-1.33 / 1.08 / 0.86-1.01 at B = 5 / 6 / 8.
template <DType DT> constexpr int64_t gemv_max_semi() {
  if constexpr (VW == 8) return DT == DType::F32 ? 8 : 12;
  return 4;
}
template <DType DT> constexpr int64_t gemv_max_bsr() {
  if constexpr (VW == 8) return DT == DType::F32 ? 4 : 12;
  return 2;
}
template <DType DT> constexpr int64_t gemv_max_hybrid() {
  if constexpr (VW == 8) return DT == DType::F32 ? 4 : 6;
  return 4;
}
// SPARSEPRUNE_GEMV_MAX_BATCH=<n> replaces all three limits (to measure the crossover on another CPU).
SP_INLINE int64_t gemv_limit(int64_t dflt) { return env_batch("SPARSEPRUNE_GEMV_MAX_BATCH", dflt); }
constexpr int NBG = 4;  // x rows per GEMV pass: weights re-read (from L1/L2) once per 4 rows

// Semi24 tiled: rows in chunks of kRowChunk and K in tiles of kKTile. The xT sub-tile
// (kKTile x BT fp32 = 16 KB: 64 inputs on AVX-512, 128 on AVX2) stays in the 32 KB L1d for all rows of
// the chunk; the chunk's partial sums (32 KB) live in L2. Big chunks mean xT (1 MB at K=4096) is streamed
// from L3 only N/kRowChunk times per batch tile; N/128 chunks are still enough pieces to balance.
// (AVX2 had 64 inputs = 8 KB too: 128 made it 1.17-1.48x faster at B = 13..128, Zen 3; 256 and 512 less.)
constexpr int64_t kRowChunk = 128;
constexpr int64_t kKTile = 4096 / BT;

// x rows as fp32 for the GEMV path (x itself when it already is fp32).
template <DType DT> const float* x_as_f32(const LinearProblem& p, Scratch& buf) {
  if constexpr (DT == DType::F32) {
    return static_cast<const float*>(p.x);
  } else {
    const int64_t n = p.B * p.K;
    const T_<DT>* x = static_cast<const T_<DT>*>(p.x);
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; i += 4096) to_f32<DT>(x + i, std::min<int64_t>(4096, n - i), buf.p + i);
    return buf.p;
  }
}

// Transposes batch tiles [t0, t0 + ntile) of x into xT (tile t at xT + (t - t0) * K * BT, rows
// xT[k][0..BT)) as fp32; lanes past the last batch row up to a whole vector are zeroed (finite,
// never stored). Called inside a parallel region; ends with the implicit barrier of its omp for.
template <DType DT> void transpose_tiles(const LinearProblem& p, int64_t t0, int64_t ntile, float* xT) {
  const T_<DT>* x = static_cast<const T_<DT>*>(p.x);
  const int64_t K = p.K;
  constexpr int64_t KB = 32;  // 32 xT rows (8 KB) stay in L1 while the source rows are read
  const int64_t nkb = (K + KB - 1) / KB;
#pragma omp for schedule(dynamic, 8)
  for (int64_t u = 0; u < ntile * nkb; ++u) {
    const int64_t t = u / nkb, kb = (u % nkb) * KB, ke = std::min(K, kb + KB);
    const int64_t b0 = (t0 + t) * BT, nb = std::min<int64_t>(BT, p.B - b0), nvw = (nb + VW - 1) / VW * VW;
    float* xt = xT + t * K * BT;
    int64_t j = 0;
#if defined(__AVX2__)
    // Whole 8 x 8 blocks go through registers. The element-by-element copy below cost about 3 cycles
    // an element; with few output rows to share it (an im2col'd conv: N = 64, K = 576) it was half of
    // the kernel's time, and at N = 4 all of it.
    for (; j + 8 <= nb; j += 8) {
      const T_<DT>* xr = x + (b0 + j) * K;
      int64_t k = kb;
      for (; k + 8 <= ke; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = ld8<DT>(xr + i * K + k);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(xt + (k + i) * BT + j, r[i]);
      }
      for (; k < ke; ++k)
        for (int i = 0; i < 8; ++i) xt[k * BT + j + i] = lds<DT>(xr + i * K + k);
    }
#endif
    for (; j < nb; ++j) {
      const T_<DT>* xr = x + (b0 + j) * K;
      for (int64_t k = kb; k < ke; ++k) xt[k * BT + j] = lds<DT>(xr + k);
    }
    for (int64_t j = nb; j < nvw; ++j)
      for (int64_t k = kb; k < ke; ++k) xt[k * BT + j] = 0.f;
  }
}

// Batch tiles transposed per synchronisation (8 x K x BT fp32 = 8 MB at K=4096): each work piece
// then runs all of them, so its weights are reused from L2 and threads meet once per 8 tiles.
constexpr int64_t kSuperTiles = 8;

// How the tiled drivers hand out work. Normally each row piece (a chunk of rows, or a block row) runs
// every batch tile of a super-tile, so its weights are reused from L2. With fewer than two pieces per
// thread that leaves threads idle: the im2col'd GEMMs of convolutions have few output rows and many
// patches (ResNet-50 layer1 at batch 16: N = 64, B = 50176, one 128-row chunk: one busy thread). Then
// (piece, batch tile) pairs are handed out, and a super-tile holds more batch tiles (the bytes of
// base_st tiles at K = 4096, so no more memory than a wide layer uses) to meet less often.
struct TileSplit {
  bool pairs;
  int64_t st;  // batch tiles per super-tile
  int64_t items(int64_t pieces, int64_t nth) const { return pairs ? pieces * nth : pieces; }
  int64_t piece_of(int64_t it, int64_t nth) const { return pairs ? it / nth : it; }
  int64_t first_tile(int64_t it, int64_t nth) const { return pairs ? it % nth : 0; }
  int64_t end_tile(int64_t it, int64_t nth) const { return pairs ? it % nth + 1 : nth; }
};

TileSplit tile_split(int64_t pieces, int64_t ntiles, int64_t K, int64_t base_st) {
  const bool pairs = pieces < 2 * int64_t(omp_get_max_threads());
  const int64_t st = pairs ? std::max(base_st, base_st * 4096 / std::max<int64_t>(K, 1)) : base_st;
  return {pairs, std::min(st, ntiles)};
}

#define SP_NV_SWITCH(nv, call) \
  switch (nv) {                \
    case 1: call(1); break;    \
    case 2: call(2); break;    \
    case 3: call(3); break;    \
    default: call(4); break;   \
  }

// ================================================================== semi24
// GEMV: each weight row runs against every group of NBG x rows while it is in L1/L2, so weights come
// from DRAM once. (x rows, 16 KB each in fp32 at K = 4096, come from L2 when B >= 2. K-blocking them into
// L1 was tried on Zen 3: 16 rows x 1-2 KB tiles made 32 short interleaved streams that the prefetchers
// served worse, 1.3-1.5x slower at every B.)
template <int NB, DType DT>
void semi24_gemv_row(const LinearProblem& p, const T_<DT>* w, const uint8_t* m, const float* xf, int64_t n,
                     int64_t b0) {
  vf acc[2 * NB] = {};
  float sacc[NB] = {};
  semi_seg<NB, DT>(w, m, p.K / 4, xf + b0 * p.K, p.K, acc, sacc);
  for (int b = 0; b < NB; ++b) put<DT>(p, b0 + b, n, hsum(acc[b] + acc[NB + b]) + sacc[b]);
}

template <DType DT> void semi24_gemv(const LinearProblem& p, const T_<DT>* values, const uint8_t* meta, int64_t ms) {
  Scratch xbuf(DT == DType::F32 ? 1 : p.B * p.K);
  const float* xf = x_as_f32<DT>(p, xbuf);
  const int64_t K = p.K, chunk = piece(p.N);
#pragma omp parallel for schedule(dynamic, chunk) if (use_threads(p.B * p.N * (K / 2)))
  for (int64_t n = 0; n < p.N; ++n) {
    const T_<DT>* w = values + n * (K / 2);
    const uint8_t* m = meta + n * ms;
    for (int64_t b0 = 0; b0 < p.B; b0 += NBG) {
      switch (std::min<int64_t>(NBG, p.B - b0)) {
        case 1: semi24_gemv_row<1, DT>(p, w, m, xf, n, b0); break;
        case 2: semi24_gemv_row<2, DT>(p, w, m, xf, n, b0); break;
        case 3: semi24_gemv_row<3, DT>(p, w, m, xf, n, b0); break;
        default: semi24_gemv_row<4, DT>(p, w, m, xf, n, b0); break;
      }
    }
  }
}

// Rows [r0, r0+nr) of a 2:4 segment: w[r] / m[r] point at the segment start of row r.
template <int NV> void semi_rows(const float* const* w, const uint8_t* const* m, int64_t nr, int64_t ng,
                                 const float* xs, float* part) {
  int64_t r = 0;
  for (; r + RB <= nr; r += RB) semi_tile<RB, NV>(w + r, m + r, ng, xs, part + r * BT);
  for (; r < nr; ++r) semi_tile<1, NV>(w + r, m + r, ng, xs, part + r * BT);
}

template <DType DT>
void semi24_tiled(const LinearProblem& p, const T_<DT>* values, const uint8_t* meta, int64_t ms) {
  const int64_t K = p.K, N = p.N, G = K / 4;
  const int64_t ntiles = (p.B + BT - 1) / BT, nchunks = (N + kRowChunk - 1) / kRowChunk;
  const TileSplit sp = tile_split(nchunks, ntiles, K, kSuperTiles);
  const int64_t st = sp.st;
  Scratch xT(st * K * BT);
#pragma omp parallel if (use_threads(p.B * N * (K / 2)))
  {
    Scratch part(kRowChunk * BT);
    Scratch wconv(DT == DType::F32 ? 1 : kRowChunk * kKTile / 2);
    const float* wp[kRowChunk];
    const uint8_t* mp[kRowChunk];
    for (int64_t t0 = 0; t0 < ntiles; t0 += st) {
      const int64_t nth = std::min(st, ntiles - t0);
      transpose_tiles<DT>(p, t0, nth, xT.p);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < sp.items(nchunks, nth); ++it) {
        const int64_t c0 = sp.piece_of(it, nth) * kRowChunk, nr = std::min(kRowChunk, N - c0);
        for (int64_t t = sp.first_tile(it, nth); t < sp.end_tile(it, nth); ++t) {
          const int64_t b0 = (t0 + t) * BT, nb = std::min<int64_t>(BT, p.B - b0), nv = (nb + VW - 1) / VW;
          const float* xtile = xT.p + t * K * BT;
          std::memset(part.p, 0, sizeof(float) * kRowChunk * BT);
          for (int64_t g0 = 0; g0 < G; g0 += kKTile / 4) {
            const int64_t ng = std::min(kKTile / 4, G - g0);
            const float* xs = xtile + 4 * g0 * BT;
            for (int64_t r0 = 0; r0 < nr; r0 += RB) {
              const int64_t rg = std::min<int64_t>(RB, nr - r0);
              for (int64_t r = r0; r < r0 + rg; ++r) {
                const T_<DT>* src = values + (c0 + r) * (K / 2) + 2 * g0;
                // Rows are 8 KB apart and only a short piece of each is read per K tile: too many
                // streams for the hardware prefetcher (profiled: the weight loads stalled), so
                // prefetch this row's next K tile now, spread over the loop so none are dropped.
                if (g0 + kKTile / 4 < G) {
                  const char* nx = reinterpret_cast<const char*>(src + kKTile / 2);
                  for (int64_t o = 0; o < int64_t(sizeof(T_<DT>)) * kKTile / 2; o += 64)
                    __builtin_prefetch(nx + o, 0, 2);
                  __builtin_prefetch(meta + (c0 + r) * ms + (g0 + kKTile / 4) / 2, 0, 2);
                }
                if constexpr (DT == DType::F32) {
                  wp[r] = src;
                } else {
                  float* d = wconv.p + r * (kKTile / 2);
                  to_f32<DT>(src, 2 * ng, d);
                  wp[r] = d;
                }
                mp[r] = meta + (c0 + r) * ms + g0 / 2;  // g0 is a multiple of 16: byte aligned
              }
#define SP_CALL(NV) semi_rows<NV>(wp + r0, mp + r0, rg, ng, xs, part.p + r0 * BT)
              SP_NV_SWITCH(nv, SP_CALL)
#undef SP_CALL
            }
          }
          finalize<DT>(p, part.p, c0, nr, b0, nb);
        }
      }  // implicit barrier: xT is rewritten for the next super-tile
    }
  }
}

#if defined(__AVX512BF16__)
// ================================================================== bf16 tiles with vdpbf16ps
// Same drivers as the fp32 tiles, but x is laid out as bf16 pair words (kern_sparse.h) and the
// weights are used as stored (pairs of bf16), so nothing is widened to fp32 before the FMA.

// Pair rows xP[kp][BT] (word = x[2kp] | x[2kp+1] << 16) of batch tiles [t0, t0 + ntile), tile t at
// xP + t * (K / 2) * BT; K even. Lanes past the last batch row up to a whole vector are zero.
void pair_tiles(const LinearProblem& p, int64_t t0, int64_t ntile, uint32_t* xP) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int64_t KP = p.K / 2;
  constexpr int64_t KB = 32;
  const int64_t nkb = (KP + KB - 1) / KB;
#pragma omp for schedule(dynamic, 8)
  for (int64_t u = 0; u < ntile * nkb; ++u) {
    const int64_t t = u / nkb, kb = (u % nkb) * KB, ke = std::min(KP, kb + KB);
    const int64_t b0 = (t0 + t) * BT, nb = std::min<int64_t>(BT, p.B - b0), nvw = (nb + VW - 1) / VW * VW;
    uint32_t* xt = xP + t * KP * BT;
    for (int64_t j = 0; j < nb; ++j) {
      const uint16_t* xr = x + (b0 + j) * p.K;
      for (int64_t k = kb; k < ke; ++k) xt[k * BT + j] = ld32(xr + 2 * k);
    }
    for (int64_t j = nb; j < nvw; ++j)
      for (int64_t k = kb; k < ke; ++k) xt[k * BT + j] = 0;
  }
}

// 2:4 pair tables (xC[G][6][BT], then xD[G][4][BT], see kern_sparse.h) of batch tiles [t0, t0 + ntile), tile t at xC + t * G * kCombos * BT.
void combo_tiles(const LinearProblem& p, int64_t t0, int64_t ntile, uint32_t* xC) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int64_t G = p.K / 4;
  constexpr int64_t GB = 8;  // 8 groups x 10 slots x 256 B = 20 KB written per piece, stays in L1
  const int64_t ngb = (G + GB - 1) / GB;
#pragma omp for schedule(dynamic, 8)
  for (int64_t u = 0; u < ntile * ngb; ++u) {
    const int64_t t = u / ngb, gb = (u % ngb) * GB, ge = std::min(G, gb + GB);
    const int64_t b0 = (t0 + t) * BT, nb = std::min<int64_t>(BT, p.B - b0), nvw = (nb + VW - 1) / VW * VW;
    uint32_t* xt = xC + t * G * kCombos * BT;
    for (int64_t j = 0; j < nb; ++j) {
      const uint16_t* xr = x + (b0 + j) * p.K;
      for (int64_t g = gb; g < ge; ++g) {
        const uint32_t a = xr[4 * g], b = xr[4 * g + 1], c = xr[4 * g + 2], d = xr[4 * g + 3];
        uint32_t* o = xt + g * kSlots * BT + j;
        o[0 * BT] = a | b << 16;
        o[1 * BT] = a | c << 16;
        o[2 * BT] = a | d << 16;
        o[3 * BT] = b | c << 16;
        o[4 * BT] = b | d << 16;
        o[5 * BT] = c | d << 16;
        uint32_t* od = xt + G * kSlots * BT + g * kDiag * BT + j;
        od[0 * BT] = a | a << 16;
        od[1 * BT] = b | b << 16;
        od[2 * BT] = c | c << 16;
        od[3 * BT] = d | d << 16;
      }
    }
    for (int64_t j = nb; j < nvw; ++j)
      for (int64_t g = gb; g < ge; ++g) {
        for (int s = 0; s < kSlots; ++s) xt[(g * kSlots + s) * BT + j] = 0;
        for (int s = 0; s < kDiag; ++s) xt[(G * kSlots + g * kDiag + s) * BT + j] = 0;
      }
  }
}

// The pair tables are 2.5x the size of fp32 xT: fewer batch tiles per synchronisation.
constexpr int64_t kSuperTilesBf16 = 4;

template <int NV> void semi_rows_bf16(const uint32_t* wp, const int32_t* op, int64_t nr, int64_t ng,
                                      const uint32_t* xs, float* part) {
  int64_t r = 0;
  for (; r + RB <= nr; r += RB) semi_tile_bf16<RB, NV>(wp + r * kPrepG, op + r * kPrepG, ng, xs, part + r * BT);
  for (; r < nr; ++r) semi_tile_bf16<1, NV>(wp + r * kPrepG, op + r * kPrepG, ng, xs, part + r * BT);
}

// Groups per K tile of the bf16 semi24 tiles (<= kPrepG, even): the table rows of one K tile
// (kSemiGBf16 x 6 x 256 B) are reused by all rows of a chunk from L1.
#ifndef SP_SEMI_G_BF16
#define SP_SEMI_G_BF16 16
#endif
constexpr int64_t kSemiGBf16 = SP_SEMI_G_BF16;

void semi24_tiled_bf16(const LinearProblem& p, const uint16_t* values, const uint8_t* meta, int64_t ms) {
  const int64_t K = p.K, N = p.N, G = K / 4;
  const int64_t ntiles = (p.B + BT - 1) / BT, nchunks = (N + kRowChunk - 1) / kRowChunk;
  const TileSplit sp = tile_split(nchunks, ntiles, K, kSuperTilesBf16);
  const int64_t st = sp.st, tsz = G * kCombos * BT;
  Scratch xC(st * tsz);
  uint32_t* xc = reinterpret_cast<uint32_t*>(xC.p);
#pragma omp parallel if (use_threads(p.B * N * (K / 2)))
  {
    Scratch part(kRowChunk * BT);
    Scratch ent(4 * RB * kPrepG);
    uint32_t* wp = reinterpret_cast<uint32_t*>(ent.p);
    int32_t* op = reinterpret_cast<int32_t*>(ent.p + 2 * RB * kPrepG);
    for (int64_t t0 = 0; t0 < ntiles; t0 += st) {
      const int64_t nth = std::min(st, ntiles - t0);
      combo_tiles(p, t0, nth, xc);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < sp.items(nchunks, nth); ++it) {
        const int64_t c0 = sp.piece_of(it, nth) * kRowChunk, nr = std::min(kRowChunk, N - c0);
        for (int64_t t = sp.first_tile(it, nth); t < sp.end_tile(it, nth); ++t) {
          const int64_t b0 = (t0 + t) * BT, nb = std::min<int64_t>(BT, p.B - b0), nv = (nb + VW - 1) / VW;
          std::memset(part.p, 0, sizeof(float) * kRowChunk * BT);
          for (int64_t g0 = 0; g0 < G; g0 += kSemiGBf16) {
            const int64_t ng = std::min<int64_t>(kSemiGBf16, G - g0);
            const uint32_t* xs = xc + t * tsz + g0 * kSlots * BT;
            const int32_t dbase = int32_t(G * kSlots * BT + g0 * (kDiag - kSlots) * BT);
            // Entries are prepared one row group ahead (double buffer): the tile reads them as scalars,
            // and a scalar load right after the vector store that wrote it stalls on forwarding.
            auto prep = [&](int64_t r0, int buf) {
              const int64_t rg = std::min<int64_t>(RB, nr - r0);
              for (int64_t r = r0; r < r0 + rg; ++r) {
                const uint16_t* src = values + (c0 + r) * (K / 2) + 2 * g0;
                const uint8_t* mr = meta + (c0 + r) * ms + g0 / 2;
                if (g0 + kSemiGBf16 < G) {  // see semi24_tiled: prefetch this row's next K tile
                  __builtin_prefetch(src + 2 * kSemiGBf16, 0, 2);
                  __builtin_prefetch(mr + kSemiGBf16 / 2, 0, 2);
                }
                semi_prep_bf16(src, mr, ng, dbase, wp + (buf * RB + r - r0) * kPrepG, op + (buf * RB + r - r0) * kPrepG);
              }
            };
            prep(0, 0);
            int buf = 0;
            for (int64_t r0 = 0; r0 < nr; r0 += RB, buf ^= 1) {
              const int64_t rg = std::min<int64_t>(RB, nr - r0);
              if (r0 + RB < nr) prep(r0 + RB, buf ^ 1);
              const uint32_t* wpb = wp + buf * RB * kPrepG;
              const int32_t* opb = op + buf * RB * kPrepG;
#define SP_CALL(NV) semi_rows_bf16<NV>(wpb, opb, rg, ng, xs, part.p + r0 * BT)
              SP_NV_SWITCH(nv, SP_CALL)
#undef SP_CALL
            }
          }
          finalize<DType::BF16>(p, part.p, c0, nr, b0, nb);
        }
      }  // implicit barrier: xC is rewritten for the next super-tile
    }
  }
}
#endif  // __AVX512BF16__

template <DType DT> void semi24_impl(const LinearProblem& p, const void* values, const uint8_t* meta, int64_t ms) {
  const T_<DT>* v = static_cast<const T_<DT>*>(values);
  if (p.B <= gemv_limit(gemv_max_semi<DT>())) semi24_gemv<DT>(p, v, meta, ms);
#if defined(__AVX512BF16__)
  else if constexpr (DT == DType::BF16) semi24_tiled_bf16(p, v, meta, ms);
#endif
  else semi24_tiled<DT>(p, v, meta, ms);
}

// ================================================================== BSR and hybrid (shared drivers)
// Block-outer GEMV: for each block of a block row, all its rows accumulate into per-row vectors
// kept in a small L1 buffer, so the weights stream strictly sequentially.
template <bool SEMI, int NB, DType DT>
void block_gemv_rows(const LinearProblem& p, const T_<DT>* values, const uint8_t* meta, const int32_t* crow,
                     const int32_t* col, int64_t bh, int64_t bw, int64_t br, const float* xf, int64_t b0, vf* vacc,
                     float* sacc) {
  const int64_t K = p.K;
  std::memset(static_cast<void*>(vacc), 0, sizeof(vf) * 2 * NB * bh);
  std::memset(sacc, 0, sizeof(float) * NB * bh);
  const float* xb = xf + b0 * K;
  for (int64_t i = crow[br]; i < crow[br + 1]; ++i) {
    const float* xs = xb + int64_t(col[i]) * bw;
    for (int64_t r = 0; r < bh; ++r) {
      if constexpr (SEMI)
        semi_seg<NB, DT>(values + (i * bh + r) * (bw / 2), meta + (i * bh + r) * (bw / 8), bw / 4, xs, K,
                         vacc + r * 2 * NB, sacc + r * NB);
      else
        dense_seg<NB, DT>(values + (i * bh + r) * bw, bw, xs, K, vacc + r * 2 * NB, sacc + r * NB);
    }
  }
  for (int64_t r = 0; r < bh; ++r)
    for (int b = 0; b < NB; ++b)
      put<DT>(p, b0 + b, br * bh + r, hsum(vacc[r * 2 * NB + b] + vacc[r * 2 * NB + NB + b]) + sacc[r * NB + b]);
}

template <bool SEMI, DType DT>
void block_gemv(const LinearProblem& p, const T_<DT>* values, const uint8_t* meta, const int32_t* crow,
                const int32_t* col, int64_t bh, int64_t bw) {
  Scratch xbuf(DT == DType::F32 ? 1 : p.B * p.K);
  const float* xf = x_as_f32<DT>(p, xbuf);
  const int64_t nbr = p.N / bh;
  const int64_t chunk = piece(nbr);
#pragma omp parallel if (use_threads(p.B * crow[nbr] * (SEMI ? bh * (bw / 2) : bh * bw)))
  {
    Scratch vbuf(int64_t(sizeof(vf) / 4) * 2 * NBG * bh);
    Scratch sbuf(NBG * bh);
    vf* vacc = reinterpret_cast<vf*>(vbuf.p);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t br = 0; br < nbr; ++br)
      for (int64_t b0 = 0; b0 < p.B; b0 += NBG) {
        switch (std::min<int64_t>(NBG, p.B - b0)) {
          case 1: block_gemv_rows<SEMI, 1, DT>(p, values, meta, crow, col, bh, bw, br, xf, b0, vacc, sbuf.p); break;
          case 2: block_gemv_rows<SEMI, 2, DT>(p, values, meta, crow, col, bh, bw, br, xf, b0, vacc, sbuf.p); break;
          case 3: block_gemv_rows<SEMI, 3, DT>(p, values, meta, crow, col, bh, bw, br, xf, b0, vacc, sbuf.p); break;
          default: block_gemv_rows<SEMI, 4, DT>(p, values, meta, crow, col, bh, bw, br, xf, b0, vacc, sbuf.p); break;
        }
      }
  }
}

template <int NV> void bsr_rows(const float* w, int64_t bh, int64_t bw, const float* xs, float* part) {
  int64_t r = 0;
  for (; r + RB <= bh; r += RB) bsr_tile<RB, NV>(w + r * bw, bw, bw, xs, part + r * BT);
  for (; r < bh; ++r) bsr_tile<1, NV>(w + r * bw, bw, bw, xs, part + r * BT);
}

// Tiled BSR / hybrid: block-outer within a block row; the block row's partial sums part[bh][BT]
// stay in L1 and the block's xT rows (bw x BT) are reused by all its row groups.
template <bool SEMI, DType DT>
void block_tiled(const LinearProblem& p, const T_<DT>* values, const uint8_t* meta, const int32_t* crow,
                 const int32_t* col, int64_t bh, int64_t bw) {
  const int64_t nbr = p.N / bh;
  const int64_t wlen = SEMI ? bh * (bw / 2) : bh * bw;  // stored values per block
  const int64_t K = p.K, ntiles = (p.B + BT - 1) / BT;
  const TileSplit sp = tile_split(nbr, ntiles, K, kSuperTiles);
  const int64_t st = sp.st, chunk = sp.pairs ? 1 : piece(nbr);
  Scratch xT(st * K * BT);
#pragma omp parallel if (use_threads(p.B * crow[nbr] * wlen))
  {
    Scratch part(bh * BT);
    Scratch wconv(DT == DType::F32 ? 1 : wlen);
    std::unique_ptr<const float*[]> wp(new const float*[SEMI ? bh : 1]);
    std::unique_ptr<const uint8_t*[]> mp(new const uint8_t*[SEMI ? bh : 1]);
    for (int64_t t0 = 0; t0 < ntiles; t0 += st) {
      const int64_t nth = std::min(st, ntiles - t0);
      transpose_tiles<DT>(p, t0, nth, xT.p);
#pragma omp for schedule(dynamic, chunk)
      for (int64_t it = 0; it < sp.items(nbr, nth); ++it) {
        const int64_t br = sp.piece_of(it, nth);
        for (int64_t t = sp.first_tile(it, nth); t < sp.end_tile(it, nth); ++t) {
          const int64_t b0 = (t0 + t) * BT, nb = std::min<int64_t>(BT, p.B - b0), nv = (nb + VW - 1) / VW;
          const float* xtile = xT.p + t * K * BT;
          std::memset(part.p, 0, sizeof(float) * bh * BT);
          for (int64_t i = crow[br]; i < crow[br + 1]; ++i) {
            const float* w;
            if constexpr (DT == DType::F32) {
              w = values + i * wlen;
            } else {
              to_f32<DT>(values + i * wlen, wlen, wconv.p);
              w = wconv.p;
            }
            const float* xs = xtile + int64_t(col[i]) * bw * BT;
            if constexpr (SEMI) {
              for (int64_t r = 0; r < bh; ++r) {
                wp[r] = w + r * (bw / 2);
                mp[r] = meta + (i * bh + r) * (bw / 8);
              }
#define SP_CALL(NV) semi_rows<NV>(wp.get(), mp.get(), bh, bw / 4, xs, part.p)
              SP_NV_SWITCH(nv, SP_CALL)
#undef SP_CALL
            } else {
#define SP_CALL(NV) bsr_rows<NV>(w, bh, bw, xs, part.p)
              SP_NV_SWITCH(nv, SP_CALL)
#undef SP_CALL
            }
          }
          finalize<DT>(p, part.p, br * bh, bh, b0, nb);
        }
      }  // implicit barrier: xT is rewritten for the next super-tile
    }
  }
}

#if defined(__AVX512BF16__)
template <int NV> void bsr_rows_bf16(const uint16_t* w, int64_t bh, int64_t bw, const uint32_t* xs, float* part) {
  int64_t r = 0;
  for (; r + RB <= bh; r += RB) bsr_tile_bf16<RB, NV>(w + r * bw, bw, bw / 2, xs, part + r * BT);
  for (; r < bh; ++r) bsr_tile_bf16<1, NV>(w + r * bw, bw, bw / 2, xs, part + r * BT);
}

// block_tiled for bf16 with vdpbf16ps. BSR needs an even block width (pairs of inputs); hybrid
// widths are multiples of 8. Weights are read as stored: no per-block conversion.
template <bool SEMI>
void block_tiled_bf16(const LinearProblem& p, const uint16_t* values, const uint8_t* meta, const int32_t* crow,
                      const int32_t* col, int64_t bh, int64_t bw) {
  const int64_t nbr = p.N / bh;
  const int64_t wlen = SEMI ? bh * (bw / 2) : bh * bw;
  const int64_t K = p.K, G = K / 4, ntiles = (p.B + BT - 1) / BT;
  const TileSplit sp = tile_split(nbr, ntiles, K, SEMI ? kSuperTilesBf16 : kSuperTiles);
  const int64_t st = sp.st, chunk = sp.pairs ? 1 : piece(nbr);
  const int64_t tsz = SEMI ? (K / 4) * kCombos * BT : (K / 2) * BT;
  Scratch xT(st * tsz);
  uint32_t* xt = reinterpret_cast<uint32_t*>(xT.p);
#pragma omp parallel if (use_threads(p.B * crow[nbr] * wlen))
  {
    Scratch part(bh * BT);
    Scratch ent(SEMI ? 2 * bh * kPrepG : 1);
    uint32_t* wp = reinterpret_cast<uint32_t*>(ent.p);
    int32_t* op = reinterpret_cast<int32_t*>(ent.p + bh * kPrepG);
    for (int64_t t0 = 0; t0 < ntiles; t0 += st) {
      const int64_t nth = std::min(st, ntiles - t0);
      if constexpr (SEMI) combo_tiles(p, t0, nth, xt);
      else pair_tiles(p, t0, nth, xt);
#pragma omp for schedule(dynamic, chunk)
      for (int64_t it = 0; it < sp.items(nbr, nth); ++it) {
        const int64_t br = sp.piece_of(it, nth);
        for (int64_t t = sp.first_tile(it, nth); t < sp.end_tile(it, nth); ++t) {
          const int64_t b0 = (t0 + t) * BT, nb = std::min<int64_t>(BT, p.B - b0), nv = (nb + VW - 1) / VW;
          const uint32_t* xtile = xt + t * tsz;
          std::memset(part.p, 0, sizeof(float) * bh * BT);
          for (int64_t i = crow[br]; i < crow[br + 1]; ++i) {
            const uint16_t* w = values + i * wlen;
            if constexpr (SEMI) {
              // The pair rows a block reads depend on its codes, which the hardware prefetcher cannot
              // follow: fetch the next block's segment while this one computes.
              if (i + 1 < crow[br + 1]) prefetch_pairs(xtile + int64_t(col[i + 1]) * (bw / 4) * kSlots * BT, bw / 4, int(nv));
              for (int64_t gc = 0; gc < bw / 4; gc += kPrepG) {
                const int64_t ng = std::min<int64_t>(kPrepG, bw / 4 - gc), gs = int64_t(col[i]) * (bw / 4) + gc;
                const int32_t dbase = int32_t(G * kSlots * BT + gs * (kDiag - kSlots) * BT);
                for (int64_t r = 0; r < bh; ++r)
                  semi_prep_bf16(w + r * (bw / 2) + 2 * gc, meta + (i * bh + r) * (bw / 8) + gc / 2, ng, dbase,
                                 wp + r * kPrepG, op + r * kPrepG);
                const uint32_t* xs = xtile + gs * kSlots * BT;
#define SP_CALL(NV) semi_rows_bf16<NV>(wp, op, bh, ng, xs, part.p)
                SP_NV_SWITCH(nv, SP_CALL)
#undef SP_CALL
              }
            } else {
              const uint32_t* xs = xtile + int64_t(col[i]) * (bw / 2) * BT;
#define SP_CALL(NV) bsr_rows_bf16<NV>(w, bh, bw, xs, part.p)
              SP_NV_SWITCH(nv, SP_CALL)
#undef SP_CALL
            }
          }
          finalize<DType::BF16>(p, part.p, br * bh, bh, b0, nb);
        }
      }  // implicit barrier: the tables are rewritten for the next super-tile
    }
  }
}
#endif  // __AVX512BF16__

template <bool SEMI, DType DT>
void block_impl(const LinearProblem& p, const void* values, const uint8_t* meta, const int32_t* crow,
                const int32_t* col, int64_t bh, int64_t bw) {
  const T_<DT>* v = static_cast<const T_<DT>*>(values);
  if (p.B <= gemv_limit(SEMI ? gemv_max_hybrid<DT>() : gemv_max_bsr<DT>()))
    block_gemv<SEMI, DT>(p, v, meta, crow, col, bh, bw);
#if defined(__AVX512BF16__)
  else if constexpr (DT == DType::BF16) {
    if (SEMI || bw % 2 == 0) block_tiled_bf16<SEMI>(p, v, meta, crow, col, bh, bw);
    else block_tiled<SEMI, DT>(p, v, meta, crow, col, bh, bw);
  }
#endif
  else block_tiled<SEMI, DT>(p, v, meta, crow, col, bh, bw);
}

}  // namespace

void semi24_linear(const LinearProblem& p, const void* values, const uint8_t* meta, int64_t meta_stride) {
  if (p.B <= 0 || p.N <= 0) return;
  switch (p.dtype) {
    case DType::F32: return semi24_impl<DType::F32>(p, values, meta, meta_stride);
    case DType::BF16: return semi24_impl<DType::BF16>(p, values, meta, meta_stride);
    default: return semi24_impl<DType::F16>(p, values, meta, meta_stride);
  }
}

void bsr_linear(const LinearProblem& p, const void* values, const int32_t* crow, const int32_t* col, int64_t bh,
                int64_t bw) {
  if (p.B <= 0 || p.N <= 0) return;
  switch (p.dtype) {
    case DType::F32: return block_impl<false, DType::F32>(p, values, nullptr, crow, col, bh, bw);
    case DType::BF16: return block_impl<false, DType::BF16>(p, values, nullptr, crow, col, bh, bw);
    default: return block_impl<false, DType::F16>(p, values, nullptr, crow, col, bh, bw);
  }
}

void hybrid_linear(const LinearProblem& p, const void* values, const uint8_t* meta, const int32_t* crow,
                   const int32_t* col, int64_t bh, int64_t bw) {
  if (p.B <= 0 || p.N <= 0) return;
  switch (p.dtype) {
    case DType::F32: return block_impl<true, DType::F32>(p, values, meta, crow, col, bh, bw);
    case DType::BF16: return block_impl<true, DType::BF16>(p, values, meta, crow, col, bh, bw);
    default: return block_impl<true, DType::F16>(p, values, meta, crow, col, bh, bw);
  }
}

}  // namespace sparseprune::cpu::SP_ISA
