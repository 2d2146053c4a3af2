// bf16 tile kernels on AMX (TDPBF16PS), compiled twice (see CMakeLists.txt):
//  * SP_ISA=amx: real tiles (-mamx-tile -mamx-bf16 on top of the AVX-512-BF16 flags), run only when
//    the CPU has AMX-TILE/AMX-BF16 and Linux granted this process the tile state (dispatch.cpp);
//  * SP_ISA=amx_emu, SP_AMX_EMULATE=1: the same source on the scalar tile model of amx_tiles.h, run
//    on any x86-64 CPU when SPARSEPRUNE_CPU_ISA=amx_emulated (the tests use it; it is slow).
//
// Shapes. The weight is the A operand (M = output rows): a tile is mr <= 16 weight rows x kc <= 32
// inputs (bf16, row-major), which is how BSR blocks are stored, so their blocks feed the tiles as they
// are. 2:4 (Semi24, Hybrid) rows are expanded into dense bf16 tiles first (2:4 codes -> a per-byte
// table of lane indices -> one permute per 32 inputs), into a per-thread buffer that stays in L2 and
// serves every batch panel. x is the B operand: batch panels of 16 columns in the VNNI pair layout
// xP[k/2][16] (one 32-bit word = x[k] | x[k+1] << 16 per column), built once per call and shared.
// C tiles (fp32, mr x 16) accumulate over the whole K range of a strip of 2 row tiles and a pair of
// panels, so a strip is at most 2 x 2 C tiles + 2 A + 2 B tiles = the 8 tile registers. With a
// single panel (batch <= 16) only 2 C tiles are live and the A/B tiles are double-buffered, because
// tile registers are not renamed: a load into the tile the previous TDPBF16PS reads waits for it.
//
// Semantics match the other levels: products of bf16 values are exact in fp32, sums are fp32, the
// output is rounded once. A dense tile multiplies the zeros of a 2:4 row with the x values they skip,
// which would let a NaN/Inf input reach rows whose kept weights never touch it, so Semi24/Hybrid
// calls with a non-finite x are left to the AVX-512 path (the entry points return false).
// Malformed 2:4 codes (p0 == p1) put both values on one input: the second goes into a correction
// tile multiplied in the same step, so such codes are computed literally, as elsewhere.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "cpu/amx_tiles.h"
#include "cpu/kern_simd.h"
#include "cpu/kernels.h"

