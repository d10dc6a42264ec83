// Part of the CPU emulator (emu.h, whose top comment says what is emulated): the core
// thread model. Build flags, the shared-memory buffer, fibers (one per CUDA thread), the
// scheduler's state and schedules, and fiber switching.
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
constexpr size_t kEmuMaxSmemSm90 = 227 * 1024; // sm_90's, for the sm_90a kernels only
constexpr size_t kEmuSmemStorage = kEmuMaxSmemSm90;
}
alignas(1024) inline unsigned char emu_shared_storage[fk::kEmuSmemStorage] asm("emu_shared_memory");
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
  bool block_epoch = false; // the race check counts it as __syncthreads (named barriers)
  const char *what = nullptr; // what its waiters wait in, for a deadlock report
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

// The emulated device is a Hopper one (EMU_ARCH=sm90): the C entries take their sm_90a
// kernels (mock/launch.cuh's device_is_sm90). Suites may set it between cases.
inline bool g_sm90 = [] {
  const char *a = getenv("EMU_ARCH");
  return a != nullptr && strcmp(a, "sm90") == 0;
}();

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

} // namespace emu
