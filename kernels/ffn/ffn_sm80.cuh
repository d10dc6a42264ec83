// The fused feed-forward forward on the tile GEMM core (kernels/common/gemm_sm80.cuh): two
// launches of tile_gemm_kernel with the FFN's own loader and epilogue policies.
//
//   GEMM1: A = x (tokens x d_model), B = W1, or W1 and W3 interleaved (gated); epilogue:
//          h = act(acc1 + b1) [* (acc3 + b3)], stored once in the storage dtype.
//   GEMM2: A = h, B = W2; epilogue: y = acc + b2 [+ x].
//
// Gating shares the loads of x: the B operand of the gated GEMM1 is the (2 d_hidden x
// d_model) matrix whose rows, in runs of 8, alternate W1 and W3 (rows 16 i .. 16 i + 7 are
// W1's 8 i .. 8 i + 7, rows 16 i + 8 .. 16 i + 15 are W3's). Every warp's n range starts at
// a multiple of 16 (warp tiles of 32 columns), so its MMA n-tiles 2 p and 2 p + 1 hold
// x W1ᵀ and x W3ᵀ of the same 8 hidden units, in the same registers' (row, col) slots:
// the epilogue combines them without a shared-memory round trip, and the block's 64 GEMM
// columns become 32 columns of h.
#pragma once

#include "../common/gemm_sm80.cuh"
#include "ffn.h"

namespace fk {
namespace ffn {

using gemm::IndexMap3;

// Tile configuration: the convolution family's 128 x 64 x 64 tiles, 4 warps of 64 x 32
// (kNTiles = 4 per warp: two W1/W3 pairs when gated).
template <typename Element>
using FfnGemmTraits = gemm::TileGemmTraitsSm80<Element, 128, 64, 2, 2, 2>;

// The hidden activation (fk_ffn_activation), in f32.
__device__ __forceinline__ float ffn_activate(float v, int act) {
  switch (act) {
  case FK_FFN_RELU: return fmaxf(v, 0.f);
  case FK_FFN_GELU_TANH: {
    const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.f + tanhf(inner));
  }
  case FK_FFN_GELU_ERF: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  case FK_FFN_SILU: return v / (1.f + expf(-v));
  default: return v;
  }
}

// W1 and W3 seen as one interleaved (2 d_hidden x d_model) operand (see the top).
template <typename Element> struct InterleavedOperand {
  const Element *w1, *w3;
  int64_t ld1, ld3; // row strides
  int rows, cols;   // 2 d_hidden, d_model
  bool vec;         // 16-byte cp.async allowed (host-checked: strides, alignment)
};

// Interleaved row r -> (matrix, row) of W1 or W3.
__host__ __device__ __forceinline__ bool interleaved_is_gate(int r) { return (r & 15) >= 8; }
__host__ __device__ __forceinline__ int interleaved_hidden(int r) { return (r >> 4) * 8 + (r & 7); }

// Fills ROWS x kBlockK tiles of the interleaved operand; the same thread layout as
// gemm::StridedLoader (one 16-byte chunk column, ROWS / (threads / 8) rows per thread).
template <class Traits, int ROWS> struct InterleavedLoader {
  using Element = typename Traits::Element;
  using Operand = InterleavedOperand<Element>;
  static constexpr int kRowsPerPass = Traits::kNThreads / Traits::Tile::kChunksPerRow;
  static constexpr int kPasses = ROWS / kRowsPerPass;
  static_assert(kPasses * kRowsPerPass == ROWS, "tile rows must split evenly over threads");

  const Operand &op;
  int chunk, row_in_pass;
  const Element *row_ptr[kPasses]; // null past the last row

  __device__ InterleavedLoader(const Operand &op_, int row0, int tid)
      : op(op_), chunk(tid % Traits::Tile::kChunksPerRow),
        row_in_pass(tid / Traits::Tile::kChunksPerRow) {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int row = row0 + i * kRowsPerPass + row_in_pass;
      const int hidden = interleaved_hidden(row);
      row_ptr[i] = row >= op.rows             ? nullptr
                   : interleaved_is_gate(row) ? op.w3 + hidden * op.ld3
                                              : op.w1 + hidden * op.ld1;
    }
  }