namespace sparseprune::cpu::SP_ISA {

using namespace amx_tiles;

namespace {

constexpr int kPanel = 16;           // batch columns per B tile (16 fp32 C columns = 64 bytes)
constexpr int kSuperPanels = 8;      // panels per x super-tile: 128 columns, 1 MB of pairs at K = 4096 (L2)
constexpr int kSpan = kSuperPanels * kPanel;
constexpr int kStepChunk = 128;      // K steps expanded per strip before the C tiles go to memory: 256 KB
constexpr int kTileElems = 16 * 32;  // one expanded A tile: 16 rows x 32 bf16, rows 64 bytes apart

// ------------------------------------------------------------------ 2:4 expansion
// For one meta byte (2 groups = 8 inputs, 4 kept values): per input lane, the index of its value
// among the 4 (plus 4 * byte position when used), or 16 = a lane of the zero half (not kept). A code
// p0 | p1 << 2 puts value 0 at p0 and value 1 at p1; with p0 == p1 value 0 is placed and the byte is
// flagged (value 1 then goes into the correction tile). p0 > p1 needs nothing special.
struct ExpandTable {
  uint16_t idx[256][8];
  uint8_t diag[256];
};
constexpr ExpandTable make_expand_table() {
  ExpandTable t{};
  for (int b = 0; b < 256; ++b) {
    t.diag[b] = 0;
    for (int j = 0; j < 8; ++j) {
      const int g = j / 4, p = j % 4, nib = (b >> (4 * g)) & 15, p0 = nib & 3, p1 = nib >> 2;
      t.idx[b][j] = uint16_t(p == p0 ? 2 * g : p == p1 ? 2 * g + 1 : 16);
      if (p0 == p1) t.diag[b] = 1;
    }
  }
  return t;
}
constexpr ExpandTable kExpand = make_expand_table();

typedef uint16_t v32u16 __attribute__((vector_size(64)));
typedef uint16_t v32u16u __attribute__((vector_size(64), aligned(2), may_alias));

// 32 inputs (8 groups): 16 stored values v, 4 meta bytes m -> 32 dense bf16 at out. Returns whether a
// group has p0 == p1. One permute (vpermw with AVX-512BW) over [16 values | 16 zeros].
SP_INLINE bool expand_row32(const uint16_t* v, const uint8_t* m, uint16_t* out) {
  uint32_t mw;
  std::memcpy(&mw, m, 4);
  v32u16 idx;
  for (int j = 0; j < 4; ++j) std::memcpy(reinterpret_cast<char*>(&idx) + 16 * j, kExpand.idx[(mw >> (8 * j)) & 255], 16);
  const v32u16 base = {0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 12, 12, 12, 12, 12, 12, 12, 12};
  idx += base;  // not-kept lanes go from 16 to 16..28: still the zero half
  v32u16 vals = {};
  std::memcpy(&vals, v, 32);
  *reinterpret_cast<v32u16u*>(out) = __builtin_shuffle(vals, idx);
  return kExpand.diag[mw & 255] | kExpand.diag[(mw >> 8) & 255] | kExpand.diag[(mw >> 16) & 255] |
         kExpand.diag[mw >> 24];
}

// ng < 8 groups (a partial K step or a narrow hybrid block), the rest of the 32 lanes zero. With
// diag_only, writes only value 1 of the p0 == p1 groups (the correction row). Reads exactly ng groups.
SP_INLINE bool expand_row_scalar(const uint16_t* v, const uint8_t* m, int64_t ng, uint16_t* out, bool diag_only) {
  std::memset(out, 0, 64);
  bool diag = false;
  for (int64_t g = 0; g < ng; ++g) {
    const unsigned nib = (m[g >> 1] >> ((g & 1) * 4)) & 15u, p0 = nib & 3u, p1 = nib >> 2;
    if (diag_only) {
      if (p0 == p1) out[4 * g + p0] = v[2 * g + 1];
      continue;
    }
    out[4 * g + p1] = v[2 * g + 1];
    out[4 * g + p0] = v[2 * g];  // last: value 0 wins when p0 == p1
    diag |= p0 == p1;
  }
  return diag;
}

// One expanded A tile: rows [0, nrows) of a 2:4 matrix (row r: values vals + r * vs, meta meta + r * ms,
// both already at this K step), ng <= 8 groups; rows nrows..15 zero. Returns whether a group has p0 == p1.
SP_INLINE bool expand_tile(const uint16_t* vals, int64_t vs, const uint8_t* meta, int64_t ms, int64_t nrows,
                           int64_t ng, uint16_t* out) {
  bool diag = false;
  if (ng == 8) {
    for (int64_t r = 0; r < nrows; ++r) diag |= expand_row32(vals + r * vs, meta + r * ms, out + r * 32);
  } else {
    for (int64_t r = 0; r < nrows; ++r) diag |= expand_row_scalar(vals + r * vs, meta + r * ms, ng, out + r * 32, false);
  }
  std::memset(out + nrows * 32, 0, size_t(16 - nrows) * 64);
  return diag;
}
SP_INLINE void expand_tile_diag(const uint16_t* vals, int64_t vs, const uint8_t* meta, int64_t ms, int64_t nrows,
                                int64_t ng, uint16_t* out) {
  for (int64_t r = 0; r < nrows; ++r) expand_row_scalar(vals + r * vs, meta + r * ms, ng, out + r * 32, true);
  std::memset(out + nrows * 32, 0, size_t(16 - nrows) * 64);
}

// ------------------------------------------------------------------ x as VNNI pair panels
// Panels [0, npan) of the super-tile starting at batch row b0: xP + pan * KP * 16, word [kp][j] =
// x[b0 + 16 pan + j][2kp] | x[..][2kp + 1] << 16; zero for batch rows >= B and for kp >= K / 2 (the
// K padding of Semi24). K is even. Called inside a parallel region (ends with the omp for barrier).
void pack_panels(const LinearProblem& p, int64_t b0, int64_t npan, int64_t KP, uint32_t* xP) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int64_t K = p.K, KH = K / 2;
  constexpr int64_t KB = 64;  // 64 pair rows x 64 bytes written per piece: stays in L1
  const int64_t nkb = (KP + KB - 1) / KB;
#pragma omp for schedule(dynamic, 4)
  for (int64_t u = 0; u < npan * nkb; ++u) {
    const int64_t pan = u / nkb, kb = (u % nkb) * KB, ke = std::min(KP, kb + KB), kv = std::min(ke, KH);
    uint32_t* dst = xP + pan * KP * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t b = b0 + pan * kPanel + j;
      int64_t kp = kb;
      if (b < p.B) {
        const uint16_t* xr = x + b * K;
        for (; kp < kv; ++kp) dst[kp * kPanel + j] = ld32(xr + 2 * kp);
      }
      for (; kp < ke; ++kp) dst[kp * kPanel + j] = 0;
    }
  }
}

