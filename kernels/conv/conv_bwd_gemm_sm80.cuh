// conv2d backward on the tensor-core GEMM core (f16 / bf16, f32 accumulation), as BwdPlan
// (conv.h) lays it out:
// - dx, implicit (unit strides, the implicit algorithm): dx is the forward convolution of dy
//   with W flipped and transposed, dx[n, c, h, w] = sum_{k, r', s'} dy[n, k, h - pad' +
//   r' dil, ...] W[k, c, R-1-r', S-1-s'] with pad' = dil (R-1) - pad: conv_gemm_sm80.cuh's
//   implicit GEMM (or its Hopper twin) with dy as x and the flipped weights (copied into
//   the workspace, a small tensor) as the weights; every dx element is written by the
//   epilogue, no col2im, no f32 workspace.
// - dx otherwise (strided convolutions, the im2col algorithm): dcol_g[m, kk] = sum_k
//   dy[m, g K/groups + k] W_g[k, kk] into the workspace in f32 (GEMM over the group's output
//   channels), then col2im gathers, per dx element, the taps whose window covers it: a
//   fixed summation order, no atomics.
// - dweight: dW_g[k, kk] = sum_m dy[m, g K/groups + k] col_g[m, kk] with col = im2col(x)
//   in the workspace: a GEMM over the N P Q output pixels split along them (split-K) into
//   f32 partials, summed by dweight_reduce_kernel in split order (deterministic).
// dbias is the direct per-channel reduction. With sm90 (Hopper) every GEMM runs on
// gemm_sm90.cuh's wgmma mainloop with the gathering producer (the same loaders and
// epilogues), else on the sm80 core.
#pragma once

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

template <class Traits, int ROWS> using GroupMappedLoader = gemm::MappedLoader<Traits, ROWS>;

// The implicit dx's weights: w_flip[g C/groups + c][r'][s'][k] = W[g K/groups + k][c]
// [R-1-r'][S-1-s'], contiguous (the (K', C', R, S) weights of the forward that computes dx,
// channels last).
template <typename T> __global__ void flip_weights_kernel(const fk_conv2d_bwd_params p, T *w_flip) {
  const fk_conv2d_shape &s = p.shape;
  const int cg = s.c / s.groups, kg = s.k / s.groups;
  const int64_t total = int64_t(s.c) * s.r * s.s * kg;
  const T *w = static_cast<const T *>(p.weight);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int k = int(i % kg), ss = int(i / kg % s.s), r = int(i / kg / s.s % s.r);
    const int c = int(i / kg / s.s / s.r);
    const int g = c / cg;
    w_flip[i] = w[(g * kg + k) * p.w_strides[0] + (c % cg) * p.w_strides[1] +
                  (s.r - 1 - r) * p.w_strides[2] + (s.s - 1 - ss) * p.w_strides[3]];
  }
}

// dweight[g K/groups + k][kk] = sum over the splits s, in order, of partial[g][s][k][kk]
// (zeros, partial unread, with no splits: no pixels).
template <typename T>
__global__ void dweight_reduce_kernel(const float *partial, const fk_conv2d_bwd_params p,
                                      int splits) {
  const fk_conv2d_shape &s = p.shape;
  const int cg = s.c / s.groups, kg = s.k / s.groups, k_gemm = s.r * s.s * cg;
  const int64_t per_split = int64_t(kg) * k_gemm;
  const int64_t total = int64_t(s.groups) * per_split;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / per_split, within = i % per_split;
    float acc = 0.f;
    for (int sp = 0; sp < splits; ++sp) acc += partial[(g * splits + sp) * per_split + within];
    const int kk = int(within % k_gemm), k = int(g * kg + within / k_gemm);
    const int c = kk % cg, ss = kk / cg % s.s, r = kk / cg / s.s;
    static_cast<T *>(p.dweight)[k * p.dw_strides[0] + c * p.dw_strides[1] + r * p.dw_strides[2] +
                                ss * p.dw_strides[3]] = from_float<T>(acc);
  }
}

inline int grid_stride_blocks(int64_t total) {
  return int(std::min<int64_t>((total + 255) / 256, int64_t(1) << 20));
}

// dx as the forward convolution of dy with the flipped weights (see the top).
template <typename T>
cudaError_t conv2d_bwd_dx_implicit(const fk_conv2d_bwd_params &p, cudaStream_t stream, bool sm90) {
  const fk_conv2d_shape &s = p.shape;
  const int kg = s.k / s.groups;
  T *w_flip = static_cast<T *>(p.workspace);
  const int64_t total = int64_t(s.c) * s.r * s.s * kg;
  cudaError_t err = launch_kernel(flip_weights_kernel<T>, dim3(grid_stride_blocks(total)),
                                  dim3(256), 0, stream, p, w_flip);
  if (err != cudaSuccess) return err;
  fk_conv2d_params f{};
  f.x = p.dy, f.weight = w_flip, f.y = p.dx;
  for (int i = 0; i < 4; ++i) f.x_strides[i] = p.dy_strides[i], f.y_strides[i] = p.dx_strides[i];
  const int64_t w_flip_strides[4] = {int64_t(s.r) * s.s * kg, 1, int64_t(s.s) * kg, kg};
  for (int i = 0; i < 4; ++i) f.w_strides[i] = w_flip_strides[i];
  fk_conv2d_shape &t = f.shape;
  t = s;
  t.c = s.k, t.h = s.p, t.w = s.q, t.k = s.c, t.p = s.h, t.q = s.w;
  t.pad_h = s.dil_h * (s.r - 1) - s.pad_h, t.pad_w = s.dil_w * (s.s - 1) - s.pad_w;
  f.activation = FK_ACT_NONE, f.algo = FK_CONV_ALGO_IMPLICIT_GEMM, f.dtype = p.dtype;
  f.device = p.device;
  return conv2d_fwd_gemm<T>(f, stream, sm90);
}

