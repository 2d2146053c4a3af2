// C interface of the emulator library (build/cuda_emu/libsp_cuda_emu.so), called from the tests through ctypes
// (tests/test_cuda_emu.py). Every entry point copies its inputs into guarded allocations (see emu_core.cpp),
// runs the same host planner and launcher the .cu files run, copies the outputs back and returns 0, or returns
// non-zero with a message in err.
#pragma once
#include <cstdint>

extern "C" {

// The emulated device: what the planners see (num_sms, smem_optin) and how the emulator schedules fibers.
struct sp_emu_device {
  int num_sms;     // multiProcessorCount
  int smem_optin;  // sharedMemPerBlockOptin
  int schedule;    // order fibers run in each round: 0 forward, 1 reverse, 2 seeded random
  uint64_t seed;
  int placement;   // 0: each buffer ends at a guard page (overruns fault); 1: each starts at one (underruns fault)
};

// A host buffer handed to a kernel: copied into a guarded allocation named `name`, at an address that is
// `align`-aligned plus `misalign` bytes (misalign != 0 models a tensor view at an odd offset).
struct sp_emu_buf {
  void* ptr;  // host data; may be null when bytes == 0
  int64_t bytes;
  const char* name;
  int64_t align;
  int64_t misalign;
};

// What the planner chose (mirrors sparseprune::cuda::LaunchPlan) and what ran.
struct sp_emu_plan {
  int config;  // index into the family's config table
  int bm, bn, warps_m, warps_n, stages, threads, smem_bytes;
  int64_t mblocks, nblocks, grid_x;
  int splits;
  int64_t units_per_split, workspace_floats;
  int64_t ctas_run;  // CTAs the emulator executed (all launches of the call)
};

enum { SP_EMU_F16 = 0, SP_EMU_BF16 = 1 };

// Semi24: y[B][N] = x[B][K] W^T (+ bias) with W packed by pack_semi24_sm80 (values [MT][KS][32][8],
// meta [MT][KS][16]); x rows are ldx elements apart (ldx % 8 == 0, padding zero). plan_only: fill plan, run nothing.
int sp_emu_semi24_linear(int dtype, const sp_emu_device* dev, sp_emu_buf x, int64_t B, int64_t K, int64_t ldx,
                         sp_emu_buf values, sp_emu_buf meta, int64_t N, sp_emu_buf bias, sp_emu_buf y,
                         int plan_only, sp_emu_plan* plan, char* err, int errlen);
// GPU packer kernel: dense [N][K] 16-bit -> values, meta (like pack_semi24_sm80 on a CUDA tensor). *bad = 1 when
// the weight is not 2:4.
int sp_emu_pack_semi24(int dtype, const sp_emu_device* dev, sp_emu_buf w, int64_t N, int64_t K, sp_emu_buf values,
                       sp_emu_buf meta, int* bad, char* err, int errlen);
// BSR (canonical layout) and hybrid (pack_hybrid_sm80 layout); N = (len(crow) - 1) * bh.
int sp_emu_bsr_linear(int dtype, const sp_emu_device* dev, sp_emu_buf x, int64_t B, int64_t K, int64_t ldx,
                      sp_emu_buf values, sp_emu_buf crow, sp_emu_buf col, int64_t nnzb, int64_t bh, int64_t bw,
                      int64_t N, sp_emu_buf bias, sp_emu_buf y, int plan_only, sp_emu_plan* plan, char* err,
                      int errlen);
int sp_emu_hybrid_linear(int dtype, const sp_emu_device* dev, sp_emu_buf x, int64_t B, int64_t K, int64_t ldx,
                         sp_emu_buf values, sp_emu_buf meta, sp_emu_buf crow, sp_emu_buf col, int64_t nnzb,
                         int64_t bh, int64_t bw, int64_t N, sp_emu_buf bias, sp_emu_buf y, int plan_only,
                         sp_emu_plan* plan, char* err, int errlen);

// Emulator self-tests (emu_selftest.cpp): small kernels that misuse a primitive on purpose, or use one alone.
// Returns 0 when the kernel ran cleanly, else non-zero with the emulator's diagnosis in err.
int sp_emu_selftest(const char* name, const sp_emu_device* dev, char* err, int errlen);
// One warp-level instruction on given lane registers (the independent check against sparseprune/cuda_layout.py):
// a [32][4], b [32][4], e [32], c/d [32][4].
int sp_emu_mma_sp(int dtype, int selector, int ordered, const uint32_t* a, const uint32_t* b, const uint32_t* e,
                  const float* c, float* d, char* err, int errlen);
int sp_emu_mma_dense(int dtype, const uint32_t* a, const uint32_t* b, const float* c, float* d, char* err,
                     int errlen);
// ldmatrix.x4 over a 16-byte-row shared buffer: lane L reads rows at byte offsets row_offset[L].
int sp_emu_ldmatrix_x4(const uint8_t* smem_image, int smem_bytes, const int* row_offset, uint32_t* r, char* err,
                       int errlen);
// fp32 <-> fp16/bf16 bit conversions used by the emulated kernels (checked against torch's).
void sp_emu_to_half_bits(int dtype, const float* in, uint16_t* out, int64_t n);
void sp_emu_from_half_bits(int dtype, const uint16_t* in, float* out, int64_t n);
// PerDeviceCache (launch_plan.cuh) hammered from `threads` host threads at once: returns how many times the query
// ran per device (must be 1 each) in calls[devices], and 0 if every thread saw the fully written value.
int sp_emu_device_cache_race(int threads, int devices, int* calls);
}
