// The convolution forward on Hopper (sm_90a): the GEMM of conv_gemm_sm80.cuh (im2col workspace
// or the implicit im2col gather from x as A, the weights as B, bias + activation + y_pre in
// the staged epilogue) on gemm_sm90.cuh's wgmma mainloop with a gathering producer
// warpgroup: the sm80 loader policies (Im2colLoader, StridedLoader) fill the 128-byte-
// swizzled stages with cp.async and signal them on mbarriers. Groups run along blockIdx.z
// as on the sm80 core.
#pragma once

#include "../common/gemm_sm90.cuh"
#include "conv_gemm_sm80.cuh"

namespace fk {
namespace conv {

template <typename T>
cudaError_t conv2d_fwd_gemm_sm90(const fk_conv2d_params &p, cudaStream_t stream) {
  using Traits = gemm::TileGemmTraitsSm90<T, 128, 4>;
  using Loader = gemm::GatherLoaderTraits<T>;
  using Epilogue = gemm::StagedEpilogue<Traits>;
  const fk_conv2d_shape &s = p.shape;
  const ConvDims d(s);
  if (d.m == 0 || d.k_group == 0) return cudaSuccess;
  const Im2colOperand<T> x = im2col_operand<T>(p.x, p.x_strides, s);
  const gemm::StridedOperand<T> w = weight_operand<T>(p.weight, p.w_strides, s);
  const gemm::EpilogueParams<T> ep = conv_epilogue_params<T>(p);
  using WLoader = gemm::StridedLoader<Loader, Traits::kBlockN>;
  if (p.algo == FK_CONV_ALGO_IMPLICIT_GEMM)
    return gemm::launch_tile_gemm_sm90_gather<Traits, Im2colLoader<Loader, Traits::kBlockM>,
                                              WLoader, Epilogue>(x, w, ep, d.k_gemm, s.groups,
                                                                 p.device, stream);
  const cudaError_t err = launch_im2col(x, static_cast<T *>(p.workspace), s.groups, stream);
  if (err != cudaSuccess) return err;
  return gemm::launch_tile_gemm_sm90_gather<Traits, gemm::StridedLoader<Loader, Traits::kBlockM>,
                                            WLoader, Epilogue>(
      col_operand<T>(p.workspace, d), w, ep, d.k_gemm, s.groups, p.device, stream);
}

} // namespace conv
} // namespace fk
