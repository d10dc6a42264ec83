// CPU emulator of CUDA thread blocks, so that the kernels of kernels/ can be run and
// checked against an f64 reference on any machine (scripts/emulate_kernels.sh).
// Why: GPU time comes in sessions; between them kernels still change, and they are checked
// here, on CPUs. The kernel sources are compiled unmodified as host C++.
//
// Emulated:
// - Every CUDA thread is a fiber; blocks run one after another. __syncthreads and warp
//   collectives are barriers, and a barrier some threads never reach aborts as a deadlock.
//   mma.sync m16n8k16 (f16/bf16, f32 accumulate), ldmatrix .x4 (and .trans) and
//   __shfl_xor_sync compute each lane's result from all lanes' inputs per the PTX ISA.
// - Schedules (env EMU_SCHEDULE, read at the first launch): fibers switch only at barriers
//   and collectives, so which warp runs when is all a schedule decides.
//     inorder (default)  rounds over the threads in order: warps advance in near lockstep
//     reverse            the same from the last thread down, and the blocks in reverse
//     random:SEED        a random warp (lanes in random order) advances one step at a time,
//                        so warps drift apart; blocks in random order. Seeded per block.
//     runahead           the lowest warp that can run does, until it blocks on
//                        __syncthreads (or exits): it runs ahead of all the others
//     runahead-last      the same from the highest warp down
//   A cp.async destination reads as NaN from the issue until the wait that retires its
//   group, when the data lands (the latest legal moment); shared memory starts every block as
//   NaN. Data read too early or never written shows up as NaN; with runahead a warp that
//   refills a buffer before the others are done with it poisons their reads.
// - Race check (the race build: -DEMU_RACECHECK with -fsanitize=thread, whose
//   instrumentation calls this file's __tsan_* hooks, no TSan runtime): like
//   compute-sanitizer racecheck, every shared-memory byte remembers its last writer and
//   this epoch's readers; an access from another warp in the same barrier epoch (no
//   __syncthreads between) that conflicts (read-after-write, write-after-read,
//   write-after-write) is a hazard, and so is one from another lane of the same warp with no
//   __syncwarp / warp collective between. A cp.async counts as a write by its thread from
//   the issue (checked against earlier accesses then; any access before its wait retires it
//   is a hazard) and lands as that thread's write at the wait. Accesses past the requested
//   dynamic shared memory are reported too. Hazards fail the launch.
// - Memory: emu::DeviceArray (the suites' global tensors) is one allocation per tensor that
//   ends exactly at its last element: in the ASan build (-fsanitize=address,undefined) an
//   exact heap block, so ASan reports an access one element past it; elsewhere its end
//   (rounded up to 16 bytes, a canary in the rounding) touches a PROT_NONE page, so an access
//   past it faults. The ASan build also annotates the fiber switches for ASan, poisons the
//   shared memory past the launch's requested size, and UBSan reports misaligned accesses
//   (a uint4 off 16-byte alignment faults on a GPU). The bounds and alignment of ldmatrix and
//   cp.async, and the 99 KB limit, are checked in every build; plain shared-memory accesses
//   in the race and ASan builds.
// - --use_fast_math (build.rs passes it to nvcc): threads run with flush-to-zero and
//   denormals-are-zero for f32 (MXCSR FTZ|DAZ, like .ftz); exp2f, log2f, expf, logf map to
//   models of ex2.approx.ftz / lg2.approx.ftz (__expf = ex2(x * log2e), __logf = lg2(x) ln2):
//   flushed inputs and outputs and a deterministic pseudo-random error within the documented
//   bound (ex2, lg2 off [0.5, 2]: 2 ulp; lg2 on [0.5, 2]: 2^-22 absolute). See fast_exp2f.
// Suites run the cases named on their command line, else all, or with EMU_CASES=K:N every
// K-th case from N.
// Not emulated: x / y stays IEEE division (nvcc's -prec-div=false gives <= 2 ulp: a C++
// operator cannot be hooked; the error is ~2^-22, far below the f16 / bf16 tolerances);
// FMA contraction (nvcc --fmad=true fuses a*b+c, GCC here does not); the summation order
// inside mma.sync (k order here); timing, occupancy, bank conflicts, registers and spills;
// memory-model effects below the barrier level (a write is visible to every thread at once);
// races on global memory between blocks (they run one after another).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>
#include <cxxabi.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <xmmintrin.h>
#else
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(EMU_RACECHECK) && !defined(__SANITIZE_THREAD__)
#error "EMU_RACECHECK needs -fsanitize=thread (for the instrumentation; link without it)"
#endif
using std::max;
using std::min;

