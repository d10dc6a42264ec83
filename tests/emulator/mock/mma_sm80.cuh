// Stands in for kernels/common/mma_sm80.cuh in the emulator's build (scripts/
// emulate_kernels.sh links it in as emulated/common/mma_sm80.cuh). The real header is
// included as well, so its ElemTraits and SwizzledTile are the ones under test; only its
// inline-PTX wrappers are renamed out of the way (never called) and replaced below by
// emulations with the PTX ISA's semantics.
#pragma once
#include "emu.h"

#define mma_16x8x16 ptx_mma_16x8x16
#define smem_addr ptx_smem_addr
#define ldmatrix_x4 ptx_ldmatrix_x4
#define ldmatrix_x4_trans ptx_ldmatrix_x4_trans
#define cp_async_16 ptx_cp_async_16
#define cp_async_commit ptx_cp_async_commit
#define cp_async_wait ptx_cp_async_wait
#define __cvta_generic_to_shared(p) ((void)(p), 0) // device-only; used by the renamed smem_addr
#include "kernels/common/mma_sm80.cuh"
#undef mma_16x8x16
#undef smem_addr
#undef ldmatrix_x4
#undef ldmatrix_x4_trans
#undef cp_async_16
#undef cp_async_commit
#undef cp_async_wait
#undef __cvta_generic_to_shared

namespace fk {
namespace emu_detail {
inline float to_float(__half, uint16_t bits) {
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}
inline float to_float(__nv_bfloat16, uint16_t bits) {
  __nv_bfloat16_raw r;
  r.x = bits;
  return __bfloat162float(__nv_bfloat16(r));
}
inline uint16_t half_of(uint32_t r, int hi) { return uint16_t(hi ? r >> 16 : r & 0xffff); }

// A 16-bit shared-memory read on behalf of a collective (ldmatrix) of the current thread.
EMU_NO_TRACK inline uint16_t smem_b16(uint32_t byte_off, const void *pc) {
  if (byte_off + 2 > emu::g_smem_bytes || byte_off % 2)
    emu::fail("shared-memory read out of range");
  emu::race::access(emu::smem() + byte_off, 2, 'r', pc);
  uint16_t v;
  memcpy(&v, emu::smem() + byte_off, 2);
  return v;
}
} // namespace emu_detail

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D (16x8) = A (16x16) B (16x8) + C.
// a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t.., n g),
// b1 (k 2t+8.., n g); c0,c1 (g, 2t..), c2,c3 (g+8, 2t..). Products are exact in f32 and
// summed in k order (the hardware's order is unspecified).
template <typename T>
void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using emu_detail::half_of;
  auto &w = emu::ws();
  const int lane = emu::lane();
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  emu::warp_sync();
  auto A = [&](int r, int k) {
    const int g = r % 8, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), kk = k % 8;
    return emu_detail::to_float(T(), half_of(w.a[4 * g + kk / 2][reg], kk % 2));
  };
  auto B = [&](int k, int n) {
    const int kk = k % 8;
    return emu_detail::to_float(T(), half_of(w.b[4 * n + kk / 2][k >= 8 ? 1 : 0], kk % 2));
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
    float s = c[e];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    out[e] = s;
  }
  emu::warp_sync(); // everyone has read the scratch before it is reused
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

// Shared-memory "addresses" are byte offsets into the block's dynamic shared memory.
inline uint32_t smem_addr(const void *p) {
  const long off = (const unsigned char *)p - emu::smem();
  if (off < 0 || size_t(off) >= emu::g_smem_bytes) emu::fail("shared-memory address out of range");
  return uint32_t(off);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane 8 m + i gives the address of
// row i of matrix m; lane 4 g + t receives, in register m, elements (g, 2t..2t+1) of
// matrix m (.trans: elements (2t, g) and (2t+1, g)).
template <bool kTrans> EMU_UNTRACKED void ldmatrix_impl(uint32_t (&r)[4], uint32_t addr) {
  using emu_detail::smem_b16;
  const void *pc = __builtin_return_address(0); // in the kernel, for race reports
  auto &w = emu::ws();
  const int lane = emu::lane();
  if (addr % 16) emu::fail("ldmatrix address not 16-byte aligned");
  w.addr[lane] = addr;
  emu::warp_sync();
  const int g = lane / 4, t = lane % 4;
  uint32_t out[4];
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!kTrans) {
      const uint32_t row = w.addr[8 * m + g];
      lo = smem_b16(row + 2 * (2 * t), pc);
      hi = smem_b16(row + 2 * (2 * t + 1), pc);
    } else {
      lo = smem_b16(w.addr[8 * m + 2 * t] + 2 * g, pc);
      hi = smem_b16(w.addr[8 * m + 2 * t + 1] + 2 * g, pc);
    }
    out[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  emu::warp_sync();
  for (int m = 0; m < 4; ++m) r[m] = out[m];
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl<false>(r, addr); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl<true>(r, addr); }

// cp.async.cg.shared.global 16 bytes, src_bytes of them read (the rest zero-filled). The
// source is read at the issue (so a bad address is reported where the kernel issued it);
// the destination reads as NaN until a wait retires the group the copy was committed in,
// which is when the data lands.
EMU_UNTRACKED inline void cp_async_16(uint32_t dst, const void *src, int src_bytes) {
  if (dst % 16 || dst + 16 > emu::g_smem_bytes)
    emu::fail("cp.async destination out of range or misaligned");
  if (src_bytes != 0 && src_bytes != 16) emu::fail("cp.async src_bytes not 0 or 16");
  if (src_bytes && reinterpret_cast<uintptr_t>(src) % 16)
    emu::fail("cp.async source not 16-byte aligned");
  emu::race::access(emu::smem() + dst, 16, 'i', __builtin_return_address(0));
  emu::CopyOp op{emu::smem() + dst, {}};
  if (src_bytes) memcpy(op.data, src, 16);
  memset(emu::smem() + dst, 0xFF, 16);
  emu::g_cur->open.push_back(op);
}
inline void cp_async_commit() {
  emu::g_cur->groups.push_back(std::move(emu::g_cur->open));
  emu::g_cur->open.clear();
}
// cp.async.wait_group N: all but the N most recent committed groups have landed.
template <int N> EMU_UNTRACKED void cp_async_wait() {
  auto &gs = emu::g_cur->groups;
  while (int(gs.size()) > N) {
    for (auto &op : gs.front()) {
      emu::race::access(op.dst, 16, 'l', __builtin_return_address(0));
      memcpy(op.dst, op.data, 16);
    }
    gs.erase(gs.begin());
  }
}

} // namespace fk