template <typename T>
cudaError_t conv2d_bwd_dx_col2im(const fk_conv2d_bwd_params &p, cudaStream_t stream, bool sm90) {
  const fk_conv2d_shape &s = p.shape;
  const ConvDims d(s);
  const int64_t *dys = p.dy_strides;
  float *dcol = static_cast<float *>(p.workspace);
  gemm::StridedOperand<T> dy{}; // rows m, reduction over the group's channels k
  dy.base = static_cast<const T *>(p.dy);
  dy.row_map = IndexMap3{s.p, s.q, dys[0], dys[2], dys[3]};
  dy.col_map = IndexMap3::linear(dys[1]);
  dy.rows = d.m, dy.cols = d.k_group;
  dy.group_stride = int64_t(d.k_group) * dys[1];
  dy.vec = dy.col_map.vectorizable() && dys[0] % 8 == 0 && dys[2] % 8 == 0 && dys[3] % 8 == 0 &&
           aligned16(p.dy) && dy.group_stride % 8 == 0;
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
  cudaError_t err = conv_gemm_run<PlainLoader, PlainLoader, gemm::F32Epilogue, T>(
      sm90, dy, wt, ep, d.k_group, 1, s.groups, p.device, stream);
  const int64_t total = int64_t(s.n) * s.c * s.h * s.w;
  if (err == cudaSuccess)
    err = launch_kernel(col2im_kernel<T>, dim3(grid_stride_blocks(total)), dim3(256), 0, stream,
                        static_cast<const float *>(dcol), p, d.k_gemm_padded);
  return err;
}

template <typename T>
cudaError_t conv2d_bwd_dweight(const fk_conv2d_bwd_params &p, const BwdPlan &plan,
                               cudaStream_t stream, bool sm90) {
  const fk_conv2d_shape &s = p.shape;
  const ConvDims d(s);
  const int64_t *dys = p.dy_strides;
  const int64_t per_split = int64_t(d.k_group) * d.k_gemm;
  const dim3 reduce_grid(grid_stride_blocks(int64_t(s.groups) * per_split));
  if (d.m == 0)
    return launch_kernel(dweight_reduce_kernel<T>, reduce_grid, dim3(256), 0, stream,
                         static_cast<const float *>(nullptr), p, 0);
  T *col = static_cast<T *>(p.workspace);
  float *partial =
      reinterpret_cast<float *>(static_cast<unsigned char *>(p.workspace) + plan.col_bytes);
  cudaError_t err = launch_im2col(im2col_operand<T>(p.x, p.x_strides, s), col, s.groups, stream);
  if (err != cudaSuccess) return err;
  // Group z = g splits + split: both operands offset by group g only.
  const IndexMap3 by_group{1, plan.dw_splits, 0, 0, 0};
  gemm::MappedOperand<T> dyt{}; // dy transposed: rows k, reduction over pixels m
  dyt.base = static_cast<const T *>(p.dy);
  dyt.row_map = IndexMap3::linear(dys[1]);
  dyt.col_map = IndexMap3{s.p, s.q, dys[0], dys[2], dys[3]};
  dyt.rows = d.k_group, dyt.cols = d.m;
  dyt.group_map = by_group;
  dyt.group_map.s0 = int64_t(d.k_group) * dys[1];
  dyt.vec =
      dyt.col_map.vectorizable() && dys[1] % 8 == 0 && aligned16(p.dy) && dyt.group_map.s0 % 8 == 0;
  gemm::MappedOperand<T> colt{}; // col_g transposed: rows kk, reduction over m
  colt.base = col;
  colt.row_map = IndexMap3::linear(1), colt.col_map = IndexMap3::linear(d.k_gemm_padded);
  colt.rows = d.k_gemm, colt.cols = d.m;
  colt.group_map = by_group;
  colt.group_map.s0 = int64_t(d.m) * d.k_gemm_padded;
  colt.vec = false;
  const gemm::F32MatrixParams ep{partial, d.k_gemm, per_split, d.k_group, d.k_gemm};
  err = conv_gemm_run<GroupMappedLoader, GroupMappedLoader, gemm::F32Epilogue, T, true>(
      sm90, dyt, colt, ep, plan.dw_splits > 1 ? plan.dw_k_split : d.m, plan.dw_splits, s.groups,
      p.device, stream);
  if (err != cudaSuccess) return err;
  return launch_kernel(dweight_reduce_kernel<T>, reduce_grid, dim3(256), 0, stream,
                       static_cast<const float *>(partial), p, plan.dw_splits);
}

template <typename T>
cudaError_t conv2d_bwd_gemm(const fk_conv2d_bwd_params &p, cudaStream_t stream, bool sm90) {
  const BwdPlan plan(p);
  cudaError_t err = cudaSuccess;
  if (p.dx != nullptr && int64_t(p.shape.n) * p.shape.h * p.shape.w > 0)
    err = plan.dx_implicit ? conv2d_bwd_dx_implicit<T>(p, stream, sm90)
                           : conv2d_bwd_dx_col2im<T>(p, stream, sm90);
  if (err == cudaSuccess && p.dweight != nullptr)
    err = conv2d_bwd_dweight<T>(p, plan, stream, sm90);
  if (err == cudaSuccess && p.dbias != nullptr) err = conv2d_dbias<T>(p, stream);
  return err;
}

} // namespace conv
} // namespace fk