// Functions of the emulator that touch shared memory on a thread's behalf (and report
// that access to the race check themselves) must not be instrumented as plain accesses.
// EMU_UNTRACKED: not inlined into (instrumented) kernel code; EMU_NO_TRACK: helpers of those.
#ifdef EMU_RACECHECK
#define EMU_UNTRACKED __attribute__((noinline, no_sanitize_thread))
#define EMU_NO_TRACK __attribute__((no_sanitize_thread))
#else
#define EMU_UNTRACKED
#define EMU_NO_TRACK
#endif

// Dynamic shared memory: one buffer, since blocks run one at a time. A kernel declares
// `extern __shared__ unsigned char smem_raw[]` in its function body; with __shared__
// defined away below, that names a global of the kernel's namespace. Every such namespace
// gets a declaration here bound to the same symbol (a kernel in a namespace not listed
// fails to link: undefined reference to ...::smem_raw). The kernels see it without a bound,
// so that the compiler cannot prove an access in bounds and skip ASan's check of it.
namespace fk {
constexpr size_t kEmuMaxSmem = 99 * 1024; // sm_86 / sm_89 per-block limit, the strictest
}
alignas(128) inline unsigned char emu_shared_storage[fk::kEmuMaxSmem] asm("emu_shared_memory");
namespace fk {
extern unsigned char smem_raw[] asm("emu_shared_memory");
namespace dense_bwd_detail {
extern unsigned char smem_raw[] asm("emu_shared_memory");
}
namespace gemm {
extern unsigned char smem_raw[] asm("emu_shared_memory");
}
namespace longformer_bwd_detail {
extern unsigned char smem_raw[] asm("emu_shared_memory");
}
} // namespace fk

namespace emu {

struct Barrier {
  int count = 0, gen = 0, expected = 0;
};

struct CopyOp {
  void *dst;
  unsigned char data[16]; // read from global memory at the issue, lands at the wait
};

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  void *sp = nullptr; // saved stack pointer (x86_64) while switched out
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  char *stack = nullptr;
  void *asan_fake_stack = nullptr;
  uint3 tid;
  int flat = 0;
  bool done = false;
  const Barrier *wait = nullptr; // blocked until wait->gen != wait_gen
  int wait_gen = 0;
  std::vector<std::vector<CopyOp>> groups; // committed cp.async groups, oldest first
  std::vector<CopyOp> open;                // issued, not yet committed
  bool runnable() const { return !done && (!wait || wait->gen != wait_gen); }
};

struct WarpScratch {
  uint32_t a[32][4];
  uint32_t b[32][2];
  uint32_t addr[32];
  float f[32];
};

enum class Schedule { InOrder, Reverse, Random, RunAhead, RunAheadLast };

inline Fiber *g_cur = nullptr;
inline uint3 g_block, g_grid, g_bdim;
inline unsigned char *const g_smem = emu_shared_storage;
inline size_t g_smem_bytes = 0;
inline Barrier g_block_bar;
inline std::vector<Barrier> g_warp_bar;
inline std::vector<WarpScratch> g_ws;
inline std::function<void()> g_body;
inline long g_switches = 0;
inline bool g_schedule_read = false;
inline Schedule g_schedule = Schedule::InOrder;
inline uint64_t g_seed = 0;
inline std::mt19937_64 g_rng;

inline const char *g_case = nullptr; // what the suite is running, for failure messages

// Which cases a suite runs: the indices on its command line; without any, all of them, or
// with EMU_CASES=K:N every K-th from N (scripts/emulate_kernels.sh spreads the costlier
// builds and schedules over the cases that way).
inline bool case_selected(size_t i, int argc, char **argv) {
  if (argc > 1) {
    for (int a = 1; a < argc; ++a)
      if (std::to_string(i) == argv[a]) return true;
    return false;
  }
  const char *e = getenv("EMU_CASES");
  unsigned k = 1, n = 0;
  if (e && *e && (sscanf(e, "%u:%u", &k, &n) != 2 || k == 0)) {
    fprintf(stderr, "emu: EMU_CASES=%s: want K:N (every K-th case from N)\n", e);
    exit(2);
  }
  return i % k == n;
}

inline void fail(const char *what) {
  fprintf(stderr, "emu: %s (block %u,%u,%u thread %d%s%s)\n", what, g_block.x, g_block.y,
          g_block.z, g_cur ? g_cur->flat : -1, g_case ? ", " : "", g_case ? g_case : "");
  abort();
}

// EMU_SCHEDULE, or a schedule set by a test itself (set_schedule) before its launches.
inline void set_schedule(const char *s) {
  g_schedule_read = true;
  if (!s || !*s || !strcmp(s, "inorder")) g_schedule = Schedule::InOrder;
  else if (!strcmp(s, "reverse")) g_schedule = Schedule::Reverse;
  else if (!strcmp(s, "runahead")) g_schedule = Schedule::RunAhead;
  else if (!strcmp(s, "runahead-last")) g_schedule = Schedule::RunAheadLast;
  else if (!strncmp(s, "random:", 7)) {
    g_schedule = Schedule::Random;
    g_seed = strtoull(s + 7, nullptr, 10);
  } else {
    fprintf(stderr, "emu: EMU_SCHEDULE=%s: want inorder, reverse, random:SEED, runahead or "
                    "runahead-last\n", s);
    exit(2);
  }
}