// One pass over x (vectorized; threads from 64K values: at B = 4096, K = 4096 it is 32 MB).
bool all_finite_bf16(const uint16_t* x, int64_t n) {
  unsigned bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) bad |= (x[i] & 0x7f80u) == 0x7f80u;
  return !bad;
}

// ------------------------------------------------------------------ tile steps
// One K step of a strip: its A tiles (one per row tile; row stride astride bytes), optional
// correction A tiles (expanded, 64-byte rows), and the pair row of x the step starts at.
struct Step {
  const void* a[2];
  const void* corr[2];
  int64_t kp;
};

// Tile registers. Two layouts, fixed per call (the config gives each register its shape):
//  pairs (batch > 16): C(rt, pn) = 2 rt + pn (tiles 0-3), A(rt) = 4 + rt, B(pn) = 6 + pn;
//  single panel (batch <= 16): C(rt) = rt, A(rt) = 2 + rt in even steps and 4 + rt in odd ones,
//    B = 6 in even steps and 7 in odd ones (double-buffered: a load never waits on the last dot).
TileConfig make_config(int mr, int kc, bool single) {
  TileConfig c;
  if (single) {
    for (int t = 0; t < 2; ++t) c.set(t, mr, 64);
    for (int t = 2; t < 6; ++t) c.set(t, mr, 2 * kc);
  } else {
    for (int t = 0; t < 4; ++t) c.set(t, mr, 64);
    for (int t = 4; t < 6; ++t) c.set(t, mr, 2 * kc);
  }
  c.set(6, kc / 2, 64);
  c.set(7, kc / 2, 64);
  return c;
}

template <int RT, int PN>
SP_INLINE void step_pairs(const Step& e, int64_t astride, const uint32_t* x0, const uint32_t* x1) {
  tile_load<4>(e.a[0], astride);
  if constexpr (RT == 2) tile_load<5>(e.a[1], astride);
  tile_load<6>(x0 + e.kp * kPanel, 64);
  if constexpr (PN == 2) tile_load<7>(x1 + e.kp * kPanel, 64);
  tile_dpbf16ps<0, 4, 6>();
  if constexpr (PN == 2) tile_dpbf16ps<1, 4, 7>();
  if constexpr (RT == 2) tile_dpbf16ps<2, 5, 6>();
  if constexpr (RT == 2 && PN == 2) tile_dpbf16ps<3, 5, 7>();
  if (e.corr[0]) {  // malformed codes only
    tile_load<4>(e.corr[0], 64);
    if constexpr (RT == 2) tile_load<5>(e.corr[1], 64);
    tile_dpbf16ps<0, 4, 6>();
    if constexpr (PN == 2) tile_dpbf16ps<1, 4, 7>();
    if constexpr (RT == 2) tile_dpbf16ps<2, 5, 6>();
    if constexpr (RT == 2 && PN == 2) tile_dpbf16ps<3, 5, 7>();
  }
}

