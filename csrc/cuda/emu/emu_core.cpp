// The SIMT emulator's engine: fibers and their scheduler, __syncthreads, the warp-collective instructions
// (ldmatrix, mma.sync, mma.sp) computed from their PTX ISA fragment layouts, cp.async in strict mode, launch
// checks, guarded memory and fault reports. Test-only (see README.md beside this file).
//
// Where each instruction's semantics come from (PTX ISA, "Warp Level Matrix Multiply-Accumulate Instructions";
// written from the ISA text, independently of sparseprune/cuda_layout.py, which tests compare against):
//  * mma.m16n8k16 .f16/.bf16 (9.7.14.5.8): with g = %laneid >> 2 and t = %laneid % 4,
//      A a_i: row g for i in {0,1,4,5}, else g + 8; col 2t + (i & 1), + 8 for i >= 4
//      B b_i: row (k) 2t + (i & 1), + 8 for i >= 2; col (n) g
//      C c_i: row g for i < 2, else g + 8; col 2t + (i & 1)
//  * mma.sp m16n8k32 .f16/.bf16 (9.7.14.6.2.2): A holds two non-zeros of a 4-wide chunk per register: row g
//    for a_i with i in {0,1,4,5}, else g + 8; chunk columns [4t, 4t + 3] for i < 4, [4t + 16, 4t + 19] for
//    i >= 4. B is 32x8 in four registers, b_i at k = 2t + (i & 1) + 8 * (i >> 1), n = g (Figure 121; the
//    m16n8k16 B layout continued over k = 16..31). C/D as m16n8k16.
//    Metadata (9.7.14.6.1, Figure 122): with sparsity selector s, threads 2s and 2s + 1 of each group of four
//    supply it; thread 2s + h holds columns 16h..16h+15, row g in bits 0-15 and row g + 8 in bits 16-31, chunk
//    j of those 16 columns in bits 4j..4j+3: the low 2-bit index places the register's first (low-half)
//    element, the high one the second. Nibbles 0b0000, 0b0101, 0b1010, 0b1111 are undefined; with
//    ::ordered_metadata only 0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110 (first index < second) are defined.
//    Any other nibble stops the emulation with an error (the hardware result would be undefined).
//  * ldmatrix.sync.aligned.m8n8.x4.shared.b16 (9.7.14.5.15): lanes 8m..8m+7 give the 16-byte row addresses of
//    matrix m; lane L receives, in register m, row L / 4 of matrix m, elements 2 (L % 4) and 2 (L % 4) + 1
//    (low half first). Row addresses must be 16-byte aligned.
//  * cp.async.cg.shared.global [dst], [src], 16, src_size (9.7.9.25.3): 16 bytes, src_size of them read from
//    global, the rest zero; both addresses 16-byte aligned. Completion only through cp.async.wait_group N
//    (every committed group but the newest N of the issuing thread); other threads see the data after a
//    barrier. Strict mode: the destination is poisoned (0xFF bytes: NaN in fp16 and bf16, an undefined
//    metadata nibble) when the copy is issued and written at the wait that completes it, so a missing wait or
//    barrier reads poison instead of data.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cxxabi.h>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "emu_host.h"
#include "emu_runtime.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace sp_emu {

thread_local uint3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

namespace {

struct EmuError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string site(const std::source_location& l) {
  std::string f = l.file_name();
  const auto slash = f.rfind('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(l.line()) + ":" + std::to_string(l.column());
}
bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::string_view(a.file_name()) == b.file_name();
}

// ---- device, errors ---------------------------------------------------------------------------------
sp_emu_device g_device{132, 232448, 0, 1, 0};
std::string g_error_message;
cudaError_t g_last_error = cudaSuccess;
std::atomic<int64_t> g_ctas_run{0};
std::mutex g_attr_mutex;
std::unordered_map<const void*, int> g_max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "kernel@%p", kernel);
  return buf;
}

// ---- registered memory regions (guarded buffers and the running CTA's shared memory) --------------------
struct Region {
  uintptr_t begin, end;
  std::string name;
};
std::mutex g_region_mutex;
std::map<uintptr_t, Region> g_regions;

