// Part of the CPU emulator (emu.h): the race check. Shared-memory hazards per barrier
// epoch, and the race build's instrumentation hooks that feed it (see emu.h's top).
#pragma once
#include "emu_fiber.h"

namespace emu {

// ---------------------------------------------------------------------------------------
// Race check: shared-memory hazards per barrier epoch (see the top of emu.h).
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
inline Cell g_shadow[fk::kEmuSmemStorage];

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
  if (off >= fk::kEmuSmemStorage || !g_cur) return; // not shared memory / not in a kernel
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
// Forgets what the shadow knows of n bytes: an asynchronous copy ordered by an mbarrier
// (which the epoch model cannot express) has landed there; its ordering is checked by the
// emulator's poisoning instead (mock/sm90.cuh).
__attribute__((no_sanitize_thread)) inline void forget(const void *p, size_t n) {
  const size_t off = size_t(static_cast<const unsigned char *>(p) - g_smem);
  if (off >= fk::kEmuSmemStorage) return;
  for (size_t x = off; x < off + n && x < fk::kEmuSmemStorage; ++x) g_shadow[x] = Cell{};
}
#else
inline void access(const void *, size_t, char, const void *) {}
inline void forget(const void *, size_t) {}
#endif
} // namespace race

} // namespace emu

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