template <int RT, int SET> SP_INLINE void step_single(const Step& e, int64_t astride, const uint32_t* x0) {
  constexpr int A0 = SET ? 4 : 2, A1 = A0 + 1, Bt = SET ? 7 : 6;
  tile_load<A0>(e.a[0], astride);
  if constexpr (RT == 2) tile_load<A1>(e.a[1], astride);
  tile_load<Bt>(x0 + e.kp * kPanel, 64);
  tile_dpbf16ps<0, A0, Bt>();
  if constexpr (RT == 2) tile_dpbf16ps<1, A1, Bt>();
  if (e.corr[0]) {
    tile_load<A0>(e.corr[0], 64);
    if constexpr (RT == 2) tile_load<A1>(e.corr[1], 64);
    tile_dpbf16ps<0, A0, Bt>();
    if constexpr (RT == 2) tile_dpbf16ps<1, A1, Bt>();
  }
}

// C tiles <-> the strip's fp32 partial sums part[row][kSpan] (tile (rt, panel) at row rt * mr, column 16 panel).
template <int T> SP_INLINE void c_in(bool zero, const float* p) {
  if (zero) tile_zero<T>();
  else tile_load<T>(p, kSpan * 4);
}

// Runs steps [0, ns) of a chunk for the panels [pan, pan + PN) (pairs layout) or panel 0 (single
// layout). prep(s, step) fills step s first when do_prep (expansion happens once, for the first
// panel pair, interleaved with its tile work; later pairs reuse the expanded tiles).
template <int RT, int PN, bool SINGLE, class Prep>
void run_chunk(Prep& prep, bool do_prep, Step* st, int64_t ns, int64_t astride, const uint32_t* xp, int64_t KP,
               int64_t pan, int mr, bool first, float* part) {
  const uint32_t* x0 = xp + pan * KP * kPanel;
  const uint32_t* x1 = x0 + KP * kPanel;
  float* c0 = part + pan * kPanel;
  float* c1 = part + int64_t(mr) * kSpan + pan * kPanel;
  if constexpr (SINGLE) {
    c_in<0>(first, c0);
    if constexpr (RT == 2) c_in<1>(first, c1);
    int64_t s = 0;
    for (; s + 2 <= ns; s += 2) {
      if (do_prep) prep(s, st[s]);
      step_single<RT, 0>(st[s], astride, x0);
      if (do_prep) prep(s + 1, st[s + 1]);
      step_single<RT, 1>(st[s + 1], astride, x0);
    }
    if (s < ns) {
      if (do_prep) prep(s, st[s]);
      step_single<RT, 0>(st[s], astride, x0);
    }
    tile_store<0>(c0, kSpan * 4);
    if constexpr (RT == 2) tile_store<1>(c1, kSpan * 4);
  } else {
    c_in<0>(first, c0);
    if constexpr (PN == 2) c_in<1>(first, c0 + kPanel);
    if constexpr (RT == 2) c_in<2>(first, c1);
    if constexpr (RT == 2 && PN == 2) c_in<3>(first, c1 + kPanel);
    for (int64_t s = 0; s < ns; ++s) {
      if (do_prep) prep(s, st[s]);
      step_pairs<RT, PN>(st[s], astride, x0, x1);
    }
    tile_store<0>(c0, kSpan * 4);
    if constexpr (PN == 2) tile_store<1>(c0 + kPanel, kSpan * 4);
    if constexpr (RT == 2) tile_store<2>(c1, kSpan * 4);
    if constexpr (RT == 2 && PN == 2) tile_store<3>(c1 + kPanel, kSpan * 4);
  }
}