void register_region(const void* p, size_t n, const std::string& name) {
  std::lock_guard<std::mutex> lock(g_region_mutex);
  const auto b = reinterpret_cast<uintptr_t>(p);
  g_regions[b] = Region{b, b + n, name};
}
void unregister_region(const void* p) {
  std::lock_guard<std::mutex> lock(g_region_mutex);
  g_regions.erase(reinterpret_cast<uintptr_t>(p));
}
// The region holding [a, a + n), if any.
bool find_region(uintptr_t a, size_t n, Region& out) {
  std::lock_guard<std::mutex> lock(g_region_mutex);
  auto it = g_regions.upper_bound(a);
  while (it != g_regions.begin()) {
    --it;
    if (a >= it->second.begin && a + n <= it->second.end) {
      out = it->second;
      return true;
    }
    if (it->second.end <= a) break;
  }
  return false;
}
// "<n> bytes past the end of 'x' (<size> bytes)" and the like, for fault and bounds reports.
std::string describe_address(uintptr_t a) {
  std::lock_guard<std::mutex> lock(g_region_mutex);
  const Region* best = nullptr;
  uint64_t dist = UINT64_MAX;
  for (const auto& [b, r] : g_regions) {
    const uint64_t d = a < r.begin ? r.begin - a : a >= r.end ? a - r.end + 1 : 0;
    if (d < dist) dist = d, best = &r;
  }
  std::ostringstream s;
  s << "address 0x" << std::hex << a << std::dec;
  if (!best) return s.str() + " (no tensor registered)";
  const uint64_t size = best->end - best->begin;
  if (a >= best->begin && a < best->end)
    s << " (inside '" << best->name << "' at byte " << a - best->begin << " of " << size << ")";
  else if (a >= best->end)
    s << " (" << a - best->end << " bytes past the end of '" << best->name << "', " << size << " bytes)";
  else
    s << " (" << best->begin - a << " bytes before the start of '" << best->name << "', " << size << " bytes)";
  return s.str();
}

// ---- fibers -------------------------------------------------------------------------------------------
enum State { kReady, kBlockedBarrier, kBlockedWarp, kDone };

struct Copy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  State state = kReady;
  uint3 idx{};
  int linear = 0, warp = 0, lane = 0;
  std::vector<Copy> open;                // cp.async issued since the last commit
  std::deque<std::vector<Copy>> groups;  // committed, not yet complete
  std::source_location where{};          // where it is blocked (diagnostics)
};

enum class Op { none, ldmatrix_x4, mma_sp, mma_dense };
const char* op_name(Op o) {
  switch (o) {
    case Op::ldmatrix_x4: return "ldmatrix.x4";
    case Op::mma_sp: return "mma.sp.m16n8k32";
    case Op::mma_dense: return "mma.sync.m16n8k16";
    default: return "?";
  }
}

struct Warp {
  int arrived = 0;
  int at_barrier = 0;  // lanes of this warp blocked in __syncthreads
  Op op = Op::none;
  std::source_location where{};
  MmaType type = MmaType::f16;
  int selector = 0;
  bool ordered = true;
  const unsigned char* addr[32];
  uint32_t a[32][4], b[32][4], e[32];
  float c[32][4];
  uint32_t out_r[32][4];
  float out_d[32][4];
};

struct Cta {
  KernelBody body;
  const void* kernel;
  std::vector<Fiber>* fibers;
  std::vector<Warp> warps;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<uint16_t> inflight;  // cp.async in flight per 16-byte slot of shared memory
  int nthreads = 0, done = 0;
  int bar_arrived = 0;
  std::source_location bar_where{};
  bool failed = false;
  std::string error;
};

thread_local Fiber* t_cur = nullptr;
thread_local Cta* t_cta = nullptr;
thread_local void* t_sched_sp = nullptr;
thread_local volatile bool t_in_fiber = false;
#if !defined(__x86_64__)
thread_local ucontext_t t_sched_uc;
#endif

[[noreturn]] void fail(const std::string& what) { throw EmuError(what); }

Cta& cta() {
  if (!t_cta || !t_cur) fail("a device primitive was called outside an emulated kernel");
  return *t_cta;
}

}  // namespace
}  // namespace sp_emu

// ---- context switch ----------------------------------------------------------------------------------
#if defined(__x86_64__)
// sp_emu_switch(save, load): pushes the callee-saved registers and the SSE/x87 control words on the current
// stack, stores the stack pointer in *save, switches to `load` and pops the same from there.
extern "C" void sp_emu_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl sp_emu_switch
    .hidden sp_emu_switch
    .type sp_emu_switch,@function
sp_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sp_emu_switch,.-sp_emu_switch
)");
#endif

