// CPU emulator of CUDA thread blocks, so that the kernels of kernels/ can be run and
// checked against an f64 reference on any machine (scripts/emulate_kernels.sh).
// Why: GPU time comes in sessions; between them kernels still change, and they are checked
// here, on CPUs. The kernel sources are compiled unmodified as host C++.
//
// Emulated: every CUDA thread is a fiber (ucontext), blocks run one after another;
// __syncthreads and warp collectives are barriers, and a barrier some threads never reach
// aborts as a deadlock. mma.sync m16n8k16 (f16/bf16, f32 accumulate), ldmatrix .x4 (and
// .trans) and __shfl_xor_sync compute each lane's result from all lanes' inputs per the PTX
// ISA. A cp.async destination reads as NaN until the wait that retires its group, and shared
// memory starts every block as NaN, so reading data that has not landed or was never
// written shows up as NaN. Shared-memory bounds and alignment, and the 99 KB limit, are
// checked.
// Not emulated: races between warps (fibers switch only at barriers and collectives, so a
// missing __syncthreads between warps is usually not caught; a missing cp.async wait is);
// timing, occupancy, bank conflicts, registers and spills; --use_fast_math precision.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>
using std::max;
using std::min;

// Dynamic shared memory: one buffer, since blocks run one at a time. A kernel declares
// `extern __shared__ unsigned char smem_raw[]` in its function body; with __shared__
// defined away below, that names a global of the kernel's namespace. Every such namespace
// gets a declaration here bound to the same symbol (a kernel in a namespace not listed
// fails to link: undefined reference to ...::smem_raw).
namespace fk {
constexpr size_t kEmuMaxSmem = 99 * 1024; // sm_86 / sm_89 per-block limit, the strictest
alignas(128) inline unsigned char smem_raw[kEmuMaxSmem] asm("emu_shared_memory");
namespace dense_bwd_detail {
extern unsigned char smem_raw[kEmuMaxSmem] asm("emu_shared_memory");
}
namespace gemm {
extern unsigned char smem_raw[kEmuMaxSmem] asm("emu_shared_memory");
}
namespace longformer_bwd_detail {
extern unsigned char smem_raw[kEmuMaxSmem] asm("emu_shared_memory");
}
} // namespace fk

namespace emu {

struct CopyOp {
  void *dst;
  const void *src;
  int bytes;
};

struct Fiber {
  ucontext_t ctx;
  char *stack = nullptr;
  uint3 tid;
  int flat = 0;
  bool done = false;
  std::vector<std::vector<CopyOp>> groups; // committed cp.async groups, oldest first
  std::vector<CopyOp> open;                // issued, not yet committed
};

struct Barrier {
  int count = 0, gen = 0, expected = 0;
};

struct WarpScratch {
  uint32_t a[32][4];
  uint32_t b[32][2];
  uint32_t addr[32];
  float f[32];
};

constexpr size_t kStackBytes = 256 * 1024;

inline Fiber *g_cur = nullptr;
inline ucontext_t g_sched;
inline uint3 g_block, g_grid, g_bdim;
inline unsigned char *const g_smem = fk::smem_raw;
inline size_t g_smem_bytes = 0;
inline Barrier g_block_bar;
inline std::vector<Barrier> g_warp_bar;
inline std::vector<WarpScratch> g_ws;
inline std::function<void()> g_body;
inline bool g_progress = false; // set whenever a fiber does anything but spin at a barrier
inline long g_switches = 0;

inline void fail(const char *what) {
  fprintf(stderr, "emu: %s (block %u,%u,%u thread %d)\n", what, g_block.x, g_block.y, g_block.z,
          g_cur ? g_cur->flat : -1);
  abort();
}

inline void yield() {
  ++g_switches;
  swapcontext(&g_cur->ctx, &g_sched);
}
inline void barrier_wait(Barrier &b) {
  const int gen = b.gen;
  g_progress = true;
  if (++b.count == b.expected) {
    b.count = 0;
    ++b.gen;
    return;
  }
  while (b.gen == gen) yield();
  g_progress = true;
}
inline int lane() { return g_cur->flat % 32; }
inline int warp() { return g_cur->flat / 32; }
inline void warp_sync() { barrier_wait(g_warp_bar[warp()]); }
inline WarpScratch &ws() { return g_ws[warp()]; }
inline unsigned char *smem() { return g_smem; }

inline void fiber_entry() {
  g_body();
  g_cur->done = true;
  g_progress = true;
  swapcontext(&g_cur->ctx, &g_sched);
}

inline void run_block(uint3 block, std::vector<Fiber> &fibers) {
  g_block = block;
  const int n = int(fibers.size());
  g_block_bar = Barrier{0, 0, n};
  g_warp_bar.assign((n + 31) / 32, Barrier{0, 0, 32});
  g_ws.assign((n + 31) / 32, WarpScratch{});
  memset(g_smem, 0xFF, fk::kEmuMaxSmem); // NaN halves / bf16 everywhere
  for (Fiber &f : fibers) {
    f.done = false;
    f.groups.clear();
    f.open.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  int alive = n;
  while (alive > 0) {
    alive = 0;
    g_progress = false;
    for (Fiber &f : fibers) {
      if (f.done) continue;
      g_cur = &f;
      swapcontext(&g_sched, &f.ctx);
      if (!f.done) ++alive;
    }
    // A whole round in which every live thread only re-checked its barrier: none of them
    // can ever get past it (some threads exited, or diverged to another barrier).
    if (alive > 0 && !g_progress) {
      g_cur = nullptr;
      fail("deadlock: threads wait at a barrier that the others never reach");
    }
  }
  g_cur = nullptr;
}

inline void launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || n % 32) fail("bad block size");
  if (smem_bytes > fk::kEmuMaxSmem) fail("too much shared memory");
  static std::vector<std::unique_ptr<char[]>> stacks; // reused across launches
  while (int(stacks.size()) < n) stacks.emplace_back(new char[kStackBytes]);
  std::vector<Fiber> fibers(n);
  for (int i = 0; i < n; ++i) {
    fibers[i].stack = stacks[i].get();
    fibers[i].flat = i;
    fibers[i].tid = uint3{unsigned(i % block.x), unsigned((i / block.x) % block.y),
                          unsigned(i / (block.x * block.y))};
  }
  g_smem_bytes = smem_bytes;
  g_grid = uint3{grid.x, grid.y, grid.z};
  g_bdim = uint3{block.x, block.y, block.z};
  g_body = std::move(body);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(uint3{x, y, z}, fibers);
}

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
