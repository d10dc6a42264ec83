// The fused feed-forward backward on the tile GEMM core (kernels/common/gemm_sm80.cuh).
// Nothing is kept from the forward but its inputs; with u = x W1ᵀ + b1, g = x W3ᵀ + b3:
//
//   1. recompute: GEMM1 again (the forward's tiles, so h is bit for bit the forward's);
//      its epilogue stores u [and g] in f32 and h in the storage dtype (workspace)
//   2. dh = dy W2, its epilogue fusing the activation's derivative:
//      du = dh [∘ g] ∘ act'(u), dg = dh ∘ act(u), stored side by side as dU = [du | dg]
//   3. dx = dU [W1; W3] (+ dy)          (one GEMM over K = d_hidden, or 2 d_hidden gated)
//   4. dW1 = duᵀ x, dW3 = dgᵀ x, dW2 = dyᵀ h   (GEMMs over the tokens)
//   5. db1, db3, db2: column sums of du, dg, dy
//
// Deterministic: every output element is summed by one thread in a fixed order (GEMM
// tiles over the whole reduction, one thread per bias column); no atomics. The transposed
// operands are read by the core's element gathers (correct first; a transposed ldmatrix
// path is the next step for speed).
#pragma once

#include "ffn_sm80.cuh"

namespace fk {
namespace ffn {

// d/dv of ffn_activate (ReLU's derivative is 0 at 0, as torch's).
__device__ __forceinline__ float ffn_activate_grad(float v, int act) {
  switch (act) {
  case FK_FFN_RELU: return v > 0.f ? 1.f : 0.f;
  case FK_FFN_GELU_TANH: {
    const float k = 0.7978845608028654f;
    const float t = tanhf(k * (v + 0.044715f * v * v * v));
    return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * v * v);
  }
  case FK_FFN_GELU_ERF:
    return 0.5f * (1.f + erff(v * 0.70710678118654752f)) +
           v * 0.3989422804014327f * expf(-0.5f * v * v);
  case FK_FFN_SILU: {
    const float s = 1.f / (1.f + expf(-v));
    return s * (1.f + v * (1.f - s));
  }
  default: return 1.f;
  }
}

// The (row, col) of an accumulator element, for epilogues that store from registers.
template <class Traits> struct AccPos {
  int m, n; // in the block's tile
  __device__ AccPos(int warp_m0, int warp_n0, int mt, int j, int e) {
    const int lane = threadIdx.x % 32;
    m = warp_m0 + mt * 16 + lane / 4 + 8 * (e / 2);
    n = warp_n0 + j * 8 + 2 * (lane % 4) + (e % 2);
  }
};

// Step 1's epilogue: u [, g] (f32) and h (storage dtype) of the recomputed GEMM1.
template <typename Element> struct RecomputeParams {
  float *u, *g; // (tokens, d_hidden), row stride ld_f; g null unless gated
  int64_t ld_f;
  Element *h;
  int64_t ld_h;
  const Element *b1, *b3;
  int rows, cols; // the GEMM's M, N (N = 2 d_hidden gated)
  int out_cols;   // d_hidden
  int activation;
};

// Gated, W3's product of n-tile j sits in n-tile j + 1 (the interleaved operand) or, with
// kGateHalves (gemm_sm90.cuh's gated B), in n-tile j + kNTiles / 2, as in FfnEpilogue.
template <class Traits, bool kGated, bool kGateHalves = false> struct RecomputeEpilogue {
  using Element = typename Traits::Element;
  using Params = RecomputeParams<Element>;
  static __device__ void apply(const float (&acc)[Traits::kMTiles][Traits::kNTiles][4],
                               const Params &ep, Element *, int m0, int n0, int warp_m0,
                               int warp_n0) {
    constexpr int kStep = kGated && !kGateHalves ? 2 : 1;
    constexpr int kGate = kGateHalves ? Traits::kNTiles / 2 : 1; // W3's n-tile: j + kGate
    constexpr int kEnd = kGateHalves ? Traits::kNTiles / 2 : Traits::kNTiles;
#pragma unroll
    for (int mt = 0; mt < Traits::kMTiles; ++mt)
#pragma unroll
      for (int j = 0; j < kEnd; j += kStep)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const AccPos<Traits> pos(warp_m0, warp_n0, mt, j, e);
          const int m = m0 + pos.m;
          // Gated: the pair (j, j + 1) is hidden unit (n0 + warp_n0 + 8 j) / 2 + 2 t + c;
          // halves: n-tile j is hidden unit n0 / 2 + 8 j + 2 t + c.
          const int n = kGateHalves ? (n0 + warp_n0) / 2 + (pos.n - warp_n0)
                        : kGated    ? (n0 + warp_n0 + j * 8) / 2 + (pos.n - warp_n0 - j * 8)
                                    : n0 + pos.n;
          if (m >= ep.rows || n >= ep.out_cols) continue;
          const float a = acc[mt][j][e] + (ep.b1 != nullptr ? to_float(ep.b1[n]) : 0.f);
          float v = ffn_activate(a, ep.activation);
          ep.u[int64_t(m) * ep.ld_f + n] = a;
          if (kGated) {
            const float gv =
                acc[mt][kGated ? j + kGate : j][e] + (ep.b3 != nullptr ? to_float(ep.b3[n]) : 0.f);
            ep.g[int64_t(m) * ep.ld_f + n] = gv;
            v *= gv;
          }
          ep.h[int64_t(m) * ep.ld_h + n] = from_float<Element>(v);
        }
  }
};

