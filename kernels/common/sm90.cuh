// Hopper (sm_90a) primitives shared by every Hopper kernel: mbarriers, TMA tile loads
// (cp.async.bulk.tensor completing on an mbarrier), wgmma with shared-memory matrix
// descriptors, warpgroup register reallocation (setmaxnreg) and named barriers; on the
// host, tensor maps encoded through the driver's entry point (no -lcuda link).
//
// Every kernel built on these compiles its body only under FK_SM90_DEVICE_CODE (sm_90a's
// device pass, or the CPU emulator, whose tests/emulator/mock/sm90.cuh replaces the inline
// PTX below by emulations of the PTX ISA's semantics, as mock/mma_sm80.cuh does for mma.sync):
// the build compiles every kernel for sm_80..sm_90a, and wgmma / setmaxnreg exist only on
// sm_90a. On the other targets such a kernel is empty and never launched: callers choose it
// at run time with device_is_sm90() (launch.cuh).
//
// Shared-memory layout of a wgmma operand (K-major, 16-bit elements, 128-byte swizzle): a
// tile of R rows x 64 elements, row r at byte 128 r, its 16-byte chunk c stored at chunk
// c ^ (r % 8): SwizzledTile<64>'s layout, and what TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B. The swizzle is a function of the address bits (bits 4-6 ^=
// bits 7-9), so every such tile starts 1024-byte aligned.
#pragma once

#include <type_traits>

#include <cuda.h> // CUtensorMap and the encoder's signature only; nothing links libcuda
#include <cuda_runtime.h>
#include <stdint.h>

#include "mma_sm80.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FK_EMULATED)
#define FK_SM90_DEVICE_CODE 1
#endif

namespace fk {
namespace sm90 {

// ---------------------------------------------------------------------------------------
// mbarrier (shared::cta, 64-bit). A phase completes when its `count` arrivals are done and
// the transaction bytes announced with arrive_expect_tx have landed; waiters name the parity
// of the phase they wait for (the first phase has parity 0).
__device__ __forceinline__ void mbarrier_init(uint64_t *bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
// Makes the initialised barriers visible to the async proxy (TMA) before the block barrier
// that publishes them.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t *bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t *bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t *bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n.reg .pred p;\n"
               "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
               "selp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done)
               : "r"(smem_addr(bar)), "r"(parity)
               : "memory");
  return done != 0;
}
// Blocks until the phase of the given parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t *bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

// ---------------------------------------------------------------------------------------
// TMA: one thread copies a box of a tensor (described by a tensor map passed as a
// __grid_constant__ kernel parameter) into shared memory; the bytes complete on `bar`.
// Coordinates are in elements, innermost first; the box's parts outside the tensor are
// zero-filled.
__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap *map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
__device__ __forceinline__ void tma_load_2d(void *dst, const CUtensorMap *map, uint64_t *bar,
                                            int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(smem_addr(dst)),
               "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
               : "memory");
}

__device__ __forceinline__ void tma_load_4d(void *dst, const CUtensorMap *map, uint64_t *bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(smem_addr(dst)),
               "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2),
               "r"(c3)
               : "memory");
}

// cp.async.mbarrier.arrive.noinc: one arrival on `bar` once all of this thread's earlier
// cp.async copies have landed (the barrier's count includes these arrivals).
__device__ __forceinline__ void cp_async_mbarrier_arrive_noinc(uint64_t *bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar))
               : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy
// accesses (wgmma / TMA reading or overwriting them).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---------------------------------------------------------------------------------------
// Named barrier over `count` threads (whole warps), id 1..15 (0 is __syncthreads').
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Arrives at named barrier `id` without waiting: with named_barrier_sync over the same
// count, one warpgroup can hand a turn to another (ping-pong scheduling).
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// setmaxnreg: a warpgroup gives up (dec) or claims (inc) registers; every warp of the
// warpgroup executes it. Needs a register cap at entry (__launch_bounds__(threads, 1)).
template <int kRegs> __device__ __forceinline__ void warpgroup_reg_alloc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg range");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs> __device__ __forceinline__ void warpgroup_reg_dealloc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg range");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---------------------------------------------------------------------------------------
// wgmma (warpgroup = 4 consecutive warps starting at a multiple of 4). Issue order:
// wgmma_fence() (orders the accumulator registers' earlier writes), wgmma_ss..., then
// wgmma_commit() closes a group and wgmma_wait<N>() waits until at most N groups are
// pending; only then may the accumulators be read or the operands' shared memory reused.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator accesses across the asynchronous wgmma, and
// (uint32_t: an A operand in registers) from reusing the registers of an A operand that an
// issued wgmma may still read: fence it after the wait that retires the wgmma.
template <typename T, int N> __device__ __forceinline__ void fence_registers(T (&d)[N]) {
  static_assert(sizeof(T) == 4, "32-bit registers");
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (std::is_same<T, float>::value)
      asm volatile("" : "+f"(d[i])::"memory");
    else
      asm volatile("" : "+r"(d[i])::"memory");
  }
}