  __device__ void load(Element *tile, int k0) const {
    const int col = k0 + chunk * 8;
    const bool full = op.vec && col + 8 <= op.cols;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      Element *dst = tile + Traits::Tile::offset(i * kRowsPerPass + row_in_pass, chunk);
      if (row_ptr[i] == nullptr || col >= op.cols) {
        cp_async_16(smem_addr(dst), op.w1, 0);
      } else if (full) {
        cp_async_16(smem_addr(dst), row_ptr[i] + col, 16);
      } else {
        alignas(16) Element v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          v[e] = col + e < op.cols ? row_ptr[i][col + e] : from_float<Element>(0.f);
        *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(v);
      }
    }
  }
};

// What the FFN epilogue writes: out (rows x out_cols, row stride ld, unit column stride) =
// act(acc + bias) [* (acc_gate + bias_gate)] [+ residual], rounded once.
template <typename Element> struct FfnEpilogueParams {
  Element *out;
  int64_t ld;
  const Element *bias;      // (out_cols) or null
  const Element *bias_gate; // gated: (out_cols) or null
  const Element *residual;  // rows x out_cols, row stride res_ld, or null
  int64_t res_ld;
  int rows, cols; // the GEMM's M and N (N = 2 out_cols when gated): what sizes the grid
  int out_cols;
  int activation; // fk_ffn_activation, 0 = none
  bool vec;       // 16-byte stores allowed (host-checked: ld, alignment)
};

// Epilogue policy (gemm_sm80.cuh's interface): accumulators -> bias, activation, gate,
// residual in f32 -> the storage dtype in shared staging -> 16-byte row stores. Gated, the
// W3 product of n-tile j sits in n-tile j + 1 (kGateHalves false: the interleaved operand
// above, j even) or in n-tile j + kNTiles / 2 (true: gemm_sm90.cuh's gated B, whose tile is
// W1's rows then W3's; the warp spans the block's columns).
template <class Traits, bool kGated, bool kGateHalves = false> struct FfnEpilogue {
  using Element = typename Traits::Element;
  using Params = FfnEpilogueParams<Element>;
  static constexpr int kOutCols = kGated ? Traits::kBlockN / 2 : Traits::kBlockN;
  static_assert(!kGated || Traits::kNTiles % 2 == 0, "W1/W3 n-tiles come in pairs");
  static_assert(kGated || !kGateHalves, "halves only describe a gated operand");

  static __device__ void apply(const float (&acc)[Traits::kMTiles][Traits::kNTiles][4],
                               const Params &ep, Element *smem, int m0, int n0, int warp_m0,
                               int warp_n0) {
    constexpr int LD = Traits::kStageLd;
    constexpr int kStep = kGated && !kGateHalves ? 2 : 1;          // n-tiles per output n-tile
    constexpr int kGate = kGateHalves ? Traits::kNTiles / 2 : 1;    // W3's n-tile: j + kGate
    constexpr int kEnd = kGateHalves ? Traits::kNTiles / 2 : Traits::kNTiles;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int out_n0 = kGated ? n0 / 2 : n0;
#pragma unroll
    for (int j = 0; j < kEnd; j += kStep)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        // Local output column: interleaved pairs (j, j + 1) give 8 columns at
        // (warp_n0 + 8 j) / 2; halves: n-tile j is output n-tile j.
        const int n = (kGateHalves ? warp_n0 / 2 + j * 8 : (warp_n0 + j * 8) / kStep) + 2 * t + c;
        const bool col_in = out_n0 + n < ep.out_cols;
        const float b = ep.bias != nullptr && col_in ? to_float(ep.bias[out_n0 + n]) : 0.f;
        const float bg =
            kGated && ep.bias_gate != nullptr && col_in ? to_float(ep.bias_gate[out_n0 + n]) : 0.f;
#pragma unroll
        for (int mt = 0; mt < Traits::kMTiles; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int m = warp_m0 + mt * 16 + g + 8 * r;
            float v = ffn_activate(acc[mt][j][2 * r + c] + b, ep.activation);
            if (kGated) v *= acc[mt][kGated ? j + kGate : j][2 * r + c] + bg;
            if (ep.residual != nullptr && col_in && m0 + m < ep.rows)
              v += to_float(ep.residual[int64_t(m0 + m) * ep.res_ld + out_n0 + n]);
            smem[m * LD + n] = from_float<Element>(v);
          }
      }
    Traits::epilogue_barrier();

    constexpr int kChunks = kOutCols / 8;
    for (int i = threadIdx.x; i < Traits::kBlockM * kChunks; i += Traits::kNThreads) {
      const int m = i / kChunks, n = (i % kChunks) * 8;
      if (m0 + m >= ep.rows || out_n0 + n >= ep.out_cols) continue;
      Element *dst = ep.out + int64_t(m0 + m) * ep.ld + out_n0 + n;
      if (ep.vec && out_n0 + n + 8 <= ep.out_cols) {
        *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(smem + m * LD + n);
      } else {
        for (int e = 0; e < 8 && out_n0 + n + e < ep.out_cols; ++e) dst[e] = smem[m * LD + n + e];
      }
    }
  }
};

