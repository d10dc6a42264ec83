// Stands in for kernels/common/sm90.cuh in the emulator's build (linked in as
// emulated/common/sm90.cuh, like mock/mma_sm80.cuh): the real header is included, so its
// shared-memory descriptors (make_smem_desc_sw128, advance_smem_desc) are the ones under
// test; its inline-PTX wrappers are renamed out of the way and emulated below per the PTX
// ISA:
// - mbarrier: init / arrive / arrive.expect_tx / try_wait.parity with phases, arrival counts
//   and transaction bytes. A phase whose arrivals and bytes are all in completes at the
//   latest legal moment: when a thread waits on it, or when the barrier's next phase starts.
//   A waiting thread sleeps until the barrier changes (all asleep: a deadlock report).
// - TMA (cp.async.bulk.tensor.2d, tiled, 16-bit elements): the box is read from global
//   memory at the issue (only its in-bounds elements; the rest is zero), its destination
//   reads as NaN from the issue and the data lands when the barrier's phase completes (a
//   wgmma that reads it before is reported: read too early, or refilled too early), with
//   the 128-, 64- or 32-byte swizzle applied to the destination address (bits 4-6 ^= bits
//   7-9 for 128 bytes). The bytes count toward the barrier's transaction count.
// - wgmma.mma_async m64nNk16 f16 / bf16 -> f32, A and B K-major in shared memory through
//   matrix descriptors (start address, leading / stride byte offsets, swizzle mode none / 128
//   / 64 / 32 bytes): a warpgroup collective (all 128 threads, the same descriptors). The
//   product is computed at the wgmma.wait_group that retires it, from shared memory as it is
//   then (the latest legal moment: a stage refilled before the wait shows as NaN); the
//   accumulators read as NaN between the issue and that wait, and a write to them in between
//   is reported. Products summed in k order per 16-k slice.
// - cp.async.mbarrier.arrive.noinc: the thread's cp.async copies land with the barrier's
//   phase (NaN and reported to a wgmma until then) and count as an arrival.
// - setmaxnreg (a warpgroup collective): each warpgroup's registers per thread, drawn from
//   the multiprocessor's 64K (every Hopper kernel runs one block per multiprocessor). A
//   warpgroup starts with the launch's share (65536 / threads rounded down to 8, at most
//   256: the most ptxas may give a kernel of that many threads); .inc waits until the other
//   warpgroups' registers leave room (requests that can never fit deadlock, as on the GPU),
//   .dec frees them; .inc below or .dec above the current count is reported. Named barriers (bar.sync id,
//   count: the race check counts their completion as a block barrier, which is exact for
//   kernels whose other threads touch shared memory only through TMA and mbarriers;
//   bar.arrive counts without waiting, and a phase with one orders nothing),
//   fences (no effect: every write is visible at once here).
//   A from registers (wgmma_rs_tb: per warp an mma.sync A fragment) and MN-major A or B
//   with the 128-byte swizzle (CUTLASS's canonical ((8,n),(8,k)):((1,LBO),(8,SBO)) in
//   16-byte units) are emulated too.
// Not emulated: other MN-major swizzles, base_offset != 0, clusters and multicast, im2col
// TMA.
#pragma once
#include "emu.h"
#include "mma_sm80.cuh" // the emulated one (smem_addr as a shared-memory offset)
#include "tma_host.cuh" // emu::TensorMap
#include <algorithm>
#include <limits>

