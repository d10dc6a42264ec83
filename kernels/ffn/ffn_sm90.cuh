// The fused feed-forward forward on Hopper (sm_90a): both GEMMs on gemm_sm90.cuh's TMA +
// wgmma mainloop with ffn_sm80.cuh's epilogue (bias, activation, gate, residual). Gated,
// GEMM1's B tile is 64 rows of W1 then the same 64 rows of W3 (two TMA boxes), so the
// epilogue pairs n-tiles j and j + 8 (FfnEpilogue's kGateHalves) instead of the sm80
// path's interleaved operand. Every matrix must be TMA-describable (ffn_sm90_eligible, in
// ffn_api.cu, which falls back to the sm80 path otherwise).
#pragma once

#include "../common/gemm_sm90.cuh"
#include "../common/tma_host.cuh"
#include "ffn_sm80.cuh"

namespace fk {
namespace ffn {

template <typename Element> using FfnGemmTraitsSm90 = gemm::TileGemmTraitsSm90<Element, 128, 4>;

template <typename T> cudaError_t ffn_fwd_sm90(const fk_ffn_params &p, cudaStream_t stream) {
  using Traits = FfnGemmTraitsSm90<T>;
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int BM = Traits::kBlockM, BN = Traits::kBlockN;
  CUtensorMap x, w1, w3, h, w2;
  cudaError_t err;
  if ((err = encode_matrix_map_sw128(&x, p.x, p.tokens, p.d_model, p.x_stride, BM, kBf16)) ||
      (err = encode_matrix_map_sw128(&h, p.h, p.tokens, p.d_hidden, p.h_stride, BM, kBf16)) ||
      (err = encode_matrix_map_sw128(&w2, p.w2, p.d_model, p.d_hidden, p.w2_stride, BN, kBf16)))
    return err;

  // GEMM1 -> h.
  auto ep1 = epilogue_params<T>(p.h, p.h_stride, p.tokens, p.d_hidden);
  ep1.bias = static_cast<const T *>(p.b1);
  ep1.activation = p.activation;
  if (p.w3 != nullptr) {
    if ((err = encode_matrix_map_sw128(&w1, p.w1, p.d_hidden, p.d_model, p.w1_stride, BN / 2,
                                       kBf16)) ||
        (err =
             encode_matrix_map_sw128(&w3, p.w3, p.d_hidden, p.d_model, p.w3_stride, BN / 2, kBf16)))
      return err;
    ep1.bias_gate = static_cast<const T *>(p.b3);
    ep1.cols = 2 * p.d_hidden;
    err = gemm::launch_tile_gemm_sm90<Traits, FfnEpilogue<Traits, true, true>, false, false,
                                      gemm::BLoad::kGatedHalves>(x, w1, w3, ep1, p.d_model,
                                                                 p.device, stream);
  } else {
    if ((err = encode_matrix_map_sw128(&w1, p.w1, p.d_hidden, p.d_model, p.w1_stride, BN, kBf16)))
      return err;
    err = gemm::launch_tile_gemm_sm90<Traits, FfnEpilogue<Traits, false>>(x, w1, w1, ep1, p.d_model,
                                                                          p.device, stream);
  }
  if (err != cudaSuccess) return err;

  // GEMM2 -> y.
  auto ep2 = epilogue_params<T>(p.y, p.y_stride, p.tokens, p.d_model);
  ep2.bias = static_cast<const T *>(p.b2);
  if (p.residual) ep2.residual = static_cast<const T *>(p.x), ep2.res_ld = p.x_stride;
  return gemm::launch_tile_gemm_sm90<Traits, FfnEpilogue<Traits, false>>(h, w2, w2, ep2, p.d_hidden,
                                                                         p.device, stream);
}

} // namespace ffn
} // namespace fk