// Step 2's epilogue: acc = dh (tokens x d_hidden) -> du [, dg] (storage dtype).
template <typename Element> struct DerivParams {
  const float *u, *g; // g null unless gated
  int64_t ld_f;
  Element *du, *dg; // dg null unless gated
  int64_t ld_d;
  int rows, cols;
  int activation;
};

template <class Traits> struct DerivEpilogue {
  using Element = typename Traits::Element;
  using Params = DerivParams<Element>;
  static __device__ void apply(const float (&acc)[Traits::kMTiles][Traits::kNTiles][4],
                               const Params &ep, Element *, int m0, int n0, int warp_m0,
                               int warp_n0) {
#pragma unroll
    for (int mt = 0; mt < Traits::kMTiles; ++mt)
#pragma unroll
      for (int j = 0; j < Traits::kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const AccPos<Traits> pos(warp_m0, warp_n0, mt, j, e);
          const int m = m0 + pos.m, n = n0 + pos.n;
          if (m >= ep.rows || n >= ep.cols) continue;
          const float dh = acc[mt][j][e], u = ep.u[int64_t(m) * ep.ld_f + n];
          float du = dh * ffn_activate_grad(u, ep.activation);
          if (ep.g != nullptr) {
            du *= ep.g[int64_t(m) * ep.ld_f + n];
            ep.dg[int64_t(m) * ep.ld_d + n] =
                from_float<Element>(dh * ffn_activate(u, ep.activation));
          }
          ep.du[int64_t(m) * ep.ld_d + n] = from_float<Element>(du);
        }
  }
};

// Step 3's B operand: [W1; W3]ᵀ, row n = column n of the stacked (K x d_model) matrix, K =
// d_hidden (W1 only) or 2 d_hidden (W1's rows, then W3's).
template <typename Element> struct StackedTransposeOperand {
  const Element *w1, *w3;
  int64_t ld1, ld3;
  int rows, cols, split; // d_model, K, d_hidden
};

template <class Traits, int ROWS> struct StackedTransposeLoader {
  using Element = typename Traits::Element;
  using Operand = StackedTransposeOperand<Element>;
  static constexpr int kRowsPerPass = Traits::kNThreads / Traits::Tile::kChunksPerRow;
  static constexpr int kPasses = ROWS / kRowsPerPass;
  static_assert(kPasses * kRowsPerPass == ROWS, "tile rows must split evenly over threads");

  const Operand &op;
  int chunk, row_in_pass, row0;

  __device__ StackedTransposeLoader(const Operand &op_, int row0_, int tid)
      : op(op_), chunk(tid % Traits::Tile::kChunksPerRow),
        row_in_pass(tid / Traits::Tile::kChunksPerRow), row0(row0_) {}

  __device__ void load(Element *tile, int k0) const {
    const int col = k0 + chunk * 8;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int row = row0 + i * kRowsPerPass + row_in_pass;
      alignas(16) Element v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int k = col + e;
        v[e] = row >= op.rows || k >= op.cols ? from_float<Element>(0.f)
               : k < op.split                 ? op.w1[int64_t(k) * op.ld1 + row]
                                              : op.w3[int64_t(k - op.split) * op.ld3 + row];
      }
      Element *dst = tile + Traits::Tile::offset(i * kRowsPerPass + row_in_pass, chunk);
      *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(v);
    }
  }
};