#ifndef __grid_constant__
#define __grid_constant__
#endif
#define FK_EMULATED 1
#define mbarrier_init ptx_mbarrier_init
#define fence_barrier_init ptx_fence_barrier_init
#define mbarrier_arrive ptx_mbarrier_arrive
#define mbarrier_arrive_expect_tx ptx_mbarrier_arrive_expect_tx
#define mbarrier_try_wait ptx_mbarrier_try_wait
#define mbarrier_wait ptx_mbarrier_wait
#define tma_prefetch_descriptor ptx_tma_prefetch_descriptor
#define tma_load_2d ptx_tma_load_2d
#define tma_load_4d ptx_tma_load_4d
#define fence_proxy_async_shared ptx_fence_proxy_async_shared
#define cp_async_mbarrier_arrive_noinc ptx_cp_async_mbarrier_arrive_noinc
#define named_barrier_sync ptx_named_barrier_sync
#define named_barrier_arrive ptx_named_barrier_arrive
#define warpgroup_reg_alloc ptx_warpgroup_reg_alloc
#define warpgroup_reg_dealloc ptx_warpgroup_reg_dealloc
#define wgmma_fence ptx_wgmma_fence
#define wgmma_commit ptx_wgmma_commit
#define wgmma_wait ptx_wgmma_wait
#define fence_registers ptx_fence_registers
#define wgmma_ss ptx_wgmma_ss
#define wgmma_rs_tb ptx_wgmma_rs_tb
#include "kernels/common/sm90.cuh"
#undef mbarrier_init
#undef fence_barrier_init
#undef mbarrier_arrive
#undef mbarrier_arrive_expect_tx
#undef mbarrier_try_wait
#undef mbarrier_wait
#undef tma_prefetch_descriptor
#undef tma_load_2d
#undef tma_load_4d
#undef fence_proxy_async_shared
#undef cp_async_mbarrier_arrive_noinc
#undef named_barrier_sync
#undef named_barrier_arrive
#undef warpgroup_reg_alloc
#undef warpgroup_reg_dealloc
#undef wgmma_fence
#undef wgmma_commit
#undef wgmma_wait
#undef fence_registers
#undef wgmma_ss
#undef wgmma_rs_tb