namespace sp_emu {
namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kPage = 4096;

// Fiber stacks (with a guard page below each), reused across launches.
struct StackPool {
  std::vector<std::pair<char*, char*>> stacks;
  std::pair<char*, char*> get(size_t i) {
    while (stacks.size() <= i) {
      void* m = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (m == MAP_FAILED) fail("cannot map a fiber stack");
      mprotect(m, kPage, PROT_NONE);
      stacks.emplace_back(static_cast<char*>(m) + kPage, static_cast<char*>(m) + kPage + kStackBytes);
    }
    return stacks[i];
  }
};
thread_local StackPool t_stacks;

void on_thread_exit(Cta& c, Fiber& f);

void fiber_main() {
  Fiber* me = t_cur;
  Cta* c = t_cta;
  try {
    c->body.call(c->body.ctx);
    on_thread_exit(*c, *me);
  } catch (const std::exception& e) {
    if (!c->failed) {
      c->failed = true;
      c->error = e.what();
    }
  }
  me->state = kDone;
  c->done++;
  t_in_fiber = false;
#if defined(__x86_64__)
  sp_emu_switch(&me->sp, t_sched_sp);
#else
  setcontext(&t_sched_uc);
#endif
  __builtin_unreachable();
}

void init_fiber(Fiber& f) {
#if defined(__x86_64__)
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack_hi) & ~uintptr_t(15));
  uint32_t mxcsr;
  uint16_t fpucw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = 0;                                            // fiber_main's (unused) return address
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);      // where sp_emu_switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = 0;                // rbp rbx r12 r13 r14 r15
  *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);    // control words
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack_lo;
  f.uc.uc_stack.ss_size = size_t(f.stack_hi - f.stack_lo);
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main, 0);
#endif
}

void resume(Fiber& f) {
  t_cur = &f;
  g_thread_idx = f.idx;
  t_in_fiber = true;
#if defined(__x86_64__)
  sp_emu_switch(&t_sched_sp, f.sp);
#else
  swapcontext(&t_sched_uc, &f.uc);
#endif
  t_in_fiber = false;
}

// Called by a fiber that must wait: back to the scheduler until someone marks it ready.
void block(State s, const std::source_location& where) {
  Fiber* me = t_cur;
  me->state = s;
  me->where = where;
  t_in_fiber = false;
#if defined(__x86_64__)
  sp_emu_switch(&me->sp, t_sched_sp);
#else
  swapcontext(&me->uc, &t_sched_uc);
#endif
  t_in_fiber = true;
}

std::string thread_desc(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.idx.x << "," << f.idx.y << "," << f.idx.z << ") [warp " << f.warp << " lane " << f.lane << "]";
  return s.str();
}

void on_thread_exit(Cta& c, Fiber& f) {
  size_t pending = f.open.size();
  for (const auto& g : f.groups) pending += g.size();
  if (pending)
    fail(thread_desc(f) + " exited with " + std::to_string(pending) +
         " cp.async copies it never waited for (cp.async.wait_group): they could land after the kernel reused "
         "that shared memory");
  if (c.warps[f.warp].arrived)
    fail(thread_desc(f) + " exited while other lanes of its warp wait at " + op_name(c.warps[f.warp].op) + " (" +
         site(c.warps[f.warp].where) + "): warp-collective instructions need all 32 lanes");
  if (c.bar_arrived)
    fail(thread_desc(f) + " exited while " + std::to_string(c.bar_arrived) + " threads wait at __syncthreads (" +
         site(c.bar_where) + ")");
}

// ---- faults: a plain load or store outside a tensor or the shared memory ------------------------------
struct sigaction g_old_segv, g_old_bus;
thread_local char t_altstack[64 * 1024];

void on_fault(int sig, siginfo_t* info, void*) {
  if (!t_in_fiber || !t_cta || !t_cur) {  // not ours: give it to whoever handled it before
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    return;  // the instruction faults again, now under the previous handler
  }
  const auto a = reinterpret_cast<uintptr_t>(info->si_addr);
  Cta& c = *t_cta;
  if (!c.failed) {
    c.failed = true;
    c.error = std::string(sig == SIGBUS ? "bus error" : "memory fault") + " in " + thread_desc(*t_cur) + ": " +
              (a ? describe_address(a)
                 : std::string("general protection fault (a misaligned 16-byte vector access, or an address far "
                               "outside every tensor)"));
  }
  t_cur->state = kDone;
  c.done++;
  t_in_fiber = false;
  // Abandon the faulting fiber: back to the scheduler, which stops the CTA and reports the error.
#if defined(__x86_64__)
  sp_emu_switch(&t_cur->sp, t_sched_sp);
#else
  setcontext(&t_sched_uc);
#endif
}

struct FaultHandlerScope {
  stack_t old_ss{};
  FaultHandlerScope() {
    stack_t ss{};
    ss.ss_sp = t_altstack;
    ss.ss_size = sizeof t_altstack;
    sigaltstack(&ss, &old_ss);
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  }
  ~FaultHandlerScope() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaltstack(&old_ss, nullptr);
  }
};