// Column sums of a (rows x cols) matrix (row stride ld) into out (cols), f32 accumulation in
// row order: one thread per column.
template <typename T>
__global__ void column_sum_kernel(const T *a, int64_t ld, int rows, int cols, T *out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.f;
  for (int r = 0; r < rows; ++r) s += to_float(a[int64_t(r) * ld + c]);
  out[c] = from_float<T>(s);
}

template <typename T>
cudaError_t launch_column_sum(const T *a, int64_t ld, int rows, int cols, T *out,
                              cudaStream_t stream) {
  if (out == nullptr) return cudaSuccess;
  return launch_kernel(column_sum_kernel<T>, dim3((cols + 127) / 128), dim3(128), 0, stream, a, ld,
                       rows, cols, out);
}

// Step 5: db1 [, db3] as column sums of dU = [du | dg] (tokens x k_cat), db2 of dy.
template <typename T>
cudaError_t bias_grads(const fk_ffn_bwd_params &p, const T *d_u, cudaStream_t stream) {
  const int dh_n = p.d_hidden, k_cat = p.w3 != nullptr ? 2 * dh_n : dh_n;
  cudaError_t err =
      launch_column_sum<T>(d_u, k_cat, p.tokens, dh_n, static_cast<T *>(p.db1), stream);
  if (err != cudaSuccess) return err;
  if (p.w3 != nullptr) {
    err = launch_column_sum<T>(d_u + dh_n, k_cat, p.tokens, dh_n, static_cast<T *>(p.db3), stream);
    if (err != cudaSuccess) return err;
  }
  return launch_column_sum<T>(static_cast<const T *>(p.dy), p.dy_stride, p.tokens, p.d_model,
                              static_cast<T *>(p.db2), stream);
}

// A matrix seen transposed: element (r, c) of the operand is base[c * ld + r].
template <typename T>
gemm::StridedOperand<T> transposed_operand(const void *base, int64_t ld, int rows, int cols) {
  gemm::StridedOperand<T> o{};
  o.base = static_cast<const T *>(base);
  o.row_map = IndexMap3::linear(1);
  o.col_map = IndexMap3::linear(ld);
  o.rows = rows, o.cols = cols;
  o.vec = false;
  return o;
}