// Shared-memory matrix descriptor: start address, leading / stride byte offsets (16-byte
// units) and the swizzle mode (bits 62-63: 0 none, 1 128-byte, 2 64-byte, 3 32-byte).
// For a K-major 128-byte-swizzled operand the stride byte offset is the distance between
// 8-row groups (1024 bytes) and the leading one is unused (1). The k-th 16-element slice of
// a 64-element row starts 32 k bytes later: the hardware applies the swizzle to the full
// address, so advancing the start address is how k steps through a swizzled row.
constexpr int kSwizzle128B = 1;
__device__ __forceinline__ uint64_t make_smem_desc_sw128(const void *tile) {
  const uint32_t addr = smem_addr(tile);
  uint64_t desc = 0;
  desc |= uint64_t((addr & 0x3FFFF) >> 4);
  desc |= uint64_t(1) << 16;               // leading byte offset (unused)
  desc |= uint64_t(1024 >> 4) << 32;       // stride byte offset: 8 rows of 128 bytes
  desc |= uint64_t(kSwizzle128B) << 62;
  return desc;
}
// The descriptor of the same tile `bytes` further along K (bytes < 128, a multiple of 32).
__device__ __forceinline__ uint64_t advance_smem_desc(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);
}

// D (64 x N, f32) [+]= A (64 x 16) B (N x 16)^T from shared memory, each operand K-major
// (kTrans 0) or MN-major (kTrans 1: make_smem_desc_sw128_mn's layout). Thread t of the
// warpgroup holds d[4 j + 2 h + c] = D(16 (t / 32) + (t % 32) / 4 + 8 h, 8 j + 2 (t % 4) + c):
// per warp, mma.sync m16n8 accumulator tiles side by side along N.
template <typename Element, int N, int kTransA, int kTransB> struct WgmmaSS;
template <typename Element, int N, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                         int accumulate) {
  WgmmaSS<Element, N, kTransA, kTransB>::run(d, desc_a, desc_b, accumulate);
}

// An MN-major operand (M or N contiguous, as V (keys x head dim) is for O += P V): the
// tile stored as rows of 64 MN-elements (128 bytes, 128-byte swizzle), one row per k, as
// TMA writes a (64 x rows) box; 8-row groups 1024 bytes apart (stride byte offset) and the
// 64-wide MN blocks `n_block_bytes` apart (leading byte offset). The k-th 16-row slice
// starts 2048 k bytes later (advance_smem_desc).
__device__ __forceinline__ uint64_t make_smem_desc_sw128_mn(const void *tile,
                                                            uint32_t n_block_bytes) {
  const uint32_t addr = smem_addr(tile);
  uint64_t desc = 0;
  desc |= uint64_t((addr & 0x3FFFF) >> 4);
  desc |= uint64_t((n_block_bytes & 0x3FFFF) >> 4) << 16;
  desc |= uint64_t(1024 >> 4) << 32;
  desc |= uint64_t(kSwizzle128B) << 62;
  return desc;
}

// D (64 x N, f32) [+]= A (64 x 16, registers) B (16 x N, MN-major in shared memory). A is
// per warp an mma.sync m16n8k16 A fragment of rows 16 (t / 32).. (a0 (g, 2q..), a1 (g + 8,
// 2q..), a2 (g, 2q + 8..), a3 (g + 8, 2q + 8..)): P from the S accumulators, as on sm80.
template <typename Element, int N> struct WgmmaRS;
template <typename Element, int N>
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4],
                                            uint64_t desc_b, int accumulate) {
  WgmmaRS<Element, N>::run(d, a, desc_b, accumulate);
}