// ---- one CTA -------------------------------------------------------------------------------------------
std::vector<int> round_order(int n, int round, uint64_t block_seed) {
  std::vector<int> o(n);
  for (int i = 0; i < n; ++i) o[i] = i;
  if (g_device.schedule == 1) std::reverse(o.begin(), o.end());
  if (g_device.schedule == 2) {
    std::mt19937_64 rng(g_device.seed * 0x9E3779B97F4A7C15ull + block_seed * 1315423911ull + uint64_t(round));
    std::shuffle(o.begin(), o.end(), rng);
  }
  return o;
}

std::string deadlock_report(const Cta& c) {
  std::ostringstream s;
  s << "deadlock: no thread can run.";
  int shown = 0;
  for (const auto& f : *c.fibers) {
    if (f.state == kDone || shown >= 6) continue;
    s << " " << thread_desc(f) << " waits at "
      << (f.state == kBlockedBarrier ? "__syncthreads" : op_name(c.warps[f.warp].op)) << " (" << site(f.where)
      << ");";
    ++shown;
  }
  return s.str();
}

bool run_cta(Cta& c, uint64_t block_seed) {
  auto& fibers = *c.fibers;
  for (int round = 0;; ++round) {
    bool ran = false;
    for (int i : round_order(c.nthreads, round, block_seed)) {
      if (fibers[i].state != kReady) continue;
      resume(fibers[i]);
      ran = true;
      if (c.failed) return false;
    }
    if (c.done == c.nthreads) return true;
    if (!ran) {
      c.failed = true;
      c.error = deadlock_report(c);
      return false;
    }
  }
}

}  // namespace

// ---- launch --------------------------------------------------------------------------------------------
cudaError_t set_func_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return g_last_error = cudaErrorInvalidValue;
  if (value < 0 || value > g_device.smem_optin) {
    g_error_message = "cudaFuncSetAttribute(MaxDynamicSharedMemorySize=" + std::to_string(value) + ") for " +
                      kernel_name(kernel) + ": the device allows at most " + std::to_string(g_device.smem_optin) +
                      " bytes per block (sharedMemPerBlockOptin)";
    return g_last_error = cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  g_max_dyn_smem[kernel] = value;
  return cudaSuccess;
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, int dyn_smem, KernelBody body) {
  auto launch_error = [&](cudaError_t e, const std::string& why) {
    g_error_message = kernel_name(kernel) + ": " + why;
    return g_last_error = e;
  };
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024 || block.z > 64)
    return launch_error(cudaErrorInvalidConfiguration, "block of " + std::to_string(nthreads) + " threads");
  if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535)
    return launch_error(cudaErrorInvalidConfiguration, "grid (" + std::to_string(grid.x) + ", " +
                                                           std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                                                           ") outside the CUDA limits (2^31-1, 65535, 65535)");
  if (dyn_smem < 0) return launch_error(cudaErrorInvalidValue, "negative shared memory size");
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    const auto it = g_max_dyn_smem.find(kernel);
    const int allowed = it != g_max_dyn_smem.end() ? it->second : 48 * 1024;  // CUDA's default without opt-in
    if (dyn_smem > allowed)
      return launch_error(cudaErrorInvalidValue,
                          std::to_string(dyn_smem) + " bytes of dynamic shared memory requested, " +
                              std::to_string(allowed) + " allowed (cudaFuncSetAttribute not raised enough)");
  }

  // Shared memory: one end against a guard page (the end, or with placement 1 the start, like the tensors);
  // poisoned per CTA so reads of never-written bytes show up as NaN.
  const size_t smem_bytes = size_t(dyn_smem);
  Guarded smem(int64_t(smem_bytes), 128, 0, "shared memory", g_device.placement);
  std::vector<Fiber> fibers(static_cast<size_t>(nthreads));
  for (int64_t i = 0; i < nthreads; ++i) {
    auto [lo, hi] = t_stacks.get(size_t(i));
    fibers[i].stack_lo = lo;
    fibers[i].stack_hi = hi;
  }
  Cta c;
  c.body = body;
  c.kernel = kernel;
  c.fibers = &fibers;
  c.nthreads = int(nthreads);
  c.smem = static_cast<unsigned char*>(smem.data());
  c.smem_bytes = smem_bytes;
  c.warps.resize(size_t((nthreads + 31) / 32));
  g_block_dim = uint3{block.x, block.y, block.z};
  g_grid_dim = uint3{grid.x, grid.y, grid.z};

  FaultHandlerScope faults;
  t_cta = &c;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_block_idx = uint3{bx, by, bz};
        std::memset(c.smem, 0xFF, smem_bytes);
        c.inflight.assign(smem_bytes / 16 + 1, 0);
        c.done = 0;
        c.bar_arrived = 0;
        for (auto& w : c.warps) w.arrived = w.at_barrier = 0;
        for (int64_t i = 0; i < nthreads; ++i) {
          Fiber& f = fibers[i];
          f.state = kReady;
          f.linear = int(i);
          f.idx = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / (int64_t(block.x) * block.y))};
          f.warp = int(i / 32);
          f.lane = int(i % 32);
          f.open.clear();
          f.groups.clear();
          init_fiber(f);
        }
        const uint64_t block_seed = (uint64_t(bz) * grid.y + by) * grid.x + bx;
        const bool ok = run_cta(c, block_seed);
        g_ctas_run++;
        if (!ok) {
          t_cta = nullptr;
          t_cur = nullptr;
          std::ostringstream s;
          s << kernel_name(kernel) << " block (" << bx << "," << by << "," << bz << "): " << c.error;
          g_error_message = s.str();
          return g_last_error = cudaErrorLaunchFailure;
        }
      }
  t_cta = nullptr;
  t_cur = nullptr;
  return cudaSuccess;
}