// One strip (RT row tiles of mr rows) against all panels of a super-tile: K steps in chunks of
// kStepChunk (C goes through part between chunks), panels in pairs; prep(s_abs, step) fills a step.
template <int RT, class Prep>
void run_strip(Prep&& prep, int64_t nsteps, int64_t astride, const uint32_t* xp, int64_t KP, int64_t npan,
               bool single, int mr, Step* st, float* part) {
  for (int64_t c0 = 0; c0 < nsteps; c0 += kStepChunk) {
    const int64_t ns = std::min<int64_t>(kStepChunk, nsteps - c0);
    auto p = [&](int64_t s, Step& e) { prep(c0 + s, s, e); };
    if (single) {
      run_chunk<RT, 1, true>(p, true, st, ns, astride, xp, KP, 0, mr, c0 == 0, part);
      continue;
    }
    for (int64_t pan = 0; pan < npan; pan += 2) {
      if (npan - pan >= 2) run_chunk<RT, 2, false>(p, pan == 0, st, ns, astride, xp, KP, pan, mr, c0 == 0, part);
      else run_chunk<RT, 1, false>(p, pan == 0, st, ns, astride, xp, KP, pan, mr, c0 == 0, part);
    }
  }
}

// Per-thread buffers: partial sums, the expanded tiles of a chunk and (only when malformed codes
// show up) their correction tiles.
struct ThreadBufs {
  Scratch part{2 * 16 * kSpan};
  std::unique_ptr<Scratch> abuf, cbuf;
  Step st[kStepChunk];
  uint16_t* expanded(int64_t s, int rt) {
    if (!abuf) abuf = std::make_unique<Scratch>(int64_t(kStepChunk) * 2 * kTileElems / 2);
    return reinterpret_cast<uint16_t*>(abuf->p) + (s * 2 + rt) * kTileElems;
  }
  uint16_t* correction(int64_t s, int rt) {
    if (!cbuf) cbuf = std::make_unique<Scratch>(int64_t(kStepChunk) * 2 * kTileElems / 2);
    return reinterpret_cast<uint16_t*>(cbuf->p) + (s * 2 + rt) * kTileElems;
  }
};

// The common driver: strips are handed out dynamically per x super-tile. strip(i, bufs, xp, KP, npan,
// single) runs strip i (and writes its outputs for the super-tile's batch rows).
template <class StripFn>
void drive(const LinearProblem& p, int64_t KP, int mr, int kc, int64_t nstrips, int64_t macs, StripFn&& strip) {
  const int64_t npan_all = (p.B + kPanel - 1) / kPanel;
  const int64_t sp = std::min<int64_t>(kSuperPanels, npan_all);
  const bool single = npan_all == 1;
  Scratch xbuf(sp * KP * kPanel);
  uint32_t* xp = reinterpret_cast<uint32_t*>(xbuf.p);
  const TileConfig cfg = make_config(mr, kc, single);
  const int64_t chunk = piece(nstrips);
#pragma omp parallel if (use_threads(macs))
  {
    tile_config(cfg);  // tile state is per thread
    ThreadBufs bufs;
    for (int64_t pan0 = 0; pan0 < npan_all; pan0 += sp) {
      const int64_t npan = std::min(sp, npan_all - pan0), b0 = pan0 * kPanel;
      const int64_t nb = std::min<int64_t>(npan * kPanel, p.B - b0);
      pack_panels(p, b0, npan, KP, xp);
#pragma omp for schedule(dynamic, chunk)
      for (int64_t i = 0; i < nstrips; ++i) strip(i, bufs, xp, npan, single, b0, nb);
      // implicit barrier: the panels are rewritten for the next super-tile
    }
    tile_release();  // the OS need not save 8 KB of tile state per context switch after this
  }
}

// Tile shape for a block: mr = largest divisor of bh <= 16, kc = largest divisor of bw <= 32 that is
// a multiple of `unit` (2: bf16 pairs; 8: a whole 2:4 meta byte). Too small a tile (< 1/4 of 16 x 32)
// wastes the unit: those shapes stay on the AVX-512 path (returns false).
bool block_tile_shape(int64_t bh, int64_t bw, int64_t unit, int* mr, int* kc) {
  *mr = 0;
  *kc = 0;
  for (int d = 16; d >= 1; --d)
    if (bh % d == 0) {
      *mr = d;
      break;
    }
  for (int d = 32; d >= int(unit); d -= int(unit))
    if (bw % d == 0) {
      *kc = d;
      break;
    }
  return *kc > 0 && *mr * *kc >= 128;
}

}  // namespace