namespace emu {
namespace sm90 {

struct Landing { // a TMA box: its bytes, where each lands
  std::vector<uint32_t> dst; // shared-memory offsets, one per 2-byte element
  std::vector<uint16_t> data;
};
struct MBarrier {
  int count = 0, pending = 0; // arrivals per phase, still missing in this one
  int64_t tx = 0;             // expected transaction bytes not yet issued (may dip below 0)
  uint32_t phase = 0;
  std::vector<Landing> landings; // issued copies of this phase
  Barrier changed;               // generation bumped on every change: wakes the waiters
};
struct WgmmaOp {
  uint64_t da, db; // da unused when A comes from registers
  int n, accumulate;
  bool a_regs, a_mn, b_mn; // A from registers (in a_vals); A / B MN-major (transposed)
  float a_vals[2][16]; // A from registers: this thread's rows (g, g + 8) of its warp
  bool chained; // its input is an earlier pending op's output (the same accumulators)
  bool last;    // no later op writes these accumulators (set when one is issued)
  float *d;
  std::vector<float> in;
  std::vector<float> (*compute)(const WgmmaOp &, const std::vector<float> &, int); // per type
};
struct ThreadState {
  std::vector<WgmmaOp> open;                // issued, not yet committed
  std::vector<std::vector<WgmmaOp>> groups; // committed, oldest first
  std::map<float *, std::vector<float>> latest; // a chained op's input: its predecessor's out
};
struct BlockState {
  uint32_t serial = ~0u;
  std::map<uint32_t, MBarrier> bars; // by shared-memory offset
  std::vector<Barrier> wg_bar;       // per warpgroup: its collectives
  Barrier named[16];
  std::vector<ThreadState> threads;
  std::vector<uint64_t> wg_desc[2];  // per warpgroup: the collective's descriptors
  std::vector<uint32_t> wg_a;        // per thread: its A registers (wgmma with A in registers)
  std::vector<uint8_t> tma_pending;  // per shared-memory byte: a TMA's, not landed yet
  std::vector<int> wg_regs;          // per warpgroup: registers per thread (setmaxnreg)
  Barrier regs_changed;              // wakes a warpgroup waiting in setmaxnreg.inc
};
inline BlockState g_block_state;

// This block's state, fresh for every block.
inline BlockState &block() {
  BlockState &b = g_block_state;
  if (b.serial != race::g_block_serial) {
    b.serial = race::g_block_serial;
    b.bars.clear();
    const int n = int(g_bdim.x * g_bdim.y * g_bdim.z);
    b.wg_bar.assign((n + 127) / 128, Barrier{0, 0, 128, false, "a warpgroup collective"});
    for (Barrier &x : b.named) x = Barrier{}, x.what = "bar.sync (named barrier)";
    b.threads.assign(n, ThreadState{});
    b.wg_desc[0].assign(b.wg_bar.size(), 0);
    b.wg_desc[1].assign(b.wg_bar.size(), 0);
    b.tma_pending.assign(fk::kEmuSmemStorage, 0);
    b.wg_a.assign(size_t(n) * 4, 0);
    b.wg_regs.assign(b.wg_bar.size(), std::min(256, 65536 / n / 8 * 8));
    b.regs_changed = Barrier{};
    b.regs_changed.what = "setmaxnreg.inc (the warpgroups' registers exceed the 64K file)";
  }
  return b;
}

inline int warpgroup() { return g_cur->flat / 128; }
// A .sync.aligned warpgroup instruction: every thread of the warpgroup arrives.
inline void warpgroup_sync() {
  BlockState &b = block();
  if (int(g_bdim.x * g_bdim.y * g_bdim.z) < 128 * (warpgroup() + 1))
    fail("warpgroup instruction in a block without that whole warpgroup");
  barrier_wait(b.wg_bar[warpgroup()]);
}

// setmaxnreg.inc (inc) / .dec to `regs` per thread for this warpgroup: its first thread
// does the accounting (sleeping until an .inc fits the 64K register file), then the
// warpgroup goes on together.
inline void set_warpgroup_regs(int regs, bool inc) {
  warpgroup_sync();
  BlockState &b = block();
  const int wg = warpgroup();
  if (g_cur->flat % 128 == 0) {
    if (inc ? regs < b.wg_regs[wg] : regs > b.wg_regs[wg])
      fail(inc ? "setmaxnreg.inc below the warpgroup's current register count"
               : "setmaxnreg.dec above the warpgroup's current register count");
    for (;;) {
      int64_t total = 0;
      for (size_t w = 0; w < b.wg_regs.size(); ++w)
        total += 128 * int64_t(int(w) == wg ? regs : b.wg_regs[w]);
      if (total <= 65536) break;
      g_cur->wait = &b.regs_changed; // until another warpgroup frees registers
      g_cur->wait_gen = b.regs_changed.gen;
      yield();
      g_cur->wait = nullptr;
    }
    b.wg_regs[wg] = regs;
    ++b.regs_changed.gen;
  }
  warpgroup_sync();
}

inline MBarrier &mbar(const uint64_t *p, bool must_exist = true) {
  const uint32_t off = fk::smem_addr(p);
  if (off % 8) fail("mbarrier not 8-byte aligned");
  auto &bars = block().bars;
  auto it = bars.find(off);
  if (it == bars.end()) {
    if (must_exist) fail("mbarrier used before mbarrier.init");
    it = bars.emplace(off, MBarrier{}).first;
  }
  return it->second;
}

EMU_UNTRACKED inline void land(MBarrier &m) {
  auto &pending = block().tma_pending;
  for (const Landing &l : m.landings)
    for (size_t i = 0; i < l.dst.size(); ++i) {
      memcpy(g_smem + l.dst[i], &l.data[i], 2);
      pending[l.dst[i]] = pending[l.dst[i] + 1] = 0;
      race::forget(g_smem + l.dst[i], 2); // cp.async copies (below) were marked in flight
    }
  m.landings.clear();
}
inline bool phase_ready(const MBarrier &m) { return m.pending == 0 && m.tx == 0; }
// Completes the current phase if everything it waits for is in.
inline bool settle(MBarrier &m) {
  if (!phase_ready(m)) return false;
  land(m);
  ++m.phase;
  m.pending = m.count;
  ++m.changed.gen;
  return true;
}
// An event of `m`'s next phase: the current one, if complete, completes first.
inline void before_event(MBarrier &m) { settle(m); }
// One arrival on the current phase (every arrive flavour ends with it).
inline void arrive(MBarrier &m) {
  if (m.pending == 0) emu::fail("mbarrier arrival beyond its count (phase still waits for bytes)");
  --m.pending;
  ++m.changed.gen;
}

} // namespace sm90
} // namespace emu

