// The warp-level tensor-core loops every attention kernel is built from (dense and
// Longformer, forward and backward), on SwizzledTile tiles (mma_sm80.cuh notation, lane =
// 4 g + t). A warp owns MT 16-row m-tiles of the result:
// - gemm_abt: acc += A B^T over the head dim, S = Q K^T (and dP = dO V^T, S^T = K Q^T, ...):
//   A from a row-major tile (SmemA) or from registers (RegA), B from a tile whose rows are
//   the N index; each B fragment read from shared memory feeds all MT m-tiles.
// - gemm_xb: acc += X B, O += P V (and dV += P^T dO, dK += dS^T Q, dQ += dS K): X held as
//   f32 accumulators and packed pairwise into A fragments (P never touches shared memory),
//   B from a tile whose rows are the K index, read with ldmatrix trans.
// The backward works on single m-tiles: the overloads on [NT][4] arrays are MT = 1 views.
#pragma once

#include "../../common/mma_sm80.cuh"

namespace fk {
namespace attn {

template <int A, int B> __device__ __forceinline__ void zero(float (&x)[A][B][4]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) x[a][b][e] = 0.f;
}

template <int NT> __device__ __forceinline__ void zero(float (&x)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[j][e] = 0.f;
}

// SwizzledTile<COLS>::offset(row, 2 c + h) split into a per-thread part and a
// compile-time one, for a lane's ldmatrix row (row & 7 == r) and half h (0 or 1): chunk
// 2 c + h = 8 (c / 4) + (2 (c % 4) ^ h), and the XOR with r < 8 only touches the low three
// bits, so offset = row COLS + 64 (c / 4) + ((2 (c % 4) ^ h ^ r) << 3). Only the four
// values of the last term depend on the lane: every fragment address of a loop is then one
// of four registers plus a constant (folded into ldmatrix's immediate), instead of one
// loop-invariant register per (k-step, tile) that the compiler hoists out of the key loop
// (at D = 256 those 16 Q addresses spilled).
struct SwizzleCols {
  int x; // h ^ r
  __device__ __forceinline__ SwizzleCols(int h, int r) : x(h ^ r) {}
  // Element offset, within its row, of chunk 2 c + h (c a compile-time constant once
  // unrolled).
  __device__ __forceinline__ int operator()(int c) const {
    return (c / 4) * 64 + (((2 * (c % 4)) ^ x) << 3);
  }
};
// The lane pattern of an A fragment (and of ldmatrix trans on a row-major B tile): rows
// (lane % 8) + 8 ((lane / 8) & 1), chunk half lane / 16.
__device__ __forceinline__ int frag_row_a(int lane) { return (lane % 8) + ((lane / 8) & 1) * 8; }
__device__ __forceinline__ SwizzleCols frag_cols_a(int lane) {
  return SwizzleCols(lane / 16, lane % 8);
}
// The lane pattern of a B fragment pair (gemm_abt): rows 8 (lane / 16) + lane % 8, chunk
// half (lane / 8) & 1.
__device__ __forceinline__ int frag_row_b(int lane) { return (lane / 16) * 8 + (lane % 8); }
__device__ __forceinline__ SwizzleCols frag_cols_b(int lane) {
  return SwizzleCols((lane / 8) & 1, lane % 8);
}

// A fragment (rows [row0, row0 + 16), k-step ks) of a row-major tile of COLS columns
// (row0 a multiple of 8).
template <int COLS, typename Element>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Element *tile, int row0, int ks,
                                       int lane) {
  ldmatrix_x4(a, smem_addr(tile + (row0 + frag_row_a(lane)) * COLS + frag_cols_a(lane)(ks)));
}

// A operands of gemm_abt: m-tile mt is rows [row0 + 16 mt, row0 + 16 mt + 16) of a
// row-major shared tile ...
template <int COLS, typename Element> struct SmemA {
  const Element *tile;
  int row0;
  __device__ __forceinline__ void load(uint32_t (&a)[4], int mt, int ks, int lane) const {
    load_a<COLS>(a, tile, row0 + mt * 16, ks, lane);
  }
};

// ... or fragments already in registers (one m-tile: frag[ks] is k-step ks).
template <int KSteps> struct RegA {
  const uint32_t (&frag)[KSteps][4];
  __device__ __forceinline__ void load(uint32_t (&a)[4], int, int ks, int) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) a[e] = frag[ks][e];
  }
};

// acc (MT m-tiles x 8 NT columns) += A B^T over K = COLS: A from a_src, B the tile b_tile
// whose 8 NT rows are the N index and whose columns are the K index.
template <int COLS, int MT, int NT, class ASource, typename Element>
__device__ __forceinline__ void gemm_abt(float (&acc)[MT][NT][4], const ASource &a_src,
                                         const Element *b_tile, int lane) {
  static_assert(NT % 2 == 0, "column tiles come in pairs");
#pragma unroll
  for (int ks = 0; ks < COLS / 16; ++ks) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) a_src.load(a[mt], mt, ks, lane);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      ldmatrix_x4(b, smem_addr(b_tile + (j * 8 + frag_row_b(lane)) * COLS + frag_cols_b(lane)(ks)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16x8x16<Element>(acc[mt][j], a[mt], b[0], b[1]);
        mma_16x8x16<Element>(acc[mt][j + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// One m-tile, A = rows [a_row0, a_row0 + 16) of the row-major tile a_tile.
template <int COLS, int NT, typename Element>
__device__ __forceinline__ void gemm_abt(float (&acc)[NT][4], const Element *a_tile, int a_row0,
                                         const Element *b_tile, int lane) {
  gemm_abt<COLS>(reinterpret_cast<float (&)[1][NT][4]>(acc), SmemA<COLS, Element>{a_tile, a_row0},
                 b_tile, lane);
}

// acc (MT m-tiles x COLS) += X B over K = 8 KT: X the f32 accumulators x (8-column tiles
// 2 kk and 2 kk + 1 are the A fragment of k-step kk), B the row-major tile b_tile whose
// 8 KT rows are the K index, contiguous along N = COLS.
template <int COLS, int MT, int KT, typename Element>
__device__ __forceinline__ void gemm_xb(float (&acc)[MT][COLS / 8][4], const float (&x)[MT][KT][4],
                                        const Element *b_tile, int lane) {
  using ET = ElemTraits<Element>;
  static_assert(KT % 2 == 0, "k-steps are 16 wide");
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = ET::pack(x[mt][2 * kk][0], x[mt][2 * kk][1]);
      a[mt][1] = ET::pack(x[mt][2 * kk][2], x[mt][2 * kk][3]);
      a[mt][2] = ET::pack(x[mt][2 * kk + 1][0], x[mt][2 * kk + 1][1]);
      a[mt][3] = ET::pack(x[mt][2 * kk + 1][2], x[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int np = 0; np < COLS / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(
          b, smem_addr(b_tile + (kk * 16 + frag_row_a(lane)) * COLS + frag_cols_a(lane)(np)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16x8x16<Element>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16x8x16<Element>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// One m-tile.
template <int COLS, int KT, typename Element>
__device__ __forceinline__ void gemm_xb(float (&acc)[COLS / 8][4], const float (&x)[KT][4],
                                        const Element *b_tile, int lane) {
  gemm_xb<COLS>(reinterpret_cast<float (&)[1][COLS / 8][4]>(acc),
                reinterpret_cast<const float (&)[1][KT][4]>(x), b_tile, lane);
}

} // namespace attn
} // namespace fk