// ================================================================== entry points
bool semi24_linear(const LinearProblem& p, const void* values, const uint8_t* meta, int64_t ms) {
  if (p.dtype != DType::BF16 || p.B <= 0 || p.N <= 0) return false;
  if (!all_finite_bf16(static_cast<const uint16_t*>(p.x), p.B * p.K)) return false;
  const uint16_t* v = static_cast<const uint16_t*>(values);
  const int64_t K = p.K, N = p.N, vs = K / 2, G = K / 4;
  const int64_t nsteps = (K + 31) / 32, KP = nsteps * 16;  // K padded to whole steps of 32 (zero pairs)
  const int64_t nstrips = (N + 31) / 32;
  drive(p, KP, 16, 32, nstrips, p.B * N * (K / 2),
        [&](int64_t i, ThreadBufs& tb, const uint32_t* xp, int64_t npan, bool single, int64_t b0, int64_t nb) {
          const int64_t n0 = i * 32, nr = std::min<int64_t>(32, N - n0);
          const int64_t rows[2] = {std::min<int64_t>(16, nr), std::max<int64_t>(0, nr - 16)};
          auto prep = [&](int64_t s, int64_t sl, Step& e) {
            const int64_t g0 = 8 * s, ng = std::min<int64_t>(8, G - g0);
            bool diag = false;
            for (int rt = 0; rt < 2; ++rt) {
              if (!rows[rt]) continue;
              const uint16_t* src = v + (n0 + 16 * rt) * vs + 2 * g0;
              const uint8_t* mrow = meta + (n0 + 16 * rt) * ms + g0 / 2;
              // 16 rows 8 KB apart, 36 bytes each per step: too many streams for the hardware
              // prefetcher; fetch each row's line 8 steps ahead (a line holds two steps of values).
              if (s % 2 == 0 && s + 8 < nsteps)
                for (int64_t r = 0; r < rows[rt]; ++r) __builtin_prefetch(src + r * vs + 128, 0, 1);
              if (s % 16 == 0 && s + 16 < nsteps)
                for (int64_t r = 0; r < rows[rt]; ++r) __builtin_prefetch(mrow + r * ms + 64, 0, 1);
              uint16_t* out = tb.expanded(sl, rt);
              diag |= expand_tile(src, vs, mrow, ms, rows[rt], ng, out);
              e.a[rt] = out;
            }
            e.kp = 16 * s;
            e.corr[0] = e.corr[1] = nullptr;
            if (diag) {
              for (int rt = 0; rt < 2; ++rt) {
                uint16_t* out = tb.correction(sl, rt);
                if (rows[rt])
                  expand_tile_diag(v + (n0 + 16 * rt) * vs + 2 * g0, vs, meta + (n0 + 16 * rt) * ms + g0 / 2, ms,
                                   rows[rt], ng, out);
                else
                  std::memset(out, 0, kTileElems * 2);
                e.corr[rt] = out;
              }
            }
          };
          if (rows[1]) run_strip<2>(prep, nsteps, 64, xp, KP, npan, single, 16, tb.st, tb.part.p);
          else run_strip<1>(prep, nsteps, 64, xp, KP, npan, single, 16, tb.st, tb.part.p);
          finalize<DType::BF16>(p, tb.part.p, n0, nr, b0, nb, kSpan);
        });
  return true;
}