unsigned char* dynamic_smem() { return cta().smem; }

// ---- __syncthreads -------------------------------------------------------------------------------------
void syncthreads(const std::source_location& loc) {
  Cta& c = cta();
  Fiber* me = t_cur;
  if (c.done)
    fail(thread_desc(*me) + " reached __syncthreads (" + site(loc) + ") after " + std::to_string(c.done) +
         " threads of the block exited: they can never arrive");
  Warp& w = c.warps[me->warp];
  if (w.arrived)
    fail(thread_desc(*me) + " reached __syncthreads (" + site(loc) + ") while lanes of its warp wait at " +
         op_name(w.op) + " (" + site(w.where) + ")");
  if (c.bar_arrived == 0) {
    c.bar_where = loc;
  } else if (!same_site(c.bar_where, loc)) {
    fail("__syncthreads reached at two places at once: " + thread_desc(*me) + " at " + site(loc) +
         ", other threads at " + site(c.bar_where));
  }
  if (++c.bar_arrived == c.nthreads) {
    c.bar_arrived = 0;
    for (auto& f : *c.fibers)
      if (f.state == kBlockedBarrier) f.state = kReady;
    for (auto& ww : c.warps) ww.at_barrier = 0;
    return;
  }
  w.at_barrier++;
  block(kBlockedBarrier, loc);
}

int atomic_exch(int* addr, int value) {
  Region r;
  if (!find_region(reinterpret_cast<uintptr_t>(addr), sizeof(int), r))
    fail(thread_desc(*t_cur) + ": atomicExch on " + describe_address(reinterpret_cast<uintptr_t>(addr)));
  return __atomic_exchange_n(addr, value, __ATOMIC_SEQ_CST);
}

// ---- cp.async ------------------------------------------------------------------------------------------
namespace {
void check_shared(const Cta& c, const void* p, size_t n, const char* what, const std::source_location& loc) {
  const auto a = reinterpret_cast<uintptr_t>(p), s = reinterpret_cast<uintptr_t>(c.smem);
  if (a < s || a + n > s + c.smem_bytes) {
    std::ostringstream m;
    m << thread_desc(*t_cur) << " at " << site(loc) << ": " << what << " of " << n << " bytes at shared offset "
      << (int64_t(a) - int64_t(s)) << ", outside the " << c.smem_bytes << " bytes requested at launch";
    fail(m.str());
  }
  if ((a - s) % 16) {
    std::ostringstream m;
    m << thread_desc(*t_cur) << " at " << site(loc) << ": " << what << " at shared offset " << (a - s)
      << ", not 16-byte aligned";
    fail(m.str());
  }
}
void complete(Cta& c, const Copy& cp) {
  std::memcpy(cp.dst, cp.data, 16);
  c.inflight[size_t(cp.dst - c.smem) / 16]--;
}
}  // namespace

void cp_async(void* dst, const void* src, int cp_size, int src_size, const std::source_location& loc) {
  Cta& c = cta();
  Fiber* me = t_cur;
  if (cp_size != 16 || src_size < 0 || src_size > cp_size)
    fail(thread_desc(*me) + " at " + site(loc) + ": cp.async.cg needs cp-size 16 and 0 <= src-size <= 16");
  check_shared(c, dst, 16, "cp.async destination", loc);
  Copy cp;
  cp.dst = static_cast<unsigned char*>(dst);
  std::memset(cp.data, 0, 16);
  if (src_size > 0) {
    const auto a = reinterpret_cast<uintptr_t>(src);
    if (a % 16)
      fail(thread_desc(*me) + " at " + site(loc) + ": cp.async source " + describe_address(a) +
           " is not 16-byte aligned");
    Region r;
    if (!find_region(a, size_t(src_size), r) || r.name == "shared memory")
      fail(thread_desc(*me) + " at " + site(loc) + ": cp.async reads " + std::to_string(src_size) +
           " bytes outside every tensor: " + describe_address(a));
    std::memcpy(cp.data, src, size_t(src_size));
  }
  uint16_t& n = c.inflight[size_t(cp.dst - c.smem) / 16];
  if (n)
    fail(thread_desc(*me) + " at " + site(loc) + ": cp.async to shared offset " + std::to_string(cp.dst - c.smem) +
         " while an earlier cp.async to the same bytes is still in flight");
  n++;
  std::memset(cp.dst, 0xFF, 16);  // strict mode: poisoned until the wait that completes it
  me->open.push_back(cp);
}