// ---------------------------------------------------------------------------------------
// Fiber switching. x86_64: a few instructions saving the callee-saved registers, MXCSR and
// the x87 control word (swapcontext also makes a sigprocmask system call per switch, which
// was half the run time). Elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void emu_ctx_swap(void **save_sp, void *load_sp);
asm(R"(
  .pushsection .text
  .weak emu_ctx_swap
  .type emu_ctx_swap, @function
emu_ctx_swap:
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
  .size emu_ctx_swap, .-emu_ctx_swap
  .weak emu_fiber_trampoline
  .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
  andq $-16, %rsp
  call emu_fiber_main@PLT
  ud2
  .size emu_fiber_trampoline, .-emu_fiber_trampoline
  .popsection
)");
extern "C" void emu_fiber_trampoline();
inline void *g_sched_sp = nullptr;
#else
inline ucontext_t g_sched_ctx;
#endif

// AddressSanitizer must be told about every stack switch (its fake stacks and
// stack-bounds checks would otherwise see one thread jump between stacks).
inline const void *g_sched_stack_bottom = nullptr;
inline size_t g_sched_stack_size = 0;
inline void asan_start_switch(void **fake, const void *bottom, size_t size) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
inline void asan_finish_switch(void *fake, const void **bottom, size_t *size) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

// Scheduler -> fiber f, until f yields or exits.
inline void resume(Fiber &f) {
  g_cur = &f;
  void *fake = nullptr;
  asan_start_switch(&fake, f.stack, kStackBytes);
#if defined(__x86_64__)
  emu_ctx_swap(&g_sched_sp, f.sp);
#else
  swapcontext(&g_sched_ctx, &f.ctx);
#endif
  asan_finish_switch(fake, nullptr, nullptr);
  g_cur = nullptr;
}

// Fiber -> scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
  ++g_switches;
  Fiber *f = g_cur;
  asan_start_switch(f->done ? nullptr : &f->asan_fake_stack, g_sched_stack_bottom,
                    g_sched_stack_size);
#if defined(__x86_64__)
  emu_ctx_swap(&f->sp, g_sched_sp);
#else
  swapcontext(&f->ctx, &g_sched_ctx);
#endif
  asan_finish_switch(f->asan_fake_stack, nullptr, nullptr);
}

inline void fiber_entry() {
  asan_finish_switch(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
  g_body();
  g_cur->done = true;
  yield(); // never returns: a finished fiber is not resumed
  abort();
}

} // namespace emu

extern "C" __attribute__((used, weak)) void emu_fiber_main() { emu::fiber_entry(); }

namespace emu {

// A fresh fiber for f, starting in fiber_entry with flush-to-zero / denormals-are-zero set
// (--use_fast_math's --ftz=true), whatever the scheduler's own MXCSR is.
inline void init_fiber(Fiber &f) {
  f.done = false;
  f.wait = nullptr;
  f.groups.clear();
  f.open.clear();
  f.asan_fake_stack = nullptr;
#ifdef EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes); // frames of the stack's last fiber
#endif
#if defined(__x86_64__)
  uint64_t *s = reinterpret_cast<uint64_t *>(f.stack + kStackBytes);
  *--s = 0;                                                      // alignment slot
  *--s = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);      // emu_ctx_swap's ret
  for (int i = 0; i < 6; ++i) *--s = 0;                          // rbp rbx r12-r15
  uint16_t fpcw;
  asm volatile("fnstcw %0" : "=m"(fpcw));
  *--s = uint64_t(_mm_getcsr() | 0x8040u) | (uint64_t(fpcw) << 32); // MXCSR FTZ|DAZ
  f.sp = s;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, emu_fiber_main, 0);
#endif
}

inline int lane() { return g_cur->flat % 32; }
inline int warp() { return g_cur->flat / 32; }
inline WarpScratch &ws() { return g_ws[warp()]; }
inline unsigned char *smem() { return g_smem; }

