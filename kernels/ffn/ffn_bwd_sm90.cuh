// The fused feed-forward backward on Hopper (sm_90a): ffn_bwd_sm80.cuh's five steps with
// every GEMM on gemm_sm90.cuh's TMA + wgmma mainloop and the same epilogues. The transposed
// operands the sm80 path gathers element by element are MN-major tiles here: TMA loads the
// row-major matrix as it is and wgmma's transpose bit reads it (no copy):
//   1. recompute u [, g], h: x W1ᵀ [, x W3ᵀ]        A K-major, B K-major (gated: halves)
//   2. dh = dy W2 -> du [, dg]                      A K-major, B = W2 MN-major
//   3. dx = [du | dg] [W1; W3] (+ dy)               A K-major, B MN-major, W1 then W3 along K
//   4. dW1 = duᵀ x, dW3 = dgᵀ x, dW2 = dyᵀ h        A and B MN-major (K = tokens)
//   5. bias gradients as column sums (ffn_bwd_sm80.cuh's)
// Every matrix must be TMA-describable (ffn_bwd_sm90_eligible, in ffn_api.cu).
#pragma once

#include "ffn_bwd_sm80.cuh"
#include "ffn_sm90.cuh"

namespace fk {
namespace ffn {

template <typename T> cudaError_t ffn_bwd_sm90(const fk_ffn_bwd_params &p, cudaStream_t stream) {
  using Traits = FfnGemmTraitsSm90<T>;
  using Plain = FfnEpilogue<Traits, false>;
  using gemm::BLoad;
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int BM = Traits::kBlockM, BN = Traits::kBlockN;
  const bool gated = p.w3 != nullptr;
  const FfnBwdBuffers<T> buffers(p);
  float *u = buffers.u, *g = buffers.g;
  T *h = buffers.h, *d_u = buffers.d_u; // d_u: du, then dg when gated
  const int dh_n = p.d_hidden, k_cat = gated ? 2 * dh_n : dh_n, dev = p.device;
  // A row-major (rows x cols, row stride ld) matrix as tiles of box_rows x 64 columns: a
  // K-major operand's (box_rows = the block's rows), or an MN-major one's (64 k-rows).
  const auto map = [&](CUtensorMap *m, const void *ptr, int64_t rows, int64_t cols, int64_t ld,
                       int box_rows) {
    return encode_matrix_map_sw128(m, ptr, rows, cols, ld, box_rows, kBf16);
  };
  CUtensorMap m1, m2, m3;
  cudaError_t err;

  // 1. Recompute u [, g], h.
  RecomputeParams<T> rp{};
  rp.u = u, rp.g = g, rp.ld_f = dh_n, rp.h = h, rp.ld_h = dh_n;
  rp.b1 = static_cast<const T *>(p.b1), rp.b3 = static_cast<const T *>(p.b3);
  rp.rows = p.tokens, rp.cols = gated ? 2 * dh_n : dh_n, rp.out_cols = dh_n;
  rp.activation = p.activation;
  if ((err = map(&m1, p.x, p.tokens, p.d_model, p.x_stride, BM))) return err;
  if (gated) {
    if ((err = map(&m2, p.w1, dh_n, p.d_model, p.w1_stride, BN / 2)) ||
        (err = map(&m3, p.w3, dh_n, p.d_model, p.w3_stride, BN / 2)))
      return err;
    err = gemm::launch_tile_gemm_sm90<Traits, RecomputeEpilogue<Traits, true, true>, false, false,
                                      BLoad::kGatedHalves>(m1, m2, m3, rp, p.d_model, dev, stream);
  } else {
    if ((err = map(&m2, p.w1, dh_n, p.d_model, p.w1_stride, BN))) return err;
    err = gemm::launch_tile_gemm_sm90<Traits, RecomputeEpilogue<Traits, false>>(
        m1, m2, m2, rp, p.d_model, dev, stream);
  }
  if (err != cudaSuccess) return err;

  // 2. dh = dy W2 -> du [, dg]: W2 (d_model x d_hidden) is B MN-major (k = its rows).
  DerivParams<T> dp{};
  dp.u = u, dp.g = g, dp.ld_f = dh_n;
  dp.du = d_u, dp.dg = gated ? d_u + dh_n : nullptr, dp.ld_d = k_cat;
  dp.rows = p.tokens, dp.cols = dh_n, dp.activation = p.activation;
  if ((err = map(&m1, p.dy, p.tokens, p.d_model, p.dy_stride, BM)) ||
      (err = map(&m2, p.w2, p.d_model, dh_n, p.w2_stride, 64)))
    return err;
  err = gemm::launch_tile_gemm_sm90<Traits, DerivEpilogue<Traits>, false, true>(
      m1, m2, m2, dp, p.d_model, dev, stream);
  if (err != cudaSuccess) return err;

  // 3. dx = [du | dg] [W1; W3] (+ dy): W1, W3 (d_hidden x d_model) are B MN-major, W1 for
  // k < d_hidden, W3 after (A's columns past d_hidden in W1's last tile meet W1's zero fill).
  auto ex = epilogue_params<T>(p.dx, p.dx_stride, p.tokens, p.d_model);
  if (p.residual) ex.residual = static_cast<const T *>(p.dy), ex.res_ld = p.dy_stride;
  if ((err = map(&m1, d_u, p.tokens, k_cat, k_cat, BM)) ||
      (err = map(&m2, p.w1, dh_n, p.d_model, p.w1_stride, 64)))
    return err;
  if (gated) {
    if ((err = map(&m3, p.w3, dh_n, p.d_model, p.w3_stride, 64))) return err;
    err = gemm::launch_tile_gemm_sm90<Traits, Plain, false, true, BLoad::kStackedK>(
        m1, m2, m3, ex, k_cat, dev, stream, dh_n);
  } else {
    err =
        gemm::launch_tile_gemm_sm90<Traits, Plain, false, true>(m1, m2, m2, ex, dh_n, dev, stream);
  }
  if (err != cudaSuccess) return err;

  // 4. Weight gradients over the tokens: both operands MN-major (k = token rows).
  if ((err = map(&m2, p.x, p.tokens, p.d_model, p.x_stride, 64))) return err;
  for (int part = 0; part < (gated ? 2 : 1); ++part) { // dW1 from du, dW3 from dg
    if ((err = map(&m1, d_u + part * dh_n, p.tokens, dh_n, k_cat, 64))) return err;
    err = gemm::launch_tile_gemm_sm90<Traits, Plain, true, true>(
        m1, m2, m2,
        epilogue_params<T>(part == 0 ? p.dw1 : p.dw3, part == 0 ? p.dw1_stride : p.dw3_stride, dh_n,
                           p.d_model),
        p.tokens, dev, stream);
    if (err != cudaSuccess) return err;
  }
  if ((err = map(&m1, p.dy, p.tokens, p.d_model, p.dy_stride, 64)) ||
      (err = map(&m2, h, p.tokens, dh_n, dh_n, 64)))
    return err;
  err = gemm::launch_tile_gemm_sm90<Traits, Plain, true, true>(
      m1, m2, m2, epilogue_params<T>(p.dw2, p.dw2_stride, p.d_model, dh_n), p.tokens, dev, stream);
  if (err != cudaSuccess) return err;

  // 5. Bias gradients.
  return bias_grads<T>(p, d_u, stream);
}

} // namespace ffn
} // namespace fk