void cp_async_commit(const std::source_location&) {
  cta();
  Fiber* me = t_cur;
  me->groups.push_back(std::move(me->open));
  me->open.clear();
}

void cp_async_wait(int n, const std::source_location&) {
  Cta& c = cta();
  Fiber* me = t_cur;
  while (int(me->groups.size()) > n) {
    for (const Copy& cp : me->groups.front()) complete(c, cp);
    me->groups.pop_front();
  }
}

// ---- warp collectives ----------------------------------------------------------------------------------
namespace {
double elem(MmaType t, uint16_t bits) {
  return t == MmaType::f16 ? double(half_bits_to_float(bits)) : double(bf16_bits_to_float(bits));
}

void compute_ldmatrix(Warp& w, const Cta& c) {
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < 4; ++m) {
      const unsigned char* row = w.addr[8 * m + lane / 4];
      std::memcpy(&w.out_r[lane][m], row + 4 * (lane % 4), 4);
    }
  (void)c;
}

// D = A B + C for a 16 x K A and K x 8 B given as dense matrices: C and D in the accumulator layout (c_i / d_i of
// lane (g, t) at row g + 8 (i >> 1), column 2t + (i & 1)); products summed in double, rounded to fp32 once.
template <int K>
void multiply_accumulate(Warp& w, const double (&A)[16][K], const double (&Bm)[K][8]) {
  double D[16][8];
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) D[(lane >> 2) + 8 * (i >> 1)][2 * (lane & 3) + (i & 1)] = w.c[lane][i];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += A[m][k] * Bm[k][n];
      D[m][n] += s;
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) w.out_d[lane][i] = float(D[(lane >> 2) + 8 * (i >> 1)][2 * (lane & 3) + (i & 1)]);
}

void compute_mma_sp(Warp& w) {
  int idx[16][8][2];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    if ((t >> 1) != w.selector) continue;  // threads 2s, 2s+1 of each group supply the metadata
    const int h = t & 1;
    for (int rr = 0; rr < 2; ++rr)
      for (int q = 0; q < 4; ++q) {
        const int bit = 16 * rr + 4 * q;
        const uint32_t nib = (w.e[lane] >> bit) & 0xF;
        const int i0 = int(nib & 3), i1 = int(nib >> 2);
        const int row = g + 8 * rr, chunk = 4 * h + q;
        if (w.ordered ? !(i0 < i1) : i0 == i1) {
          char buf[320];
          std::snprintf(buf, sizeof buf,
                        "mma.sp%s at %s: metadata nibble 0x%X (lane %d, bits %d-%d) for row %d, columns %d-%d is "
                        "not a defined index pair; the PTX ISA leaves the result undefined",
                        w.ordered ? "::ordered_metadata" : "", site(w.where).c_str(), nib, lane, bit, bit + 3, row,
                        4 * chunk, 4 * chunk + 3);
          fail(buf);
        }
        idx[row][chunk][0] = i0;
        idx[row][chunk][1] = i1;
      }
  }
  double A[16][32] = {}, Bm[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r)
      for (int hh = 0; hh < 2; ++hh) {
        const int row = g + 8 * (r & 1), chunk = t + 4 * (r >> 1);
        A[row][4 * chunk + idx[row][chunk][hh]] = elem(w.type, uint16_t(w.a[lane][r] >> (16 * hh)));
        Bm[2 * t + hh + 8 * r][g] = elem(w.type, uint16_t(w.b[lane][r] >> (16 * hh)));
      }
  }
  multiply_accumulate(w, A, Bm);
}

void compute_mma_dense(Warp& w) {
  double A[16][16], Bm[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r)
      for (int hh = 0; hh < 2; ++hh)
        A[g + 8 * (r & 1)][2 * t + hh + 8 * (r >> 1)] = elem(w.type, uint16_t(w.a[lane][r] >> (16 * hh)));
    for (int r = 0; r < 2; ++r)
      for (int hh = 0; hh < 2; ++hh) Bm[2 * t + hh + 8 * r][g] = elem(w.type, uint16_t(w.b[lane][r] >> (16 * hh)));
  }
  multiply_accumulate(w, A, Bm);
}

