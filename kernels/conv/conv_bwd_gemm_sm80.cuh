// conv2d backward on the tensor-core GEMM core (f16 / bf16, f32 accumulation), per group g:
// - dx: dcol_g[m, kk] = sum_k dy[m, g K/groups + k] W_g[k, kk] into the workspace in f32
//   (GEMM over the group's output channels), then col2im gathers, per dx element, the taps
//   whose window covers it: a fixed summation order, no atomics.
// - dweight: dW_g[k, kk] = sum_m dy[m, g K/groups + k] col_g[m, kk] with col = im2col(x)
//   in the workspace (GEMM over the N P Q output pixels).
// dbias is the direct per-channel reduction. With sm90 (Hopper, one group) both GEMMs run on
// gemm_sm90.cuh's wgmma mainloop with the gathering producer (the same loaders and
// epilogues), else on the sm80 core.
#pragma once

#include "../common/gemm_sm90.cuh"
#include "conv_gemm_sm80.cuh"

namespace fk {
namespace conv {

template <typename T>
__global__ void col2im_kernel(const float *dcol, const fk_conv2d_bwd_params p, int ld) {
  const fk_conv2d_shape &s = p.shape;
  const int cg = s.c / s.groups;
  const int64_t m_total = int64_t(s.n) * s.p * s.q;
  const int64_t total = int64_t(s.n) * s.c * s.h * s.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int w = int(i % s.w), h = int(i / s.w % s.h), c = int(i / s.w / s.h % s.c);
    const int n = int(i / s.w / s.h / s.c);
    const float *dg = dcol + (c / cg) * m_total * ld;
    float acc = 0.f;
    for (int r = 0; r < s.r; ++r) {
      const int hp = h + s.pad_h - r * s.dil_h;
      if (hp < 0 || hp % s.stride_h != 0 || hp / s.stride_h >= s.p) continue;
      for (int ss = 0; ss < s.s; ++ss) {
        const int wq = w + s.pad_w - ss * s.dil_w;
        if (wq < 0 || wq % s.stride_w != 0 || wq / s.stride_w >= s.q) continue;
        const int64_t m = (int64_t(n) * s.p + hp / s.stride_h) * s.q + wq / s.stride_w;
        acc += dg[m * ld + (r * s.s + ss) * cg + c % cg];
      }
    }
    static_cast<T *>(p.dx)[n * p.dx_strides[0] + c * p.dx_strides[1] + h * p.dx_strides[2] +
                           w * p.dx_strides[3]] = from_float<T>(acc);
  }
}

// One GEMM of the backward, both operands gathered by StridedLoader: on Hopper's mainloop
// (one group) or on the sm80 core.
template <template <class> class Epilogue, typename T, class Params>
cudaError_t conv_bwd_gemm_run(bool sm90, const gemm::StridedOperand<T> &a,
                              const gemm::StridedOperand<T> &b, const Params &ep, int k_total,
                              int groups, int device, cudaStream_t stream) {
  if (sm90) {
    using Tr = gemm::TileGemmTraitsSm90<T, 128, 4>;
    using L = gemm::GatherLoaderTraits<T>;
    return gemm::launch_tile_gemm_sm90_gather<Tr, gemm::StridedLoader<L, Tr::kBlockM>,
                                              gemm::StridedLoader<L, Tr::kBlockN>, Epilogue<Tr>>(
        a, b, ep, k_total, device, stream);
  }
  using Tr = gemm::ConvGemmTraits<T>;
  return gemm::launch_tile_gemm<Tr, gemm::StridedLoader<Tr, Tr::kBlockM>,
                                gemm::StridedLoader<Tr, Tr::kBlockN>, Epilogue<Tr>>(
      a, b, ep, k_total, groups, stream);
}

template <typename T>
cudaError_t conv2d_bwd_gemm(const fk_conv2d_bwd_params &p, cudaStream_t stream, bool sm90) {
  const fk_conv2d_shape &s = p.shape;
  const ConvDims d(s);
  const int64_t *dys = p.dy_strides;
  const IndexMap3 dy_pixels{s.p, s.q, dys[0], dys[2], dys[3]};
  const bool dy_aligned = aligned16(p.dy) && (int64_t(d.k_group) * dys[1]) % 8 == 0;
  T *col = static_cast<T *>(p.workspace);
  float *dcol = reinterpret_cast<float *>(col + col_matrix_bytes(s, sizeof(T)) / sizeof(T));
  cudaError_t err = cudaSuccess;

  if (p.dx != nullptr && d.m > 0) {
    gemm::StridedOperand<T> dy{}; // rows m, reduction over the group's channels k
    dy.base = static_cast<const T *>(p.dy);
    dy.row_map = dy_pixels, dy.col_map = IndexMap3::linear(dys[1]);
    dy.rows = d.m, dy.cols = d.k_group;
    dy.group_stride = int64_t(d.k_group) * dys[1];
    dy.vec = dy.col_map.vectorizable() && dys[0] % 8 == 0 && dys[2] % 8 == 0 && dys[3] % 8 == 0 &&
             dy_aligned;
    gemm::StridedOperand<T> wt{}; // W_g transposed: rows kk, reduction over k
    wt.base = static_cast<const T *>(p.weight);
    wt.row_map = IndexMap3{s.s, d.c_group, p.w_strides[2], p.w_strides[3], p.w_strides[1]};
    wt.col_map = IndexMap3::linear(p.w_strides[0]);
    wt.rows = d.k_gemm, wt.cols = d.k_group;
    wt.group_stride = int64_t(d.k_group) * p.w_strides[0];
    wt.vec = wt.col_map.vectorizable() && p.w_strides[1] % 8 == 0 && p.w_strides[2] % 8 == 0 &&
             p.w_strides[3] % 8 == 0 && wt.group_stride % 8 == 0 && aligned16(p.weight);
    const gemm::F32MatrixParams ep{dcol, d.k_gemm_padded, int64_t(d.m) * d.k_gemm_padded, d.m,
                                   d.k_gemm};
    err = conv_bwd_gemm_run<gemm::F32Epilogue>(sm90, dy, wt, ep, d.k_group, s.groups, p.device,
                                               stream);
    const int64_t total = int64_t(s.n) * s.c * s.h * s.w;
    const int blocks = int(std::min<int64_t>((total + 255) / 256, int64_t(1) << 20));
    if (err == cudaSuccess)
      err = launch_kernel(col2im_kernel<T>, dim3(blocks), dim3(256), 0, stream,
                          static_cast<const float *>(dcol), p, d.k_gemm_padded);
  }

  if (err == cudaSuccess && p.dweight != nullptr) {
    err = launch_im2col(im2col_operand<T>(p.x, p.x_strides, s), col, s.groups, stream);
    gemm::StridedOperand<T> dyt{}; // dy transposed: rows k, reduction over pixels m
    dyt.base = static_cast<const T *>(p.dy);
    dyt.row_map = IndexMap3::linear(dys[1]), dyt.col_map = dy_pixels;
    dyt.rows = d.k_group, dyt.cols = d.m;
    dyt.group_stride = int64_t(d.k_group) * dys[1];
    dyt.vec = dy_pixels.vectorizable() && dys[1] % 8 == 0 && dy_aligned;
    gemm::StridedOperand<T> colt{}; // col_g transposed: rows kk, reduction over m
    colt.base = col;
    colt.row_map = IndexMap3::linear(1), colt.col_map = IndexMap3::linear(d.k_gemm_padded);
    colt.rows = d.k_gemm, colt.cols = d.m;
    colt.group_stride = int64_t(d.m) * d.k_gemm_padded;
    colt.vec = false;
    gemm::EpilogueParams<T> ep{};
    ep.out = static_cast<T *>(p.dweight);
    ep.row_map = IndexMap3::linear(p.dw_strides[0]);
    ep.col_map = IndexMap3{s.s, d.c_group, p.dw_strides[2], p.dw_strides[3], p.dw_strides[1]};
    ep.rows = d.k_group, ep.cols = d.k_gemm;
    ep.group_stride = int64_t(d.k_group) * p.dw_strides[0];
    ep.activation = FK_ACT_NONE;
    ep.vec = false;
    if (err == cudaSuccess)
      err = conv_bwd_gemm_run<gemm::StagedEpilogue>(sm90, dyt, colt, ep, d.m, s.groups, p.device,
                                                    stream);
  }

  if (err == cudaSuccess && p.dbias != nullptr) err = conv2d_dbias<T>(p, stream);
  return err;
}

} // namespace conv
} // namespace fk