inline bool aligned16(const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A row-major matrix with unit column stride as a GEMM operand.
template <typename T>
gemm::StridedOperand<T> matrix_operand(const void *base, int64_t ld, int rows, int cols) {
  gemm::StridedOperand<T> o{};
  o.base = static_cast<const T *>(base);
  o.row_map = IndexMap3::linear(ld);
  o.col_map = IndexMap3::linear(1);
  o.rows = rows, o.cols = cols;
  o.group_stride = 0;
  o.vec = ld % 8 == 0 && aligned16(base);
  return o;
}

template <typename T>
FfnEpilogueParams<T> epilogue_params(void *out, int64_t ld, int rows, int out_cols) {
  FfnEpilogueParams<T> ep{};
  ep.out = static_cast<T *>(out);
  ep.ld = ld;
  ep.rows = rows, ep.cols = out_cols, ep.out_cols = out_cols;
  ep.vec = ld % 8 == 0 && aligned16(out);
  return ep;
}

template <typename T> cudaError_t ffn_fwd(const fk_ffn_params &p, cudaStream_t stream) {
  using Traits = FfnGemmTraits<T>;
  using ALoader = gemm::StridedLoader<Traits, Traits::kBlockM>;
  using BLoader = gemm::StridedLoader<Traits, Traits::kBlockN>;
  const auto x = matrix_operand<T>(p.x, p.x_stride, p.tokens, p.d_model);

  // GEMM1 -> h.
  auto ep1 = epilogue_params<T>(p.h, p.h_stride, p.tokens, p.d_hidden);
  ep1.bias = static_cast<const T *>(p.b1);
  ep1.activation = p.activation;
  cudaError_t err;
  if (p.w3 != nullptr) {
    InterleavedOperand<T> w{};
    w.w1 = static_cast<const T *>(p.w1), w.w3 = static_cast<const T *>(p.w3);
    w.ld1 = p.w1_stride, w.ld3 = p.w3_stride;
    w.rows = 2 * p.d_hidden, w.cols = p.d_model;
    w.vec = p.w1_stride % 8 == 0 && p.w3_stride % 8 == 0 && aligned16(p.w1) && aligned16(p.w3);
    ep1.bias_gate = static_cast<const T *>(p.b3);
    ep1.cols = 2 * p.d_hidden;
    err = gemm::launch_tile_gemm<Traits, ALoader, InterleavedLoader<Traits, Traits::kBlockN>,
                                 FfnEpilogue<Traits, true>>(x, w, ep1, p.d_model, 1, stream);
  } else {
    const auto w1 = matrix_operand<T>(p.w1, p.w1_stride, p.d_hidden, p.d_model);
    err = gemm::launch_tile_gemm<Traits, ALoader, BLoader, FfnEpilogue<Traits, false>>(
        x, w1, ep1, p.d_model, 1, stream);
  }
  if (err != cudaSuccess) return err;

  // GEMM2 -> y.
  const auto h = matrix_operand<T>(p.h, p.h_stride, p.tokens, p.d_hidden);
  const auto w2 = matrix_operand<T>(p.w2, p.w2_stride, p.d_model, p.d_hidden);
  auto ep2 = epilogue_params<T>(p.y, p.y_stride, p.tokens, p.d_model);
  ep2.bias = static_cast<const T *>(p.b2);
  if (p.residual) ep2.residual = static_cast<const T *>(p.x), ep2.res_ld = p.x_stride;
  return gemm::launch_tile_gemm<Traits, ALoader, BLoader, FfnEpilogue<Traits, false>>(
      h, w2, ep2, p.d_hidden, 1, stream);
}

} // namespace ffn
} // namespace fk
