// Part of the CPU emulator (emu.h): barriers, the block scheduler and the mock launch.
#pragma once
#include "emu_fiber.h"
#include "emu_race.h"

namespace emu {

// ---------------------------------------------------------------------------------------
// Barriers and the scheduler.
inline void barrier_wait(Barrier &b) {
  if (++b.count == b.expected) {
    b.count = 0;
    ++b.gen;
    if (&b == &g_block_bar || b.block_epoch) ++race::g_epoch;
    else if (&b >= g_warp_bar.data() && &b < g_warp_bar.data() + g_warp_bar.size())
      ++race::g_wepoch[&b - g_warp_bar.data()];
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
  ASAN_POISON_MEMORY_REGION(g_smem + bytes, fk::kEmuSmemStorage - bytes);
#endif
}

inline void run_block(uint3 block, std::vector<Fiber> &fibers) {
  g_block = block;
  const int n = int(fibers.size()), nw = n / 32;
  g_block_bar = Barrier{0, 0, n, false, "__syncthreads"};
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
    std::string why;
    for (const Fiber &f : fibers)
      if (!f.done && f.wait && f.wait->what && why.find(f.wait->what) == std::string::npos)
        why += std::string(why.empty() ? " (waiting in: " : "; ") + f.wait->what;
    if (!why.empty()) why += ")";
    fail(("deadlock: threads wait at a barrier that the others never reach" + why).c_str());
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
  if (smem_bytes > fk::kEmuSmemStorage) fail("too much shared memory");
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
  ASAN_UNPOISON_MEMORY_REGION(g_smem, fk::kEmuSmemStorage);
#endif
}

} // namespace emu