namespace fk {
namespace sm90 {

inline void mbarrier_init(uint64_t *bar, uint32_t count) {
  if (count < 1 || count > (1u << 20) - 1) emu::fail("mbarrier.init count out of range");
  emu::sm90::MBarrier &m = emu::sm90::mbar(bar, false);
  m = emu::sm90::MBarrier{};
  m.count = m.pending = int(count);
  m.changed.what = "mbarrier.try_wait";
}
inline void fence_barrier_init() {}
inline void fence_proxy_async_shared() {}
inline void tma_prefetch_descriptor(const CUtensorMap *map) { (void)emu::tensor_map(map); }

inline void mbarrier_arrive(uint64_t *bar) {
  emu::sm90::MBarrier &m = emu::sm90::mbar(bar);
  emu::sm90::before_event(m);
  emu::sm90::arrive(m);
}
inline void mbarrier_arrive_expect_tx(uint64_t *bar, uint32_t bytes) {
  emu::sm90::MBarrier &m = emu::sm90::mbar(bar);
  emu::sm90::before_event(m);
  m.tx += bytes;
  emu::sm90::arrive(m);
}
// try_wait.parity: has the phase of this parity completed (the current phase's parity is
// the other one)? A thread that finds it has not sleeps until the barrier changes, so a
// spinning loop costs one switch per change.
inline bool mbarrier_try_wait(uint64_t *bar, uint32_t parity) {
  emu::sm90::MBarrier &m = emu::sm90::mbar(bar);
  emu::sm90::settle(m);
  if ((m.phase & 1u) != (parity & 1u)) return true;
  emu::g_cur->wait = &m.changed;
  emu::g_cur->wait_gen = m.changed.gen;
  emu::yield();
  emu::g_cur->wait = nullptr;
  return false;
}
inline void mbarrier_wait(uint64_t *bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

// The swizzle of a shared-memory byte address (bits 4.. ^= bits 7..).
inline uint32_t swizzle_address(uint32_t addr, int swizzle_bytes) {
  switch (swizzle_bytes) {
  case 0: return addr;
  case 32: return addr ^ (((addr >> 7) & 1u) << 4);
  case 64: return addr ^ (((addr >> 7) & 3u) << 4);
  case 128: return addr ^ (((addr >> 7) & 7u) << 4);
  default: emu::fail("unknown swizzle"); return addr;
  }
}

// cp.async.bulk.tensor (tiled): the box at coordinates c (innermost first) of the map's
// tensor, its rows of box[0] elements stored one after another from dst, swizzled.
EMU_UNTRACKED inline void tma_load(void *dst, const CUtensorMap *map, uint64_t *bar, int rank,
                                   const int *c) {
  const emu::TensorMap &t = emu::tensor_map(map);
  if (t.rank != rank) emu::fail("TMA instruction rank differs from its tensor map's");
  const uint32_t d = smem_addr(dst);
  const uint32_t row_bytes = t.box[0] * uint32_t(t.elem_bytes);
  if (t.swizzle_bytes && row_bytes > uint32_t(t.swizzle_bytes))
    emu::fail("TMA box wider than its swizzle span");
  if (d % 128 || (t.swizzle_bytes && d % (8u * uint32_t(t.swizzle_bytes))))
    emu::fail("TMA destination not aligned to its swizzle pattern (128 B; 1024 B for 128B)");
  uint32_t rows = 1;
  for (int i = 1; i < rank; ++i) rows *= t.box[i];
  const uint32_t bytes = row_bytes * rows;
  if (d + bytes > emu::g_smem_bytes) emu::fail("TMA destination past the shared memory");
  emu::sm90::MBarrier &m = emu::sm90::mbar(bar);
  emu::sm90::before_event(m);
  emu::sm90::Landing l;
  l.dst.reserve(bytes / 2);
  l.data.reserve(bytes / 2);
  for (uint32_t y = 0; y < rows; ++y) {
    // Row y of the box: its coordinates along dims 1.., the first fastest.
    int64_t off = 0;
    bool in = true;
    uint32_t rest = y;
    for (int i = 1; i < rank; ++i) {
      const int64_t gi = int64_t(c[i]) + rest % t.box[i];
      rest /= t.box[i];
      in = in && gi >= 0 && uint64_t(gi) < t.dims[i];
      off += gi * int64_t(t.strides[i - 1]);
    }
    for (uint32_t x = 0; x < t.box[0]; ++x) {
      const int64_t gx = int64_t(c[0]) + x;
      uint16_t v = 0;
      if (in && gx >= 0 && uint64_t(gx) < t.dims[0]) memcpy(&v, t.base + off + gx * 2, 2);
      const uint32_t a = swizzle_address(d + y * row_bytes + x * 2, t.swizzle_bytes);
      l.dst.push_back(a);
      l.data.push_back(v);
      memset(emu::g_smem + a, 0xFF, 2); // NaN until it lands
      emu::sm90::block().tma_pending[a] = emu::sm90::block().tma_pending[a + 1] = 1;
    }
  }
  m.landings.push_back(std::move(l));
  m.tx -= bytes;
  ++m.changed.gen;
}
inline void tma_load_2d(void *dst, const CUtensorMap *map, uint64_t *bar, int c0, int c1) {
  const int c[2] = {c0, c1};
  tma_load(dst, map, bar, 2, c);
}
inline void tma_load_4d(void *dst, const CUtensorMap *map, uint64_t *bar, int c0, int c1, int c2,
                        int c3) {
  const int c[4] = {c0, c1, c2, c3};
  tma_load(dst, map, bar, 4, c);
}

// cp.async.mbarrier.arrive.noinc: this thread's cp.async copies so far (committed or
// not) land with the barrier's phase instead of at a cp.async.wait_group, and count as one
// of its arrivals. Their destinations read as NaN, and are reported if a wgmma reads them,
// until then.
EMU_UNTRACKED inline void cp_async_mbarrier_arrive_noinc(uint64_t *bar) {
  emu::sm90::MBarrier &m = emu::sm90::mbar(bar);
  emu::sm90::before_event(m);
  emu::sm90::Landing l;
  auto take = [&](const std::vector<emu::CopyOp> &ops) {
    for (const emu::CopyOp &op : ops)
      for (int i = 0; i < 8; ++i) {
        const uint32_t a = uint32_t(static_cast<unsigned char *>(op.dst) - emu::g_smem) + 2 * i;
        uint16_t v;
        memcpy(&v, op.data + 2 * i, 2);
        l.dst.push_back(a);
        l.data.push_back(v);
        emu::sm90::block().tma_pending[a] = emu::sm90::block().tma_pending[a + 1] = 1;
      }
  };
  for (const auto &g : emu::g_cur->groups) take(g);
  take(emu::g_cur->open);
  emu::g_cur->groups.clear();
  emu::g_cur->open.clear();
  m.landings.push_back(std::move(l));
  emu::sm90::arrive(m);
}

inline void named_barrier_sync(int id, int count) {
  emu::sm90::BlockState &b = emu::sm90::block();
  if (id < 1 || id > 15) emu::fail("named barrier id out of 1..15");
  if (count % 32 || count < 32 || count > int(emu::g_bdim.x * emu::g_bdim.y * emu::g_bdim.z))
    emu::fail("named barrier thread count");
  emu::Barrier &n = b.named[id];
  if (n.count == 0)
    n.expected = count, n.block_epoch = true;
  else if (n.expected != count)
    emu::fail("named barrier used with two thread counts at once");
  emu::barrier_wait(n);
}
// bar.arrive: counts toward the phase without waiting. A phase with such an arrival orders
// nothing for the race check (the arriving threads go on unordered).
inline void named_barrier_arrive(int id, int count) {
  emu::sm90::BlockState &b = emu::sm90::block();
  if (id < 1 || id > 15) emu::fail("named barrier id out of 1..15");
  if (count % 32 || count < 32 || count > int(emu::g_bdim.x * emu::g_bdim.y * emu::g_bdim.z))
    emu::fail("named barrier thread count");
  emu::Barrier &n = b.named[id];
  if (n.count == 0)
    n.expected = count;
  else if (n.expected != count)
    emu::fail("named barrier used with two thread counts at once");
  n.block_epoch = false;
  if (++n.count == n.expected) {
    n.count = 0;
    ++n.gen;
  }
}

template <int kRegs> void warpgroup_reg_alloc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg range");
  emu::sm90::set_warpgroup_regs(kRegs, true);
}
template <int kRegs> void warpgroup_reg_dealloc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg range");
  emu::sm90::set_warpgroup_regs(kRegs, false);
}

template <typename T, int N> void fence_registers(T (&)[N]) {}
inline void wgmma_fence() { emu::sm90::warpgroup_sync(); }
inline void wgmma_commit() {
  emu::sm90::warpgroup_sync();
  auto &ts = emu::sm90::block().threads[emu::g_cur->flat];
  ts.groups.push_back(std::move(ts.open));
  ts.open.clear();
}

// Element (r, k) of a K-major operand described by `desc` (16-bit elements): its shared-
// memory byte address, the swizzle applied to the whole address.
inline uint32_t desc_element_address(uint64_t desc, int r, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  const int base_offset = int((desc >> 49) & 7), layout = int(desc >> 62);
  if (base_offset != 0) emu::fail("wgmma descriptor base_offset != 0 (not emulated)");
  if (layout == 0) // no swizzle: 8 x 16-byte core matrices, lbo along k, sbo along rows
    return start + uint32_t(r / 8) * sbo + uint32_t(k / 8) * lbo + uint32_t(r % 8) * 16 +
           uint32_t(k % 8) * 2;
  const int width = layout == 1 ? 128 : layout == 2 ? 64 : 32; // bytes per row of an atom
  if (k * 2 >= width) emu::fail("wgmma k slice wider than the swizzle span");
  if ((start / uint32_t(8 * width)) != (start + 31) / uint32_t(8 * width) ||
      (start % uint32_t(8 * width)) >= uint32_t(width))
    emu::fail("wgmma descriptor start not in the first row of a swizzle atom");
  const uint32_t a = start + uint32_t(r / 8) * sbo + uint32_t(r % 8) * uint32_t(width) + k * 2;
  return swizzle_address(a, width);
}

// Element (mn, k) of an MN-major operand (128-byte swizzle only): rows of 64 MN-elements,
// one per k; 8-row groups `stride byte offset` apart, 64-wide MN blocks `leading byte
// offset` apart (CUTLASS's canonical form ((8,n),(8,k)):((1,LBO),(8,SBO)) in 16-byte units).
inline uint32_t desc_element_address_mn(uint64_t desc, int mn, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  if (((desc >> 49) & 7) != 0) emu::fail("wgmma descriptor base_offset != 0 (not emulated)");
  if (int(desc >> 62) != 1)
    emu::fail("MN-major wgmma operand without the 128-byte swizzle (not emulated)");
  if (start % 1024) emu::fail("MN-major wgmma descriptor start not on a swizzle atom (1024 B)");
  const uint32_t a = start + uint32_t(mn / 64) * lbo + uint32_t(k / 8) * sbo +
                     uint32_t(k % 8) * 128 + uint32_t(mn % 64) * 2;
  return swizzle_address(a, 128);
}

template <typename T>
EMU_UNTRACKED float desc_element(uint64_t desc, int r, int k, bool mn = false) {
  const uint32_t a = mn ? desc_element_address_mn(desc, r, k) : desc_element_address(desc, r, k);
  if (a % 2 || a + 2 > emu::g_smem_bytes) emu::fail("wgmma operand past the shared memory");
  if (emu::sm90::block().tma_pending[a])
    emu::fail("wgmma read shared memory whose TMA has not landed: a stage read before its "
              "barrier's phase completed, or refilled before the wgmma reading it retired");
  uint16_t bits;
  memcpy(&bits, emu::g_smem + a, 2);
  return emu_detail::to_float(T(), bits);
}

// The product of one op for thread t of its warpgroup, from `in` (the accumulators before it).
template <typename T>
std::vector<float> wgmma_compute(const emu::sm90::WgmmaOp &op, const std::vector<float> &in,
                                 int t) {
  const int w = t / 32, lane = t % 32, g = lane / 4, q = lane % 4;
  float a[2][16];
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k)
      a[h][k] =
          op.a_regs ? op.a_vals[h][k] : desc_element<T>(op.da, 16 * w + g + 8 * h, k, op.a_mn);
  std::vector<float> out(size_t(op.n / 2));
  for (int i = 0; i < op.n / 2; ++i) {
    const int j = i / 4, h = (i % 4) / 2, col = 8 * j + 2 * q + (i % 2);
    float s = op.accumulate ? in[size_t(i)] : 0.f;
    for (int k = 0; k < 16; ++k) s += a[h][k] * desc_element<T>(op.db, col, k, op.b_mn);
    out[size_t(i)] = s;
  }
  return out;
}