// The wrappers' inline PTX for every (element type, N in 32 64 128 256): the accumulators
// are asm operands %0 .. %(N/2 - 1) (FK_WGMMA_ACC_N), the inputs follow them (i0.., given
// as "%k" strings). One FK_WGMMA_N writes the four wrappers of an N.
// clang-format off
#define FK_WGMMA_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define FK_WGMMA_F16(i) FK_WGMMA_F4(i), FK_WGMMA_F4(i + 4), FK_WGMMA_F4(i + 8), FK_WGMMA_F4(i + 12)
#define FK_WGMMA_F64(i) FK_WGMMA_F16(i), FK_WGMMA_F16(i + 16), FK_WGMMA_F16(i + 32), FK_WGMMA_F16(i + 48)
#define FK_WGMMA_OPS_32 FK_WGMMA_F16(0)
#define FK_WGMMA_OPS_64 FK_WGMMA_F16(0), FK_WGMMA_F16(16)
#define FK_WGMMA_OPS_128 FK_WGMMA_F64(0)
#define FK_WGMMA_OPS_256 FK_WGMMA_F64(0), FK_WGMMA_F64(64)
#define FK_WGMMA_R16 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
#define FK_WGMMA_R32 FK_WGMMA_R16 "," "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define FK_WGMMA_R64 FK_WGMMA_R32 "," "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47" \
                                  "," "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define FK_WGMMA_R128 FK_WGMMA_R64 "," "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79" \
                                   "," "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95" \
                                   "," "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111" \
                                   "," "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define FK_WGMMA_ACC_32 "{" FK_WGMMA_R16 "}"
#define FK_WGMMA_ACC_64 "{" FK_WGMMA_R32 "}"
#define FK_WGMMA_ACC_128 "{" FK_WGMMA_R64 "}"
#define FK_WGMMA_ACC_256 "{" FK_WGMMA_R128 "}"
// The predicate p = (operand `acc` != 0): accumulate or overwrite.
#define FK_WGMMA_HEAD(acc) "{\n.reg .pred p;\nsetp.ne.b32 p, " acc ", 0;\n"
#define FK_WGMMA_OP(N, PT) "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PT "." PT " "

// SS: desc_a i0, desc_b i1, accumulate i2, transpose A / B i3 / i4. RS: a[0..3] i0..i3,
// desc_b i4, accumulate i5 (B MN-major: transpose-b 1).
#define FK_WGMMA_TYPE(CT, PT, N, i0, i1, i2, i3, i4, i5)                                        \
  template <int kTransA, int kTransB> struct WgmmaSS<CT, N, kTransA, kTransB> {                 \
    static __device__ __forceinline__ void run(float (&d)[N / 2], uint64_t desc_a,              \
                                               uint64_t desc_b, int accumulate) {               \
      asm volatile(FK_WGMMA_HEAD(i2) FK_WGMMA_OP(N, PT) FK_WGMMA_ACC_##N                        \
                   ", " i0 ", " i1 ", p, 1, 1, " i3 ", " i4 ";\n}\n"                             \
                   : FK_WGMMA_OPS_##N                                                           \
                   : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));   \
    }                                                                                           \
  };                                                                                            \
  template <> struct WgmmaRS<CT, N> {                                                           \
    static __device__ __forceinline__ void run(float (&d)[N / 2], const uint32_t (&a)[4],       \
                                               uint64_t desc_b, int accumulate) {               \
      asm volatile(FK_WGMMA_HEAD(i5) FK_WGMMA_OP(N, PT) FK_WGMMA_ACC_##N                        \
                   ", {" i0 ", " i1 ", " i2 ", " i3 "}, " i4 ", p, 1, 1, 1;\n}\n"                \
                   : FK_WGMMA_OPS_##N                                                           \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate)); \
    }                                                                                           \
  };
#define FK_WGMMA_N(N, i0, i1, i2, i3, i4, i5)                                                   \
  FK_WGMMA_TYPE(__half, "f16", N, i0, i1, i2, i3, i4, i5)                                       \
  FK_WGMMA_TYPE(__nv_bfloat16, "bf16", N, i0, i1, i2, i3, i4, i5)

FK_WGMMA_N(32, "%16", "%17", "%18", "%19", "%20", "%21")
FK_WGMMA_N(64, "%32", "%33", "%34", "%35", "%36", "%37")
FK_WGMMA_N(128, "%64", "%65", "%66", "%67", "%68", "%69")
FK_WGMMA_N(256, "%128", "%129", "%130", "%131", "%132", "%133")
// clang-format on

} // namespace sm90

} // namespace fk