// ---------------------------------------------------------------------------------------
// Race check: shared-memory hazards per barrier epoch (see the top of this file).
namespace race {
inline uint32_t g_epoch = 0;          // block epoch: +1 per __syncthreads and per block
inline std::vector<uint32_t> g_wepoch; // per warp: +1 per warp barrier (collective)
inline uint32_t g_block_serial = 0;   // +1 per block: tags in-flight cp.async
inline long g_hazards = 0;            // this block's
inline long g_hazards_total = 0;

#ifdef EMU_RACECHECK
constexpr uint16_t kNone = 0xffff;
struct Cell {             // the shadow of one shared-memory byte
  uint32_t w_epoch = 0;   // block epoch of the last write (0: none)
  uint32_t w_wepoch = 0;  // the writer's warp epoch then
  uint32_t r_epoch = 0;   // block epoch of the reads below
  uint32_t r_warps = 0;   // warps that read in r_epoch (bit per warp)
  uint32_t r_wepoch = 0;  // warp epoch of r_tid's read
  uint32_t pending = 0;   // block serial of an in-flight cp.async to this byte (0: none)
  uint16_t w_tid = kNone; // last writer
  uint16_t r_tid = kNone; // last reader (for the intra-warp checks)
  uint16_t pend_tid = kNone;
  bool r_many = false;    // several lanes of r_tid's warp read in r_wepoch
};
inline Cell g_shadow[fk::kEmuMaxSmem];

// The function that made an access, for the report (the race build links with -rdynamic).
__attribute__((no_sanitize_thread)) inline std::string where(const void *pc) {
  Dl_info info;
  if (!pc || !dladdr(pc, &info)) return "?";
  if (!info.dli_sname) { // a local symbol: where for addr2line -f -C -e
    char buf[512];
    snprintf(buf, sizeof buf, "%s+%#tx", info.dli_fname,
             static_cast<const char *>(pc) - static_cast<const char *>(info.dli_fbase));
    return buf;
  }
  int status = 0;
  char *d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : info.dli_sname;
  free(d);
  if (s.size() > 160) s = s.substr(0, 157) + "...";
  return s;
}

__attribute__((no_sanitize_thread)) inline void report(const char *what, size_t off, int other,
                                                       const void *pc) {
  ++g_hazards;
  ++g_hazards_total;
  if (g_hazards > 8) return; // enough to find it; the count is printed at the end
  const int me = g_cur->flat;
  char vs[64] = "";
  if (other != kNone) snprintf(vs, sizeof vs, " vs thread %d (warp %d)", other, other / 32);
  fprintf(stderr, "emu: RACE %s at shared byte %zu: thread %d (warp %d)%s, block %u,%u,%u%s%s, in %s\n",
          what, off, me, me / 32, vs, g_block.x, g_block.y, g_block.z, g_case ? ", " : "",
          g_case ? g_case : "", where(pc).c_str());
}

// One access of n bytes at p by the current thread. kind: 'r' read, 'w' write, 'i' issue of
// a cp.async (checked as a write, then in flight), 'l' a cp.async landing (its wait).
__attribute__((no_sanitize_thread)) inline void access(const void *p, size_t n, char kind,
                                                       const void *pc) {
  const size_t off = size_t(static_cast<const unsigned char *>(p) - g_smem);
  if (off >= fk::kEmuMaxSmem || !g_cur) return; // not shared memory / not in a kernel
  if (off + n > g_smem_bytes) {
    report("access past the launch's dynamic shared memory", off, kNone, pc);
    return;
  }
  const uint16_t me = uint16_t(g_cur->flat);
  const int w = me / 32;
  const uint32_t E = g_epoch, W = g_wepoch[w];
  // Whether an access by thread t (warp epoch we, same block epoch) is unordered with ours.
  auto unordered = [&](uint16_t t, uint32_t we) { return t != me && (t / 32 != w || we == W); };
  for (size_t x = off; x < off + n; ++x) {
    Cell &c = g_shadow[x];
    const bool in_flight = c.pending == g_block_serial;
    if (kind == 'r') {
      if (in_flight) return report("read of a cp.async destination before its wait", x, c.pend_tid, pc);
      if (c.w_epoch == E && unordered(c.w_tid, c.w_wepoch))
        return report("read-after-write", x, c.w_tid, pc);
      if (c.r_epoch != E) {
        c.r_epoch = E, c.r_warps = 0, c.r_tid = kNone;
      }
      c.r_warps |= 1u << w;
      if (c.r_tid != kNone && c.r_tid / 32 == w && c.r_wepoch == W) {
        c.r_many |= c.r_tid != me;
      } else {
        c.r_tid = me, c.r_wepoch = W, c.r_many = false;
      }
      continue;
    }
    if (kind == 'l') { // the landing: the wait orders it after everything of this thread's
      c.pending = 0;
      c.w_epoch = E, c.w_wepoch = W, c.w_tid = me;
      continue;
    }
    if (in_flight) return report("write to a cp.async destination still in flight", x, c.pend_tid, pc);
    if (c.r_epoch == E) {
      const uint32_t others = c.r_warps & ~(1u << w);
      if (others) {
        // Name a reader of another warp: r_tid if it is one, else the first such warp.
        const uint16_t t = c.r_tid != kNone && c.r_tid / 32 != w ? c.r_tid
                                                                 : uint16_t(32 * __builtin_ctz(others));
        return report("write-after-read", x, t, pc);
      }
      if (c.r_tid != kNone && c.r_wepoch == W && (c.r_tid != me || c.r_many))
        return report("write-after-read (same warp, no __syncwarp)", x, c.r_tid, pc);
    }
    if (c.w_epoch == E && unordered(c.w_tid, c.w_wepoch))
      return report("write-after-write", x, c.w_tid, pc);
    if (kind == 'i') {
      c.pending = g_block_serial, c.pend_tid = me;
    } else {
      c.w_epoch = E, c.w_wepoch = W, c.w_tid = me;
    }
  }
}
#else
inline void access(const void *, size_t, char, const void *) {}
#endif
} // namespace race