// Issues one wgmma for this thread (a warpgroup collective): checks that the warpgroup
// agrees on the descriptors, gathers A from the warpgroup's registers if a != nullptr, and
// queues the op (computed at the wait that retires it); the accumulators read NaN till then.
template <typename T, int N>
void wgmma_issue(float (&d)[N / 2], const uint32_t *a, uint64_t desc_a, uint64_t desc_b,
                 int accumulate, bool a_mn, bool b_mn) {
  emu::sm90::BlockState &b = emu::sm90::block();
  const int wg = emu::sm90::warpgroup(), t = emu::g_cur->flat % 128;
  if (t == 0) b.wg_desc[0][wg] = desc_a, b.wg_desc[1][wg] = desc_b;
  if (a != nullptr) std::copy(a, a + 4, &b.wg_a[size_t(emu::g_cur->flat) * 4]);
  emu::sm90::warpgroup_sync();
  if (b.wg_desc[0][wg] != desc_a || b.wg_desc[1][wg] != desc_b)
    emu::fail("wgmma descriptors differ across the warpgroup");
  emu::sm90::WgmmaOp op{desc_a, desc_b, N, accumulate, a != nullptr,     a_mn, b_mn, {},
                        false,  true,   d, {},         &wgmma_compute<T>};
  if (a != nullptr) { // rows g, g + 8 of this warp: lanes 4 g' + kk / 2 hold them
    const int warp0 = emu::g_cur->flat / 32 * 32, g = (t % 32) / 4;
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) {
        const int kk = k % 8, reg = h + (k >= 8 ? 2 : 0);
        const uint32_t r = b.wg_a[size_t(warp0 + 4 * g + kk / 2) * 4 + size_t(reg)];
        op.a_vals[h][k] = emu_detail::to_float(T(), emu_detail::half_of(r, kk % 2));
      }
  }
  emu::sm90::warpgroup_sync(); // all have read the scratch before anyone's next issue
  auto &ts = b.threads[emu::g_cur->flat];
  for (emu::sm90::WgmmaOp &o : ts.open)
    if (o.d == d) op.chained = true, o.last = false;
  for (auto &g : ts.groups)
    for (emu::sm90::WgmmaOp &o : g)
      if (o.d == d) op.chained = true, o.last = false;
  if (!op.chained) op.in.assign(d, d + N / 2);
  for (int i = 0; i < N / 2; ++i) d[i] = std::numeric_limits<float>::quiet_NaN();
  ts.open.push_back(std::move(op));
}