// Every lane of the warp deposits its operands at the same call site; the 32nd computes, and releases the rest.
template <typename Deposit>
Warp& collective(Op op, const std::source_location& loc, Deposit&& deposit) {
  Cta& c = cta();
  Fiber* me = t_cur;
  if (c.nthreads % 32)
    fail(std::string(op_name(op)) + " in a block of " + std::to_string(c.nthreads) +
         " threads: warp-collective instructions need whole warps");
  Warp& w = c.warps[me->warp];
  if (w.at_barrier)
    fail(thread_desc(*me) + " reached " + op_name(op) + " (" + site(loc) + ") while lanes of its warp wait at "
         "__syncthreads (" + site(c.bar_where) + ")");
  if (w.arrived == 0) {
    w.op = op;
    w.where = loc;
  } else if (w.op != op || !same_site(w.where, loc)) {
    fail("warp " + std::to_string(me->warp) + " diverged at a warp-collective instruction: lane " +
         std::to_string(me->lane) + " is at " + op_name(op) + " (" + site(loc) + "), other lanes at " +
         op_name(w.op) + " (" + site(w.where) + ")");
  }
  deposit(w, me->lane);
  if (++w.arrived == 32) {
    switch (op) {
      case Op::ldmatrix_x4: compute_ldmatrix(w, c); break;
      case Op::mma_sp: compute_mma_sp(w); break;
      case Op::mma_dense: compute_mma_dense(w); break;
      default: break;
    }
    w.arrived = 0;
    for (int l = 0; l < 32; ++l) {
      Fiber& f = (*c.fibers)[size_t(me->warp * 32 + l)];
      if (f.state == kBlockedWarp) f.state = kReady;
    }
  } else {
    block(kBlockedWarp, loc);
  }
  return w;
}
}  // namespace

void ldmatrix_x4(uint32_t (&r)[4], const void* smem, const std::source_location& loc) {
  Cta& c = cta();
  check_shared(c, smem, 16, "ldmatrix row address", loc);
  Warp& w = collective(Op::ldmatrix_x4, loc, [&](Warp& ww, int lane) {
    ww.addr[lane] = static_cast<const unsigned char*>(smem);
  });
  std::memcpy(r, w.out_r[t_cur->lane], sizeof r);
}

void mma_sp_m16n8k32(MmaType t, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e,
                     int selector, bool ordered, const std::source_location& loc) {
  if (selector != 0 && selector != 1) fail("mma.sp m16n8k32: sparsity selector must be 0 or 1");
  Warp& w = collective(Op::mma_sp, loc, [&](Warp& ww, int lane) {
    if (ww.arrived == 0) {
      ww.type = t;
      ww.selector = selector;
      ww.ordered = ordered;
    } else if (ww.type != t || ww.selector != selector || ww.ordered != ordered) {
      fail("mma.sp: lanes of one warp issued it with different types or selectors");
    }
    std::memcpy(ww.a[lane], a, sizeof a);
    std::memcpy(ww.b[lane], b, sizeof b);
    ww.e[lane] = e;
    std::memcpy(ww.c[lane], d, sizeof d);
  });
  std::memcpy(d, w.out_d[t_cur->lane], sizeof d);
}

void mma_m16n8k16(MmaType t, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                  const std::source_location& loc) {
  Warp& w = collective(Op::mma_dense, loc, [&](Warp& ww, int lane) {
    if (ww.arrived == 0) ww.type = t;
    else if (ww.type != t) fail("mma.sync: lanes of one warp issued it with different types");
    std::memcpy(ww.a[lane], a, sizeof a);
    ww.b[lane][0] = b0;
    ww.b[lane][1] = b1;
    std::memcpy(ww.c[lane], d, sizeof d);
  });
  std::memcpy(d, w.out_d[t_cur->lane], sizeof d);
}

// ---- fp16 / bf16 ---------------------------------------------------------------------------------------
float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan (payload kept)
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value = man * 2^-24
    float f = std::ldexp(float(man), -24);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return uint16_t(sign | 0x7E00 | ((ax >> 13) & 0x3FF));  // nan stays nan (quiet)
  if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00);  // rounds to >= 65520: inf
  if (ax >= 0x38800000u) {  // normal half: round to nearest even on the 13 dropped bits
    const uint32_t r = ax - 0x38000000u;  // rebias exponent (127 -> 15)
    uint32_t q = r >> 13;
    const uint32_t rest = r & 0x1FFF;     // a carry into the exponent is the right result
    if (rest > 0x1000 || (rest == 0x1000 && (q & 1))) ++q;
    return uint16_t(sign | q);
  }
  // subnormal half (or zero): value / 2^-24, rounded to nearest even
  const float scaled = std::fabs(f) * 16777216.0f;  // exact: power-of-two scaling of a small float
  const float rounded = std::nearbyint(scaled);      // default rounding mode: nearest even
  return uint16_t(sign | uint16_t(rounded));
}