// ---------------------------------------------------------------------------------------
// Barriers and the scheduler.
inline void barrier_wait(Barrier &b) {
  if (++b.count == b.expected) {
    b.count = 0;
    ++b.gen;
    if (&b == &g_block_bar) ++race::g_epoch;
    else ++race::g_wepoch[&b - g_warp_bar.data()];
    return;
  }
  g_cur->wait = &b;
  g_cur->wait_gen = b.gen;
  yield();
  g_cur->wait = nullptr;
}
inline void warp_sync() { barrier_wait(g_warp_bar[warp()]); }

// Resumes the runnable lanes of warp w once each (in random order if rng).
inline bool step_warp(std::vector<Fiber> &fibers, int w, std::mt19937_64 *rng) {
  int lanes[32], n = 0;
  for (int l = 0; l < 32; ++l)
    if (fibers[32 * w + l].runnable()) lanes[n++] = l;
  if (rng) std::shuffle(lanes, lanes + n, *rng);
  for (int i = 0; i < n; ++i)
    if (fibers[32 * w + lanes[i]].runnable()) resume(fibers[32 * w + lanes[i]]);
  return n > 0;
}
inline bool warp_runnable(const std::vector<Fiber> &fibers, int w) {
  for (int l = 0; l < 32; ++l)
    if (fibers[32 * w + l].runnable()) return true;
  return false;
}

// Ahead of the first launch: EMU_SCHEDULE, and a note for faults inside a kernel (then the
// handler that was there before runs, as the faulting access repeats).
inline struct sigaction g_prev_segv;
inline void guard_fault(int, siginfo_t *si, void *) {
  sigaction(SIGSEGV, &g_prev_segv, nullptr);
  if (!g_cur) return;
  char msg[320];
  const int n = snprintf(msg, sizeof msg,
                         "emu: invalid memory access at %p (past the end of an emulated global "
                         "allocation, or a misaligned 16-byte access if 0) in block %u,%u,%u "
                         "thread %d%s%s\n",
                         si->si_addr, g_block.x, g_block.y, g_block.z, g_cur ? g_cur->flat : -1,
                         g_case ? ", " : "", g_case ? g_case : "");
  if (write(2, msg, size_t(n)) < 0) {}
}

inline void setup_once() {
  if (!g_schedule_read) set_schedule(getenv("EMU_SCHEDULE"));
#ifndef EMU_ASAN
  static bool installed = false;
  if (!installed) {
    installed = true;
    struct sigaction sa {};
    sa.sa_sigaction = guard_fault;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, &g_prev_segv);
  }
#endif
}

EMU_UNTRACKED inline void poison_smem(size_t bytes) {
  memset(g_smem, 0xFF, bytes); // NaN halves / bf16 / f32 everywhere
#ifdef EMU_ASAN
  ASAN_POISON_MEMORY_REGION(g_smem + bytes, fk::kEmuMaxSmem - bytes);
#endif
}

inline void run_block(uint3 block, std::vector<Fiber> &fibers) {
  g_block = block;
  const int n = int(fibers.size()), nw = n / 32;
  g_block_bar = Barrier{0, 0, n};
  g_warp_bar.assign(nw, Barrier{0, 0, 32});
  g_ws.assign(nw, WarpScratch{});
  ++race::g_epoch; // nothing of the previous block is unordered with this one
  race::g_wepoch.assign(nw, 0);
  ++race::g_block_serial;
  race::g_hazards = 0;
  poison_smem(g_smem_bytes);
  for (Fiber &f : fibers) init_fiber(f);
  std::mt19937_64 *rng = nullptr;
  if (g_schedule == Schedule::Random) {
    // Seeded by the block and launch shape, so that one case reruns alone identically.
    std::seed_seq seq{uint32_t(g_seed), uint32_t(g_seed >> 32), block.x, block.y, block.z,
                      g_grid.x, g_grid.y, g_grid.z, g_bdim.x, uint32_t(g_smem_bytes)};
    g_rng.seed(seq);
    rng = &g_rng;
  }
  for (;;) {
    bool ran = false;
    switch (g_schedule) {
    case Schedule::InOrder:
      for (int i = 0; i < n; ++i)
        if (fibers[i].runnable()) resume(fibers[i]), ran = true;
      break;
    case Schedule::Reverse:
      for (int i = n - 1; i >= 0; --i)
        if (fibers[i].runnable()) resume(fibers[i]), ran = true;
      break;
    case Schedule::Random: {
      int ws[32], k = 0;
      for (int w = 0; w < nw; ++w)
        if (warp_runnable(fibers, w)) ws[k++] = w;
      if (k) ran = step_warp(fibers, ws[std::uniform_int_distribution<int>(0, k - 1)(*rng)], rng);
      break;
    }
    case Schedule::RunAhead:
    case Schedule::RunAheadLast:
      for (int i = 0; i < nw && !ran; ++i) {
        const int w = g_schedule == Schedule::RunAhead ? i : nw - 1 - i;
        ran = step_warp(fibers, w, nullptr);
      }
      break;
    }
    if (ran) continue;
    bool alive = false;
    for (const Fiber &f : fibers) alive |= !f.done;
    if (!alive) break;
    // Nobody can run, yet some have not exited: they wait at a barrier that the others
    // (exited, or waiting at another barrier) never reach.
    fail("deadlock: threads wait at a barrier that the others never reach");
  }
  g_cur = nullptr;
  if (race::g_hazards) {
    fprintf(stderr, "emu: %ld shared-memory hazard(s) in block %u,%u,%u\n", race::g_hazards,
            block.x, block.y, block.z);
    fail("race check failed");
  }
}