template <typename T, int N, int kTransA = 0, int kTransB = 0>
void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  wgmma_issue<T, N>(d, nullptr, desc_a, desc_b, accumulate, kTransA != 0, kTransB != 0);
}
template <typename T, int N>
void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  wgmma_issue<T, N>(d, a, 0, desc_b, accumulate, false, true);
}

// wgmma.wait_group N: the ops of all but the N most recent groups retire, in issue order
// (each thread computes its own accumulators; the whole warpgroup has before any thread
// returns); an op's accumulators get its result only if no later pending op writes them.
template <int N> void wgmma_wait() {
  emu::sm90::warpgroup_sync();
  auto &ts = emu::sm90::block().threads[emu::g_cur->flat];
  const int t = emu::g_cur->flat % 128;
  while (int(ts.groups.size()) > N) {
    for (const emu::sm90::WgmmaOp &op : ts.groups.front()) {
      for (int i = 0; i < op.n / 2; ++i)
        if (!std::isnan(op.d[i]))
          emu::fail("wgmma accumulator written while the wgmma was in flight");
      std::vector<float> out = op.compute(op, op.chained ? ts.latest.at(op.d) : op.in, t);
      if (op.last) {
        std::copy(out.begin(), out.end(), op.d);
        ts.latest.erase(op.d);
      } else {
        ts.latest[op.d] = std::move(out);
      }
    }
    ts.groups.erase(ts.groups.begin());
  }
  // The retired ops are the warpgroup's: done for all its threads before any goes on.
  emu::sm90::warpgroup_sync();
}

} // namespace sm90
} // namespace fk
