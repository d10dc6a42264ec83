// conv2d forward as a GEMM on tensor cores (f16 / bf16, f32 accumulation):
//   y[m, g K/groups + n] = act(sum_kk A_g[m, kk] W_g[n, kk] + bias)
// with m = (n, p, q) an output pixel and kk = (r, s, c) a filter tap of group g.
// - im2col: A_g is materialized in the workspace, (groups, M, K_gemm padded to 8), then read
//   as a plain matrix.
// - implicit GEMM: A tiles are gathered from x straight into shared memory with 16-byte
//   cp.async along C (unit channel stride, C / groups % 8 == 0), padding as zero-fill; an x
//   pointer off 16-byte alignment falls back to an element gather.
// The weight operand is read in place through its strides either way. On Hopper the same
// loaders and epilogues run on gemm_sm90.cuh's wgmma mainloop with its gathering producer
// (conv_gemm_run picks the mainloop; the backward's GEMMs go through it too).
#pragma once

#include "../common/gemm_sm90.cuh" // and gemm_sm80.cuh
#include "conv.h"

#include <algorithm>

namespace fk {
namespace conv {

using gemm::IndexMap3;

// x seen as the implicit im2col matrix of one group: row m = (n, p, q), col kk = (r, s, c).
template <typename Element> struct Im2colOperand {
  const Element *x;
  int64_t xs[4]; // n, c, h, w
  int64_t group_stride; // C / groups channels
  int rows, cols;       // M, K_gemm
  int h, w;
  FastDiv p, q, s, c_group; // the divisions of the index arithmetic
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool vec; // 16-byte gathers allowed (implicit_gemm_gather_ok and an aligned x)
};

template <class Traits, int ROWS> struct Im2colLoader {
  using Element = typename Traits::Element;
  using Operand = Im2colOperand<Element>;
  static constexpr int kRowsPerPass = Traits::kNThreads / Traits::Tile::kChunksPerRow;
  static constexpr int kPasses = ROWS / kRowsPerPass;
  static_assert(kPasses * kRowsPerPass == ROWS, "tile rows must split evenly over threads");

  const Operand &op;
  const Element *x;
  int chunk, row_in_pass;
  // Per row: the image (its offset n x_n is formed per load: an int64 a row held across the
  // mainloop is what would not fit in registers) and the window's top-left input position.
  int image[kPasses];
  int h0[kPasses], w0[kPasses];  // top-left input position of the window; invalid rows: far out
  __device__ Im2colLoader(const Operand &op_, int row0, int tid)
      : op(op_), x(op_.x + blockIdx.z * op_.group_stride), chunk(tid % Traits::Tile::kChunksPerRow),
        row_in_pass(tid / Traits::Tile::kChunksPerRow) {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int m = row0 + i * kRowsPerPass + row_in_pass;
      const int np = op.q.div(m), q = m - np * op.q.d;
      const int n = op.p.div(np), p = np - n * op.p.d;
      image[i] = n;
      // A row past M never matches an input position: h0 beyond any reachable row.
      h0[i] = m < op.rows ? p * op.stride_h - op.pad_h : INT32_MAX / 2;
      w0[i] = q * op.stride_w - op.pad_w;
    }
  }

  __device__ void load(Element *tile, int k0) const {
    const int col = k0 + chunk * 8;
    if (op.vec && col + 8 <= op.cols) {
      // Eight channels of one tap (C / groups % 8 == 0).
      const int rs = op.c_group.div(col), c = col - rs * op.c_group.d;
      const int r = op.s.div(rs), dh = r * op.dil_h, dw = (rs - r * op.s.d) * op.dil_w;
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int h = h0[i] + dh, w = w0[i] + dw;
        const bool in = h >= 0 && h < op.h && w >= 0 && w < op.w;
        const Element *src = in ? x + image[i] * op.xs[0] + c + h * op.xs[2] + w * op.xs[3] : x;
        cp_async_16(smem_addr(tile + Traits::Tile::offset(i * kRowsPerPass + row_in_pass, chunk)),
                    src, in ? 16 : 0);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      alignas(16) Element v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int kk = col + e;
        const int rs = op.c_group.div(kk), c = kk - rs * op.c_group.d, r = op.s.div(rs);
        const int h = h0[i] + r * op.dil_h, w = w0[i] + (rs - r * op.s.d) * op.dil_w;
        const bool in = kk < op.cols && h >= 0 && h < op.h && w >= 0 && w < op.w;
        v[e] = in ? x[image[i] * op.xs[0] + c * op.xs[1] + h * op.xs[2] + w * op.xs[3]]
                  : from_float<Element>(0.f);
      }
      *reinterpret_cast<uint4 *>(tile +
                                 Traits::Tile::offset(i * kRowsPerPass + row_in_pass, chunk)) =
          *reinterpret_cast<const uint4 *>(v);
    }
  }
};