inline void launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  setup_once();
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || n % 32) fail("bad block size");
  if (smem_bytes > fk::kEmuMaxSmem) fail("too much shared memory");
  // Fiber stacks, reused across launches, each above a PROT_NONE page (an overflow faults).
  static std::vector<char *> stacks;
  while (int(stacks.size()) < n) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    void *m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || mprotect(m, page, PROT_NONE)) fail("cannot map a fiber stack");
    stacks.push_back(static_cast<char *>(m) + page);
  }
  std::vector<Fiber> fibers(n);
  for (int i = 0; i < n; ++i) {
    fibers[i].stack = stacks[i];
    fibers[i].flat = i;
    fibers[i].tid = uint3{unsigned(i % block.x), unsigned((i / block.x) % block.y),
                          unsigned(i / (block.x * block.y))};
  }
  g_smem_bytes = smem_bytes;
  g_grid = uint3{grid.x, grid.y, grid.z};
  g_bdim = uint3{block.x, block.y, block.z};
  g_body = std::move(body);
  std::vector<uint3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(uint3{x, y, z});
  // Blocks of one launch may run in any order on a GPU.
  if (g_schedule == Schedule::Reverse || g_schedule == Schedule::RunAheadLast)
    std::reverse(order.begin(), order.end());
  if (g_schedule == Schedule::Random) {
    std::mt19937_64 r(g_seed ^ (uint64_t(grid.x) << 40 ^ uint64_t(grid.y) << 20 ^ grid.z));
    std::shuffle(order.begin(), order.end(), r);
  }
  for (const uint3 &b : order) run_block(b, fibers);
#ifdef EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(g_smem, fk::kEmuMaxSmem);
#endif
}

// ---------------------------------------------------------------------------------------
// Global memory as the suites allocate it for kernels: one allocation per tensor whose
// bounds are exactly its n elements, so that an access past the end is caught. ASan build:
// an exact heap allocation (its redzone starts right after the last element). Elsewhere:
// the end (rounded up to the alignment) touches a PROT_NONE page, so a read or write past it
// faults; the few bytes of rounding hold a canary, checked when the array is freed.
// Aligned like cudaMalloc'd memory as far as the kernels need (16 bytes by default: cp.async
// and uint4 accesses; 256 for workspaces that promise it).
template <typename T> class DeviceArray {
public:
  DeviceArray() { allocate(0, 16); }
  explicit DeviceArray(size_t n, const T &v = T(), size_t align = 16) { assign(n, v, align); }
  explicit DeviceArray(const std::vector<T> &v) {
    allocate(v.size(), 16);
    std::copy(v.begin(), v.end(), p_);
  }
  DeviceArray(const DeviceArray &o) {
    allocate(o.n_, o.align_);
    std::copy(o.begin(), o.end(), p_);
  }
  DeviceArray &operator=(const DeviceArray &o) {
    if (this != &o) {
      release();
      allocate(o.n_, o.align_);
      std::copy(o.begin(), o.end(), p_);
    }
    return *this;
  }
  DeviceArray(DeviceArray &&o) noexcept { swap(o); }
  DeviceArray &operator=(DeviceArray &&o) noexcept {
    swap(o);
    return *this;
  }
  ~DeviceArray() { release(); }
  void assign(size_t n, const T &v, size_t align = 16) {
    release();
    allocate(n, align);
    std::fill(p_, p_ + n, v);
  }
  T *data() { return p_; }
  const T *data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  T &operator[](size_t i) { return p_[i]; }
  const T &operator[](size_t i) const { return p_[i]; }
  T *begin() { return p_; }
  T *end() { return p_ + n_; }
  const T *begin() const { return p_; }
  const T *end() const { return p_ + n_; }

private:
  static constexpr unsigned char kCanary = 0xA5;
  void swap(DeviceArray &o) {
    std::swap(p_, o.p_), std::swap(n_, o.n_), std::swap(align_, o.align_);
    std::swap(base_, o.base_), std::swap(len_, o.len_);
  }
  void allocate(size_t n, size_t align) {
    n_ = n, align_ = align;
    const size_t bytes = n * sizeof(T);
#ifdef EMU_ASAN
    void *p = nullptr;
    if (posix_memalign(&p, std::max(align, sizeof(void *)), bytes)) abort();
    base_ = p;
    p_ = static_cast<T *>(p);
#else
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t used = (bytes + align - 1) / align * align;
    len_ = (used + page - 1) / page * page + page;
    base_ = mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) abort();
    unsigned char *guard = static_cast<unsigned char *>(base_) + len_ - page;
    if (mprotect(guard, page, PROT_NONE)) abort();
    p_ = reinterpret_cast<T *>(guard - used);
    memset(reinterpret_cast<unsigned char *>(p_) + bytes, kCanary, used - bytes);
#endif
  }
  void release() {
    if (!base_) return;
#ifdef EMU_ASAN
    free(base_);
#else
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const unsigned char *end = reinterpret_cast<const unsigned char *>(p_ + n_);
    for (const unsigned char *c = end; c < static_cast<unsigned char *>(base_) + len_ - page; ++c)
      if (*c != kCanary) {
        fprintf(stderr, "emu: a kernel wrote past the end of a %zu-element array (byte %td "
                        "after its end)\n", n_, c - end);
        abort();
      }
    munmap(base_, len_);
#endif
    base_ = nullptr, p_ = nullptr, n_ = 0;
  }
  T *p_ = nullptr;
  size_t n_ = 0, align_ = 16;
  void *base_ = nullptr;
  size_t len_ = 0;
};

