// Self-tests of the emulator: small kernels that use one primitive correctly, or misuse it the way a kernel bug
// would, so tests/test_cuda_emu_checks.py can show each check fires (and stays quiet on correct code). Also the
// single-instruction entry points (mma.sp, mma.sync, ldmatrix on given lane registers), the half conversions and
// the PerDeviceCache race test.
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../mma_utils.cuh"
#include "emu_host.h"

using namespace sparseprune::cuda;

namespace {

struct TestArgs {
  const uint16_t* in;  // 16-byte aligned
  uint16_t* out;
  int n;               // elements of in / out
  int variant;
};

// Copies in -> shared -> out through cp.async, one 16-byte chunk per thread, then each thread writes the chunk its
// neighbour loaded. variant: 0 correct; 1 no wait_group; 2 no barrier between the wait and the neighbour's read.
__global__ void copy_neighbour_kernel(const TestArgs p) {
  SP_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, n = blockDim.x;
  cp_async16(smem + tid * 16, p.in + tid * 8, true);
  cp_async_commit();
  if (p.variant != 1) cp_async_wait<0>();
  if (p.variant != 2) __syncthreads();
  const int src = (tid + 1) % n;
  std::memcpy(p.out + tid * 8, smem + src * 16, 16);
  cp_async_wait<0>();
  __syncthreads();
}

// Misuses of one primitive each (variant picks which).
__global__ void misuse_kernel(const TestArgs p) {
  SP_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31;
  uint32_t r[4];
  switch (p.variant) {
    case 0:  // cp.async to a shared address that is not 16-byte aligned
      cp_async16(smem + 8, p.in, true);
      break;
    case 1:  // cp.async past the dynamic shared memory requested at launch
      cp_async16(smem + 4096, p.in, true);
      break;
    case 2:  // cp.async reading past the end of a tensor
      cp_async16(smem, p.in + p.n, true);
      break;
    case 3:  // half the warp at one ldmatrix, half at another
      if (lane < 16) ldmatrix_x4(r, smem);
      else ldmatrix_x4(r, smem + 16);
      break;
    case 4:  // only half the warp reaches ldmatrix
      if (lane < 16) ldmatrix_x4(r, smem);
      break;
    case 5:  // __syncthreads in divergent code: two warps at two different barriers
      if (tid < 32) __syncthreads();
      else __syncthreads();
      break;
    case 6:  // some threads return before a barrier the others wait at
      if (tid >= 32) return;
      __syncthreads();
      break;
    case 7:  // two cp.async to the same shared bytes in flight at once
      if (tid == 0) {
        cp_async16(smem, p.in, true);
        cp_async16(smem, p.in + 8, true);
        cp_async_commit();
        cp_async_wait<0>();
      }
      break;
    case 8:  // exits with a committed cp.async group it never waited for
      cp_async16(smem + tid * 16, p.in, true);
      cp_async_commit();
      break;
    case 9:  // a plain global load one element past the end of `in`
      if (tid == 0) p.out[0] = p.in[p.n];
      break;
    case 10:  // a plain global store past the end of `out` (into the alignment slack: caught by the canary)
      if (tid == 0) p.out[p.n] = 1;
      break;
    case 11:  // a plain shared-memory read past the dynamic size (guard page)
      if (tid == 0) p.out[0] = smem[4096 + 64];
      break;
    case 12: {  // mma.sp with zero metadata (0b0000 is undefined)
      float d[4] = {0, 0, 0, 0};
      const uint32_t a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
      mma_sp_16832<__half>(d, a, b, 0u);
      break;
    }
    case 13:  // ldmatrix row address not 16-byte aligned
      ldmatrix_x4(r, smem + 4);
      break;
    default:
      break;
  }
}

int run_misuse(int variant, int threads, int smem, bool set_attr, char* err, int errlen) {
  sp_emu::Buffers bufs;
  std::vector<uint16_t> host(64, 0x3C00);
  sp_emu_buf in{host.data(), int64_t(host.size() * 2), "in", 16, 0};
  sp_emu_buf outb{host.data(), 63 * 2, "out", 16, 0};  // 126 bytes: its end leaves 2 bytes of slack to 16
  TestArgs a{static_cast<const uint16_t*>(bufs.in(in)), static_cast<uint16_t*>(bufs.in(outb)), 0, variant};
  a.n = variant == 10 ? 63 : 64;
  // without set_attr the kernel keeps CUDA's default limit (48 KB), whatever an earlier self-test raised it to
  const cudaError_t ea =
      cudaFuncSetAttribute(misuse_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, set_attr ? smem : 48 * 1024);
  if (ea != cudaSuccess) return sp_emu::report(err, errlen, sp_emu::launch_outcome(ea, bufs));
  const cudaError_t e = launch_kernel(misuse_kernel, dim3(1), dim3(threads), smem, nullptr, a);
  if (auto m = sp_emu::launch_outcome(e, bufs); !m.empty()) return sp_emu::report(err, errlen, m);
  return 0;
}

int run_copy(int variant, int threads, char* err, int errlen) {
  sp_emu::Buffers bufs;
  const int n = threads * 8;
  std::vector<uint16_t> host(n), out(n, 0);
  for (int i = 0; i < n; ++i) host[i] = uint16_t(0x3C00 + i % 512);  // finite fp16 values
  sp_emu_buf in{host.data(), int64_t(n * 2), "in", 16, 0};
  sp_emu_buf ob{out.data(), int64_t(n * 2), "out", 16, 0};
  TestArgs a{static_cast<const uint16_t*>(bufs.in(in)), static_cast<uint16_t*>(bufs.in(ob)), n, variant};
  const cudaError_t e = launch_kernel(copy_neighbour_kernel, dim3(2), dim3(threads), threads * 16, nullptr, a);
  if (auto m = sp_emu::launch_outcome(e, bufs); !m.empty()) return sp_emu::report(err, errlen, m);
  bufs.out(a.out, ob);
  for (int t = 0; t < threads; ++t)
    for (int j = 0; j < 8; ++j)
      if (out[t * 8 + j] != host[((t + 1) % threads) * 8 + j])
        return sp_emu::report(err, errlen,
                              "thread " + std::to_string(t) + " read " +
                                  (out[t * 8 + j] == 0xFFFF ? std::string("poison (0xFFFF)") : std::string("a wrong value")) +
                                  " instead of its neighbour's data");
  return 0;
}

// One warp runs one instruction on lane registers given from outside.
struct InstrIO {
  int kind, dtype, selector, ordered;
  const uint32_t *a, *b, *e;
  const float* c;
  float* d;
  const int* row_offset;
  uint32_t* r;
  const uint8_t* image;
  int image_bytes;
};
__global__ void instr_kernel(const InstrIO io) {
  SP_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x;
  float d[4];
  for (int i = 0; i < 4; ++i) d[i] = io.c ? io.c[lane * 4 + i] : 0.f;
  if (io.kind == 0) {
    const uint32_t a[4] = {io.a[lane * 4], io.a[lane * 4 + 1], io.a[lane * 4 + 2], io.a[lane * 4 + 3]};
    const uint32_t b[4] = {io.b[lane * 4], io.b[lane * 4 + 1], io.b[lane * 4 + 2], io.b[lane * 4 + 3]};
    sp_emu::mma_sp_m16n8k32(io.dtype == SP_EMU_F16 ? sp_emu::MmaType::f16 : sp_emu::MmaType::bf16, d, a, b,
                            io.e[lane], io.selector, io.ordered != 0, std::source_location::current());
  } else if (io.kind == 1) {
    const uint32_t a[4] = {io.a[lane * 4], io.a[lane * 4 + 1], io.a[lane * 4 + 2], io.a[lane * 4 + 3]};
    sp_emu::mma_m16n8k16(io.dtype == SP_EMU_F16 ? sp_emu::MmaType::f16 : sp_emu::MmaType::bf16, d, a,
                         io.b[lane * 4], io.b[lane * 4 + 1], std::source_location::current());
  } else {
    if (lane == 0) std::memcpy(smem, io.image, size_t(io.image_bytes));
    __syncthreads();
    uint32_t r[4];
    ldmatrix_x4(r, smem + io.row_offset[lane]);
    for (int i = 0; i < 4; ++i) io.r[lane * 4 + i] = r[i];
  }
  if (io.d)
    for (int i = 0; i < 4; ++i) io.d[lane * 4 + i] = d[i];
}

int run_instr(InstrIO io, int smem, char* err, int errlen) {
  sp_emu_device dev{1, 232448, 0, 1, 0};
  sp_emu::set_device(dev);
  sp_emu::Buffers bufs;  // nothing global is read through cp.async here; plain host pointers are fine
  if (smem > 48 * 1024) cudaFuncSetAttribute(instr_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const cudaError_t e = launch_kernel(instr_kernel, dim3(1), dim3(32), smem, nullptr, io);
  if (auto m = sp_emu::launch_outcome(e, bufs); !m.empty()) return sp_emu::report(err, errlen, m);
  return 0;
}

}  // namespace

extern "C" int sp_emu_selftest(const char* name, const sp_emu_device* dev, char* err, int errlen) {
  try {
    sp_emu::set_device(*dev);
    const std::string n = name;
    if (n == "copy_ok") return run_copy(0, 64, err, errlen);
    if (n == "copy_missing_wait") return run_copy(1, 64, err, errlen);
    if (n == "copy_missing_barrier") return run_copy(2, 64, err, errlen);
    static const char* misuses[] = {"cp_async_misaligned", "cp_async_smem_overflow", "cp_async_global_oob",
                                    "ldmatrix_divergent", "ldmatrix_half_warp", "syncthreads_two_sites",
                                    "syncthreads_after_exit", "cp_async_overlap", "exit_with_pending_cp_async",
                                    "global_read_oob", "global_write_oob", "smem_read_oob", "mma_sp_zero_metadata",
                                    "ldmatrix_misaligned"};
    for (int v = 0; v < int(sizeof misuses / sizeof *misuses); ++v)
      if (n == misuses[v]) return run_misuse(v, 64, 4096, false, err, errlen);
    if (n == "misuse_none") return run_misuse(-1, 64, 4096, false, err, errlen);
    // launch checks
    if (n == "smem_over_48k_without_attribute") return run_misuse(-1, 64, 64 * 1024, false, err, errlen);
    if (n == "smem_over_48k_with_attribute") return run_misuse(-1, 64, 64 * 1024, true, err, errlen);
    if (n == "smem_over_optin") return run_misuse(-1, 64, dev->smem_optin + 16, true, err, errlen);
    if (n == "block_too_large") return run_misuse(-1, 2048, 4096, false, err, errlen);
    if (n == "grid_y_too_large") {
      sp_emu::Buffers bufs;
      const cudaError_t e = launch_kernel(misuse_kernel, dim3(1, 70000), dim3(32), 0, nullptr,
                                          TestArgs{nullptr, nullptr, 0, -1});
      if (auto m = sp_emu::launch_outcome(e, bufs); !m.empty()) return sp_emu::report(err, errlen, m);
      return 0;
    }
    return sp_emu::report(err, errlen, "unknown self-test " + n);
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}

extern "C" int sp_emu_mma_sp(int dtype, int selector, int ordered, const uint32_t* a, const uint32_t* b,
                             const uint32_t* e, const float* c, float* d, char* err, int errlen) {
  try {
    InstrIO io{0, dtype, selector, ordered, a, b, e, c, d, nullptr, nullptr, nullptr, 0};
    return run_instr(io, 0, err, errlen);
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}

extern "C" int sp_emu_mma_dense(int dtype, const uint32_t* a, const uint32_t* b, const float* c, float* d, char* err,
                                int errlen) {
  try {
    InstrIO io{1, dtype, 0, 0, a, b, nullptr, c, d, nullptr, nullptr, nullptr, 0};
    return run_instr(io, 0, err, errlen);
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}

extern "C" int sp_emu_ldmatrix_x4(const uint8_t* image, int smem_bytes, const int* row_offset, uint32_t* r, char* err,
                                  int errlen) {
  try {
    InstrIO io{2, 0, 0, 0, nullptr, nullptr, nullptr, nullptr, nullptr, row_offset, r, image, smem_bytes};
    return run_instr(io, smem_bytes, err, errlen);
  } catch (const std::exception& ex) {
    return sp_emu::report(err, errlen, ex.what());
  }
}

extern "C" void sp_emu_to_half_bits(int dtype, const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = dtype == SP_EMU_F16 ? __float2half_rn(in[i]).x : __float2bfloat16_rn(in[i]).x;
}

extern "C" void sp_emu_from_half_bits(int dtype, const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = dtype == SP_EMU_F16 ? __half2float(__half{in[i]}) : __bfloat162float(__nv_bfloat16{in[i]});
}

extern "C" int sp_emu_device_cache_race(int threads, int devices, int* calls) {
  struct Props {
    int device = -1;
    int head = 0;
    char body[8192];
    int tail = 0;
  };
  PerDeviceCache<Props, 8> cache;
  std::vector<std::atomic<int>> n(static_cast<size_t>(devices));
  std::atomic<int> torn{0};
  std::barrier start(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      start.arrive_and_wait();
      for (int i = 0; i < devices; ++i) {
        const int dev = (i + t) % devices;
        const Props& p = cache.get(dev, [&](int d, Props& out) {
          n[size_t(d)]++;
          out.device = d;
          out.head = 1;
          std::this_thread::sleep_for(std::chrono::milliseconds(5));  // a slow driver query widens any race
          std::memset(out.body, d, sizeof out.body);
          out.tail = 1;
        });
        if (p.device != dev || !p.head || !p.tail || p.body[sizeof p.body - 1] != char(dev)) torn++;
      }
    });
  for (auto& th : pool) th.join();
  for (int d = 0; d < devices; ++d) calls[d] = n[size_t(d)].load();
  return torn.load();
}