namespace {
// BSR and hybrid: strips are pairs of row tiles inside a block row; steps run over the block row's
// blocks, kc inputs at a time.
template <bool SEMI>
bool block_linear(const LinearProblem& p, const uint16_t* v, const uint8_t* meta, const int32_t* crow,
                  const int32_t* col, int64_t bh, int64_t bw) {
  if (p.dtype != DType::BF16 || p.B <= 0 || p.N <= 0) return false;
  int mr, kc;
  if (!block_tile_shape(bh, bw, SEMI ? 8 : 2, &mr, &kc)) return false;
  if (SEMI && !all_finite_bf16(static_cast<const uint16_t*>(p.x), p.B * p.K)) return false;
  const int64_t nbr = p.N / bh, nrt = bh / mr, spb = (nrt + 1) / 2, nsub = bw / kc;
  const int64_t wlen = SEMI ? bh * (bw / 2) : bh * bw;  // stored values per block
  const int64_t KP = p.K / 2;
  drive(p, KP, mr, kc, nbr * spb, p.B * crow[nbr] * wlen,
        [&](int64_t i, ThreadBufs& tb, const uint32_t* xp, int64_t npan, bool single, int64_t b0, int64_t nb) {
          const int64_t br = i / spb, rt0 = (i % spb) * 2, rtn = std::min<int64_t>(2, nrt - rt0);
          const int64_t r0 = rt0 * mr, i0 = crow[br], nsteps = (crow[br + 1] - i0) * nsub;
          auto prep = [&](int64_t s, int64_t sl, Step& e) {
            const int64_t blk = i0 + s / nsub, u = s % nsub;
            e.kp = (int64_t(col[blk]) * bw + u * kc) / 2;
            e.corr[0] = e.corr[1] = nullptr;
            if constexpr (SEMI) {
              const uint16_t* src = v + blk * wlen + r0 * (bw / 2) + u * (kc / 2);
              const uint8_t* ms = meta + (blk * bh + r0) * (bw / 8) + u * (kc / 8);
              bool diag = false;
              for (int rt = 0; rt < rtn; ++rt) {
                uint16_t* out = tb.expanded(sl, rt);
                diag |= expand_tile(src + rt * mr * (bw / 2), bw / 2, ms + rt * mr * (bw / 8), bw / 8, mr, kc / 4, out);
                e.a[rt] = out;
              }
              if (diag)
                for (int rt = 0; rt < rtn; ++rt) {
                  uint16_t* out = tb.correction(sl, rt);
                  expand_tile_diag(src + rt * mr * (bw / 2), bw / 2, ms + rt * mr * (bw / 8), bw / 8, mr, kc / 4, out);
                  e.corr[rt] = out;
                }
            } else {
              const uint16_t* a = v + blk * wlen + r0 * bw + u * kc;
              e.a[0] = a;
              e.a[1] = a + mr * bw;
              if (u == 0 && blk + 1 < crow[br + 1]) {  // the next block's rows, while this one computes
                const char* nx = reinterpret_cast<const char*>(a + wlen);
                for (int64_t o = 0; o < rtn * mr * bw * 2; o += 64) __builtin_prefetch(nx + o, 0, 2);
              }
            }
          };
          const int64_t astride = SEMI ? 64 : 2 * bw;
          if (rtn == 2) run_strip<2>(prep, nsteps, astride, xp, KP, npan, single, mr, tb.st, tb.part.p);
          else run_strip<1>(prep, nsteps, astride, xp, KP, npan, single, mr, tb.st, tb.part.p);
          if (nsteps == 0) {  // an empty block row: C never went through the tiles
            for (int64_t r = 0; r < rtn * mr; ++r) std::memset(tb.part.p + r * kSpan, 0, sizeof(float) * kSpan);
          }
          finalize<DType::BF16>(p, tb.part.p, br * bh + r0, rtn * mr, b0, nb, kSpan);
        });
  return true;
}
}  // namespace

bool bsr_linear(const LinearProblem& p, const void* values, const int32_t* crow, const int32_t* col, int64_t bh,
                int64_t bw) {
  return block_linear<false>(p, static_cast<const uint16_t*>(values), nullptr, crow, col, bh, bw);
}

bool hybrid_linear(const LinearProblem& p, const void* values, const uint8_t* meta, const int32_t* crow,
                   const int32_t* col, int64_t bh, int64_t bw) {
  return block_linear<true>(p, static_cast<const uint16_t*>(values), meta, crow, col, bh, bw);
}

#if defined(SP_AMX_EMULATE)
uint64_t emulated_dot_count() { return emu_dp_count.load(); }
#endif

}  // namespace sparseprune::cpu::SP_ISA