// --use_fast_math's transcendentals (CUDA C++ Programming Guide, intrinsic functions, and
// the PTX ISA's ex2 / lg2.approx): the correctly rounded result moved by a deterministic
// pseudo-random error within the documented bound, with .ftz's flushing of denormal inputs
// and outputs. The tolerances of the suites then hold for what a GPU computes.
inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }
inline uint32_t mix(uint32_t x) { // murmur3's finalizer
  x ^= x >> 16, x *= 0x85ebca6bu, x ^= x >> 13, x *= 0xc2b2ae35u, x ^= x >> 16;
  return x;
}
inline uint32_t bits_of(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  return b;
}
// r moved by k units in the last place (away from zero for k > 0).
inline float add_ulps(float r, int k) {
  if (!std::isfinite(r) || r == 0.f) return r;
  uint32_t b = bits_of(r);
  b = uint32_t(int64_t(b) + k);
  float o;
  memcpy(&o, &b, 4);
  return std::isfinite(o) ? o : r;
}
// ex2.approx.ftz.f32: max error 2 ulp over the full range; exact for integers (2^n, so
// exp2(0) = 1: the hardware scales 2^frac(x) by 2^int(x)).
inline float fast_exp2f(float x) {
  x = ftz(x);
  const float r = float(std::exp2(double(x)));
  if (x == std::trunc(x)) return ftz(r);
  return ftz(add_ulps(r, int(mix(bits_of(x)) % 5) - 2));
}
// lg2.approx.ftz.f32 (__log2f): on [0.5, 2] max absolute error 2^-22, elsewhere 2 ulp.
inline float fast_log2f(float x) {
  x = ftz(x);
  const double l = std::log2(double(x));
  const uint32_t h = mix(bits_of(x) ^ 0x9e3779b9u);
  if (x >= 0.5f && x <= 2.f) // u in [-1, 1]; 3/4 of the bound leaves room for the rounding
    return float(l + (double(h) / 2147483647.5 - 1.0) * 0x1.8p-23);
  return add_ulps(float(l), int(h % 5) - 2);
}
// __expf / __logf as nvcc builds them: through ex2 / lg2 with an f32 multiply, which is
// where their larger error (2 + 1.173 |x| ulp for __expf) comes from.
inline float fast_expf(float x) { return fast_exp2f(ftz(x) * 1.44269502f); }
inline float fast_logf(float x) { return fast_log2f(x) * 0.693147182f; }

} // namespace emu

// CUDA C++ as host C++: the execution-space and storage keywords vanish, the built-in
// index variables read the current fiber.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)
#define __shared__
#define threadIdx (emu::g_cur->tid)
#define blockIdx (emu::g_block)
#define gridDim (emu::g_grid)
#define blockDim (emu::g_bdim)