float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((x >> 16) | 0x40);  // quiet nan
  return uint16_t((x + 0x7FFFu + ((x >> 16) & 1)) >> 16);
}

// ---- emu_host.h ---------------------------------------------------------------------------------------
void set_device(const sp_emu_device& d) { g_device = d; }
const sp_emu_device& device() { return g_device; }
std::string take_error_message() {
  std::string m;
  m.swap(g_error_message);
  return m;
}
void set_error_message(const std::string& m) { g_error_message = m; }
int64_t ctas_run() { return g_ctas_run.load(); }
void reset_ctas_run() { g_ctas_run = 0; }

Guarded::Guarded(int64_t bytes, int64_t align, int64_t misalign, const std::string& name, int placement)
    : bytes_(bytes), name_(name) {
  if (bytes < 0 || align < 1 || (align & (align - 1)) || misalign < 0 || misalign >= align)
    throw std::invalid_argument("Guarded: bad size or alignment for '" + name + "'");
  const size_t need = size_t(bytes) + size_t(align) + size_t(misalign);
  usable_bytes_ = (need + kPage - 1) / kPage * kPage;
  map_bytes_ = usable_bytes_ + 2 * kPage;
  void* m = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("Guarded: mmap failed for '" + name + "'");
  map_ = static_cast<char*>(m);
  mprotect(map_, kPage, PROT_NONE);
  mprotect(map_ + kPage + usable_bytes_, kPage, PROT_NONE);
  usable_ = map_ + kPage;
  std::memset(usable_, 0xA5, usable_bytes_);  // canaries
  if (placement == 1) {
    data_ = usable_ + misalign;  // (align divides the page size for every align we use)
  } else {
    const uintptr_t end = reinterpret_cast<uintptr_t>(usable_ + usable_bytes_);
    const uintptr_t start = ((end - uintptr_t(bytes) - uintptr_t(misalign)) & ~uintptr_t(align - 1)) + uintptr_t(misalign);
    data_ = reinterpret_cast<char*>(start);
  }
  register_region(data_, size_t(bytes), name_);
}

Guarded::~Guarded() {
  unregister_region(data_);
  munmap(map_, map_bytes_);
}

std::string Guarded::check_canaries() const {
  for (char* p = usable_; p < data_; ++p)
    if (static_cast<unsigned char>(*p) != 0xA5)
      return "a kernel wrote " + std::to_string(data_ - p) + " bytes before the start of '" + name_ + "'";
  for (char* p = data_ + bytes_; p < usable_ + usable_bytes_; ++p)
    if (static_cast<unsigned char>(*p) != 0xA5)
      return "a kernel wrote " + std::to_string(p - (data_ + bytes_)) + " bytes past the end of '" + name_ + "'";
  return "";
}

void* Buffers::in(const sp_emu_buf& b) {
  if (b.bytes == 0 && !b.ptr && !b.name) return nullptr;
  auto g = std::make_unique<Guarded>(b.bytes, b.align > 0 ? b.align : 256, b.misalign,
                                     b.name ? b.name : "buffer", g_device.placement);
  if (b.bytes) std::memcpy(g->data(), b.ptr, size_t(b.bytes));
  all_.push_back(std::move(g));
  return all_.back()->data();
}

void* Buffers::scratch(int64_t bytes, const char* name, unsigned char fill, int64_t align) {
  auto g = std::make_unique<Guarded>(bytes, align, 0, name, g_device.placement);
  std::memset(g->data(), fill, size_t(bytes));
  all_.push_back(std::move(g));
  return all_.back()->data();
}

void Buffers::out(const void* p, const sp_emu_buf& b) const {
  if (b.bytes) std::memcpy(b.ptr, p, size_t(b.bytes));
}

std::string Buffers::check_canaries() const {
  for (const auto& g : all_)
    if (auto m = g->check_canaries(); !m.empty()) return m;
  return "";
}

}  // namespace sp_emu

namespace sp_emu {
std::string launch_outcome(int err_code, const Buffers& bufs) {
  if (err_code != cudaSuccess) {
    std::string m = take_error_message();
    return std::string(error_string(cudaError_t(err_code))) + (m.empty() ? "" : ": " + m);
  }
  return bufs.check_canaries();
}
}  // namespace sp_emu