// col[g][m][kk] for kk < K_gemm (the padding up to a multiple of 8 is zeroed), one thread
// per 16-byte chunk; gathers 16 bytes at once where the implicit GEMM could.
template <typename Element>
__global__ void im2col_kernel(const Im2colOperand<Element> op, Element *col, int groups) {
  const int chunks = (op.cols + 7) / 8, ld = chunks * 8;
  const int64_t total = int64_t(groups) * op.rows * chunks;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int chunk = int(i % chunks);
    const int m = int(i / chunks % op.rows);
    const int g = int(i / chunks / op.rows);
    const Element *x = op.x + g * op.group_stride;
    const int np = op.q.div(m), q = m - np * op.q.d;
    const int n = op.p.div(np), p = np - n * op.p.d;
    const Element *xp = x + n * op.xs[0];
    const int h0 = p * op.stride_h - op.pad_h, w0 = q * op.stride_w - op.pad_w;
    const int k0 = chunk * 8;
    alignas(16) Element v[8];
    if (op.vec && k0 + 8 <= op.cols) {
      const int rs = op.c_group.div(k0), c = k0 - rs * op.c_group.d, r = op.s.div(rs);
      const int h = h0 + r * op.dil_h, w = w0 + (rs - r * op.s.d) * op.dil_w;
      if (h >= 0 && h < op.h && w >= 0 && w < op.w) {
        *reinterpret_cast<uint4 *>(v) =
            *reinterpret_cast<const uint4 *>(xp + c + h * op.xs[2] + w * op.xs[3]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = from_float<Element>(0.f);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int kk = k0 + e;
        const int rs = op.c_group.div(kk), c = kk - rs * op.c_group.d, r = op.s.div(rs);
        const int h = h0 + r * op.dil_h, w = w0 + (rs - r * op.s.d) * op.dil_w;
        const bool in = kk < op.cols && h >= 0 && h < op.h && w >= 0 && w < op.w;
        v[e] = in ? xp[c * op.xs[1] + h * op.xs[2] + w * op.xs[3]] : from_float<Element>(0.f);
      }
    }
    *reinterpret_cast<uint4 *>(col + (int64_t(g) * op.rows + m) * ld + k0) =
        *reinterpret_cast<const uint4 *>(v);
  }
}

template <typename T>
Im2colOperand<T> im2col_operand(const void *x_ptr, const int64_t (&xs)[4],
                                const fk_conv2d_shape &s) {
  const ConvDims d(s);
  Im2colOperand<T> x{};
  x.x = static_cast<const T *>(x_ptr);
  for (int i = 0; i < 4; ++i) x.xs[i] = xs[i];
  x.group_stride = int64_t(d.c_group) * xs[1];
  x.rows = d.m, x.cols = d.k_gemm;
  x.h = s.h, x.w = s.w;
  x.p = FastDiv(s.p), x.q = FastDiv(s.q), x.s = FastDiv(s.s), x.c_group = FastDiv(d.c_group);
  x.stride_h = s.stride_h, x.stride_w = s.stride_w, x.pad_h = s.pad_h, x.pad_w = s.pad_w;
  x.dil_h = s.dil_h, x.dil_w = s.dil_w;
  x.vec = implicit_gemm_gather_ok(xs, s) && aligned16(x_ptr);
  return x;
}

// im2col of every group into col, (groups, M, K_gemm padded to 8).
template <typename T>
cudaError_t launch_im2col(const Im2colOperand<T> &x, T *col, int groups, cudaStream_t stream) {
  const int64_t chunks = int64_t(groups) * x.rows * ((x.cols + 7) / 8);
  if (chunks == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((chunks + threads - 1) / threads, int64_t(1) << 20));
  return launch_kernel(im2col_kernel<T>, dim3(blocks), dim3(threads), 0, stream, x, col, groups);
}

// The weights as the GEMM operand W_g[k, kk]: row k = output channel g K/groups + k,
// column kk = (r, s, c).
template <typename T>
gemm::StridedOperand<T> weight_operand(const void *w_ptr, const int64_t (&ws)[4],
                                       const fk_conv2d_shape &s) {
  const ConvDims d(s);
  gemm::StridedOperand<T> w{};
  w.base = static_cast<const T *>(w_ptr);
  w.row_map = IndexMap3::linear(ws[0]);
  w.col_map = IndexMap3{s.s, d.c_group, ws[2], ws[3], ws[1]};
  w.rows = d.k_group, w.cols = d.k_gemm;
  w.group_stride = int64_t(d.k_group) * ws[0];
  w.vec = w.col_map.vectorizable() && ws[0] % 8 == 0 && aligned16(w_ptr);
  return w;
}