template <typename T> cudaError_t ffn_bwd(const fk_ffn_bwd_params &p, cudaStream_t stream) {
  using Traits = FfnGemmTraits<T>;
  using ALoader = gemm::StridedLoader<Traits, Traits::kBlockM>;
  using BLoader = gemm::StridedLoader<Traits, Traits::kBlockN>;
  using Plain = FfnEpilogue<Traits, false>;
  const bool gated = p.w3 != nullptr;
  const FfnBwdBuffers<T> buffers(p);
  float *u = buffers.u, *g = buffers.g;
  T *h = buffers.h, *d_u = buffers.d_u; // d_u: du, then dg when gated
  const int dh_n = p.d_hidden, k_cat = gated ? 2 * dh_n : dh_n;
  cudaError_t err;

  // 1. Recompute u [, g], h.
  const auto x = matrix_operand<T>(p.x, p.x_stride, p.tokens, p.d_model);
  RecomputeParams<T> rp{};
  rp.u = u, rp.g = g, rp.ld_f = dh_n, rp.h = h, rp.ld_h = dh_n;
  rp.b1 = static_cast<const T *>(p.b1), rp.b3 = static_cast<const T *>(p.b3);
  rp.rows = p.tokens, rp.cols = gated ? 2 * dh_n : dh_n, rp.out_cols = dh_n;
  rp.activation = p.activation;
  if (gated) {
    InterleavedOperand<T> w{};
    w.w1 = static_cast<const T *>(p.w1), w.w3 = static_cast<const T *>(p.w3);
    w.ld1 = p.w1_stride, w.ld3 = p.w3_stride;
    w.rows = 2 * dh_n, w.cols = p.d_model;
    w.vec = p.w1_stride % 8 == 0 && p.w3_stride % 8 == 0 && aligned16(p.w1) && aligned16(p.w3);
    err = gemm::launch_tile_gemm<Traits, ALoader, InterleavedLoader<Traits, Traits::kBlockN>,
                                 RecomputeEpilogue<Traits, true>>(x, w, rp, p.d_model, 1, stream);
  } else {
    const auto w1 = matrix_operand<T>(p.w1, p.w1_stride, dh_n, p.d_model);
    err = gemm::launch_tile_gemm<Traits, ALoader, BLoader, RecomputeEpilogue<Traits, false>>(
        x, w1, rp, p.d_model, 1, stream);
  }
  if (err != cudaSuccess) return err;

  // 2. dh = dy W2 -> du [, dg].
  const auto dy = matrix_operand<T>(p.dy, p.dy_stride, p.tokens, p.d_model);
  DerivParams<T> dp{};
  dp.u = u, dp.g = g, dp.ld_f = dh_n;
  dp.du = d_u, dp.dg = gated ? d_u + dh_n : nullptr, dp.ld_d = k_cat;
  dp.rows = p.tokens, dp.cols = dh_n, dp.activation = p.activation;
  err = gemm::launch_tile_gemm<Traits, ALoader, BLoader, DerivEpilogue<Traits>>(
      dy, transposed_operand<T>(p.w2, p.w2_stride, dh_n, p.d_model), dp, p.d_model, 1, stream);
  if (err != cudaSuccess) return err;

  // 3. dx = [du | dg] [W1; W3] (+ dy).
  StackedTransposeOperand<T> wt{};
  wt.w1 = static_cast<const T *>(p.w1), wt.w3 = static_cast<const T *>(p.w3);
  wt.ld1 = p.w1_stride, wt.ld3 = p.w3_stride;
  wt.rows = p.d_model, wt.cols = k_cat, wt.split = dh_n;
  auto ex = epilogue_params<T>(p.dx, p.dx_stride, p.tokens, p.d_model);
  if (p.residual) ex.residual = static_cast<const T *>(p.dy), ex.res_ld = p.dy_stride;
  err = gemm::launch_tile_gemm<Traits, ALoader, StackedTransposeLoader<Traits, Traits::kBlockN>,
                               Plain>(matrix_operand<T>(d_u, k_cat, p.tokens, k_cat), wt, ex, k_cat,
                                      1, stream);
  if (err != cudaSuccess) return err;

  // 4. Weight gradients over the tokens.
  const auto xt = transposed_operand<T>(p.x, p.x_stride, p.d_model, p.tokens);
  err = gemm::launch_tile_gemm<Traits, ALoader, BLoader, Plain>(
      transposed_operand<T>(d_u, k_cat, dh_n, p.tokens), xt,
      epilogue_params<T>(p.dw1, p.dw1_stride, dh_n, p.d_model), p.tokens, 1, stream);
  if (err != cudaSuccess) return err;
  if (gated) {
    err = gemm::launch_tile_gemm<Traits, ALoader, BLoader, Plain>(
        transposed_operand<T>(d_u + dh_n, k_cat, dh_n, p.tokens), xt,
        epilogue_params<T>(p.dw3, p.dw3_stride, dh_n, p.d_model), p.tokens, 1, stream);
    if (err != cudaSuccess) return err;
  }
  err = gemm::launch_tile_gemm<Traits, ALoader, BLoader, Plain>(
      transposed_operand<T>(p.dy, p.dy_stride, p.d_model, p.tokens),
      transposed_operand<T>(h, dh_n, dh_n, p.tokens),
      epilogue_params<T>(p.dw2, p.dw2_stride, p.d_model, dh_n), p.tokens, 1, stream);
  if (err != cudaSuccess) return err;

  // 5. Bias gradients.
  return bias_grads<T>(p, d_u, stream);
}

} // namespace ffn
} // namespace fk