// --use_fast_math turns these into the approximate instructions (and sinf etc., which the
// kernels do not use). Everything included after this header sees the models.
#define exp2f(x) ::emu::fast_exp2f(x)
#define log2f(x) ::emu::fast_log2f(x)
#define expf(x) ::emu::fast_expf(x)
#define logf(x) ::emu::fast_logf(x)
#define __expf(x) ::emu::fast_expf(x)
#define __logf(x) ::emu::fast_logf(x)
#define __log2f(x) ::emu::fast_log2f(x)

inline void __syncthreads() { emu::barrier_wait(emu::g_block_bar); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
  emu::warp_sync();
}
inline float __shfl_xor_sync(unsigned mask, float v, int m) {
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask is not emulated");
  emu::ws().f[emu::lane()] = v;
  emu::warp_sync();
  const float r = emu::ws().f[emu::lane() ^ m];
  emu::warp_sync();
  return r;
}

// ---------------------------------------------------------------------------------------
// The race build's instrumentation hooks (GCC's -fsanitize=thread ABI). Only shared memory
// is tracked; everything else returns at once.
#ifdef EMU_RACECHECK
#define EMU_HOOK extern "C" __attribute__((no_sanitize_thread, weak))
#define EMU_RW_HOOKS(N)                                                                      \
  EMU_HOOK void __tsan_read##N(void *p) {                                                    \
    emu::race::access(p, N, 'r', __builtin_return_address(0));                              \
  }                                                                                          \
  EMU_HOOK void __tsan_write##N(void *p) {                                                   \
    emu::race::access(p, N, 'w', __builtin_return_address(0));                              \
  }                                                                                          \
  EMU_HOOK void __tsan_unaligned_read##N(void *p) {                                          \
    emu::race::access(p, N, 'r', __builtin_return_address(0));                              \
  }                                                                                          \
  EMU_HOOK void __tsan_unaligned_write##N(void *p) {                                         \
    emu::race::access(p, N, 'w', __builtin_return_address(0));                              \
  }
EMU_RW_HOOKS(1)
EMU_RW_HOOKS(2)
EMU_RW_HOOKS(4)
EMU_RW_HOOKS(8)
EMU_RW_HOOKS(16)
#undef EMU_RW_HOOKS
EMU_HOOK void __tsan_read_range(void *p, unsigned long n) {
  emu::race::access(p, n, 'r', __builtin_return_address(0));
}
EMU_HOOK void __tsan_write_range(void *p, unsigned long n) {
  emu::race::access(p, n, 'w', __builtin_return_address(0));
}
EMU_HOOK void __tsan_init() {}
EMU_HOOK void __tsan_func_entry(void *) {}
EMU_HOOK void __tsan_func_exit() {}
EMU_HOOK void __tsan_vptr_update(void **, void *) {}
EMU_HOOK void __tsan_vptr_read(void **) {}
// Atomics the host code uses (static-local guards, shared_ptr, ...): plain atomics.
#define EMU_ATOMIC_HOOKS(N, T)                                                               \
  EMU_HOOK T __tsan_atomic##N##_load(const volatile T *a, int mo) {                          \
    return __atomic_load_n(a, mo);                                                           \
  }                                                                                          \
  EMU_HOOK void __tsan_atomic##N##_store(volatile T *a, T v, int mo) {                       \
    __atomic_store_n(a, v, mo);                                                              \
  }                                                                                          \
  EMU_HOOK T __tsan_atomic##N##_fetch_add(volatile T *a, T v, int mo) {                      \
    return __atomic_fetch_add(a, v, mo);                                                     \
  }                                                                                          \
  EMU_HOOK T __tsan_atomic##N##_fetch_sub(volatile T *a, T v, int mo) {                      \
    return __atomic_fetch_sub(a, v, mo);                                                     \
  }                                                                                          \
  EMU_HOOK T __tsan_atomic##N##_exchange(volatile T *a, T v, int mo) {                       \
    return __atomic_exchange_n(a, v, mo);                                                    \
  }                                                                                          \
  EMU_HOOK int __tsan_atomic##N##_compare_exchange_strong(volatile T *a, T *e, T v, int mo,  \
                                                          int fmo) {                         \
    return __atomic_compare_exchange_n(a, e, v, false, mo, fmo);                             \
  }                                                                                          \
  EMU_HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T *a, T *e, T v, int mo,    \
                                                        int fmo) {                           \
    return __atomic_compare_exchange_n(a, e, v, true, mo, fmo);                              \
  }
EMU_ATOMIC_HOOKS(8, uint8_t)
EMU_ATOMIC_HOOKS(16, uint16_t)
EMU_ATOMIC_HOOKS(32, uint32_t)
EMU_ATOMIC_HOOKS(64, uint64_t)
#undef EMU_ATOMIC_HOOKS
EMU_HOOK void __tsan_atomic_thread_fence(int mo) { __atomic_thread_fence(mo); }
EMU_HOOK void __tsan_atomic_signal_fence(int mo) { __atomic_signal_fence(mo); }
#undef EMU_HOOK
#endif
