// The warpgroup-level products of the Hopper attention kernels (dense_fwd_sm90.cuh,
// dense_bwd_sm90.cuh), over tiles TMA laid out as 64-column blocks of 128-byte-swizzled
// rows (block b of a tile of R rows at b R 128 bytes), with the accumulators in mma.sync's
// per-warp m16n8 fragment layout (one m-tile of 64 rows per warpgroup).
#pragma once

#include "../../common/mma_sm80.cuh"
#include "../../common/sm90.cuh"

namespace fk {
namespace attn {

// What the Hopper attention kernels' traits share: head dims padded to a wgmma n of
// sm90.cuh, tiles as 64-column blocks (one 128-byte swizzle span each), a producer
// warpgroup and two consumer warpgroups of 64 rows (384 threads), and the setmaxnreg split
// of the 64K registers between them (24 + 2 x 240 a thread).
template <int kHeadDim_, typename Element_> struct WarpgroupTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "wgmma n of sm90.cuh");
  static constexpr int kDBlocks = kHeadDim / 64;
  static constexpr int kConsumers = 2, kLaunchThreads = 384;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
};

// acc (64 x N) += A B^T over the head dim D: A's 64 rows of the warpgroup at `a` (in a tile
// of a_rows rows), B's N rows at `b` (a tile of N rows); both K-major. One wgmma group is
// left open (the caller commits).
template <typename Element, int N, int D>
__device__ __forceinline__ void wgmma_rows_x_rows(float (&acc)[N / 2], const unsigned char *a,
                                                  int a_rows, const unsigned char *b) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int blk = ks / 4, kb = 32 * (ks % 4);
    const uint64_t da = sm90::make_smem_desc_sw128(a + blk * a_rows * 128);
    const uint64_t db = sm90::make_smem_desc_sw128(b + blk * N * 128);
    sm90::wgmma_ss<Element, N>(acc, sm90::advance_smem_desc(da, kb),
                               sm90::advance_smem_desc(db, kb), 1);
  }
}

// acc (64 x N) += A B: A (64 x K) from registers as mma.sync A fragments (pack_a), B
// (K x N) the K rows of a tile at `b`, read MN-major (P V, dS K, P^T dO, dS^T Q).
template <typename Element, int N, int K>
__device__ __forceinline__ void wgmma_regs_x_rows(float (&acc)[N / 2],
                                                  const uint32_t (&a)[K / 16][4],
                                                  const unsigned char *b) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
    sm90::wgmma_rs_tb<Element, N>(acc, a[kk],
                                  sm90::make_smem_desc_sw128_mn(b + kk * 16 * 128, K * 128), 1);
}

// f32 accumulators (64 x K: n-tiles 2 kk and 2 kk + 1 of k-step kk) as the A fragments of
// a wgmma from registers.
template <typename Element, int NT>
__device__ __forceinline__ void pack_a(const float (&acc)[NT][4], uint32_t (&a)[NT / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    a[kk][0] = ElemTraits<Element>::pack(acc[2 * kk][0], acc[2 * kk][1]);
    a[kk][1] = ElemTraits<Element>::pack(acc[2 * kk][2], acc[2 * kk][3]);
    a[kk][2] = ElemTraits<Element>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[kk][3] = ElemTraits<Element>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

// Row r (0: g, 1: g + 8) of an accumulator tile (64 x 8 NT) times `scale` into `row` (the
// tensor's row of that index), two elements a store, columns below `cols`.
template <typename Element, int NT>
__device__ __forceinline__ void store_row_pairs(Element *row, const float (&acc)[NT][4], int r,
                                                float scale, int cols, int t) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int col = 8 * j + 2 * t;
    if (col < cols)
      *reinterpret_cast<uint32_t *>(row + col) =
          ElemTraits<Element>::pack(acc[j][2 * r] * scale, acc[j][2 * r + 1] * scale);
  }
}

} // namespace attn
} // namespace fk