// The forward's epilogue: y [, y_pre] = act(acc + bias) at (n, p, q) x k with y's strides.
template <typename T> gemm::EpilogueParams<T> conv_epilogue_params(const fk_conv2d_params &p) {
  const fk_conv2d_shape &s = p.shape;
  const ConvDims d(s);
  gemm::EpilogueParams<T> ep{};
  ep.out = static_cast<T *>(p.y);
  ep.out_pre = static_cast<T *>(p.y_pre);
  ep.bias = static_cast<const T *>(p.bias);
  ep.row_map = IndexMap3{s.p, s.q, p.y_strides[0], p.y_strides[2], p.y_strides[3]};
  ep.col_map = IndexMap3::linear(p.y_strides[1]);
  ep.rows = d.m, ep.cols = d.k_group;
  ep.group_stride = int64_t(d.k_group) * p.y_strides[1];
  ep.activation = p.activation;
  ep.vec = p.y_strides[1] == 1 && p.y_strides[0] % 8 == 0 && p.y_strides[2] % 8 == 0 &&
           p.y_strides[3] % 8 == 0 && (d.k_group % 8 == 0 || s.groups == 1) && aligned16(p.y) &&
           (p.y_pre == nullptr || aligned16(p.y_pre));
  return ep;
}

// The im2col algorithm's A operand: the workspace's (groups, M, K_gemm padded to 8) matrix.
template <typename T> gemm::StridedOperand<T> col_operand(void *workspace, const ConvDims &d) {
  gemm::StridedOperand<T> a{};
  a.base = static_cast<const T *>(workspace);
  a.row_map = IndexMap3::linear(d.k_gemm_padded);
  a.col_map = IndexMap3::linear(1);
  a.rows = d.m, a.cols = d.k_gemm;
  a.group_stride = int64_t(d.m) * d.k_gemm_padded;
  a.vec = true; // rows padded to 16 bytes, workspace 256-byte aligned
  return a;
}

// One GEMM of the family with the loaders given (template <class Traits, int ROWS>): on
// Hopper's wgmma mainloop with the gathering producer (gemm_sm90.cuh) or on the sm80 core.
// kMaySplit: `splits` > 1 splits the reduction (SplitKLoader, groups x splits along
// blockIdx.z); without it no split kernel is compiled (splits must be 1).
template <template <class, int> class ALoader, template <class, int> class BLoader,
          template <class> class Epilogue, typename T, bool kMaySplit = false, class AOperand,
          class BOperand, class Params>
cudaError_t conv_gemm_run(bool sm90, const AOperand &a, const BOperand &b, const Params &ep,
                          int k_total, int splits, int groups, int device, cudaStream_t stream) {
  if (sm90) {
    using Tr = gemm::TileGemmTraitsSm90<T, 128, 4>;
    using L = gemm::GatherLoaderTraits<T>;
    using A = ALoader<L, Tr::kBlockM>;
    using B = BLoader<L, Tr::kBlockN>;
    if constexpr (kMaySplit)
      if (splits > 1)
        return gemm::launch_tile_gemm_sm90_gather_split<Tr, A, B, Epilogue<Tr>>(
            a, b, ep, k_total, splits, groups, device, stream);
    return gemm::launch_tile_gemm_sm90_gather<Tr, A, B, Epilogue<Tr>>(a, b, ep, k_total, groups,
                                                                      device, stream);
  }
  using Tr = gemm::ConvGemmTraits<T>;
  using A = ALoader<Tr, Tr::kBlockM>;
  using B = BLoader<Tr, Tr::kBlockN>;
  if constexpr (kMaySplit)
    if (splits > 1)
      return gemm::launch_tile_gemm_split<Tr, A, B, Epilogue<Tr>>(a, b, ep, k_total, splits, groups,
                                                                  stream);
  return gemm::launch_tile_gemm<Tr, A, B, Epilogue<Tr>>(a, b, ep, k_total, groups, stream);
}

template <class Traits, int ROWS> using PlainLoader = gemm::StridedLoader<Traits, ROWS>;

template <typename T>
cudaError_t conv2d_fwd_gemm(const fk_conv2d_params &p, cudaStream_t stream, bool sm90) {
  const fk_conv2d_shape &s = p.shape;
  const ConvDims d(s);
  if (d.m == 0 || d.k_group == 0) return cudaSuccess;
  const Im2colOperand<T> x = im2col_operand<T>(p.x, p.x_strides, s);
  const gemm::StridedOperand<T> w = weight_operand<T>(p.weight, p.w_strides, s);
  const gemm::EpilogueParams<T> ep = conv_epilogue_params<T>(p);
  if (p.algo == FK_CONV_ALGO_IMPLICIT_GEMM)
    return conv_gemm_run<Im2colLoader, PlainLoader, gemm::StagedEpilogue, T>(
        sm90, x, w, ep, d.k_gemm, 1, s.groups, p.device, stream);
  const cudaError_t err = launch_im2col(x, static_cast<T *>(p.workspace), s.groups, stream);
  if (err != cudaSuccess) return err;
  return conv_gemm_run<PlainLoader, PlainLoader, gemm::StagedEpilogue, T>(
      sm90, col_operand<T>(p.workspace, d), w, ep, d.k_gemm, 1, s.groups, p.device, stream);
}

} // namespace conv
} // namespace fk
