// Internal interface of the convolution family: the launchers conv_api.cu dispatches to,
// each instantiated in its own translation unit so nvcc compiles them in parallel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "../include/fk_conv.h"

namespace fk {
namespace conv {

// f16 / bf16 forward on the tensor-core GEMM core (params->algo picks im2col or implicit).
// sm90: on Hopper's wgmma mainloop (gemm_sm90.cuh's gathering producer).
template <typename T>
cudaError_t conv2d_fwd_gemm(const fk_conv2d_params &p, cudaStream_t s, bool sm90);
// f16 / bf16 backward on the GEMM core (BwdPlan below); sm90: its GEMMs on Hopper's wgmma
// mainloop.
template <typename T>
cudaError_t conv2d_bwd_gemm(const fk_conv2d_bwd_params &p, cudaStream_t s, bool sm90);
// Direct (SIMT, f32 accumulation) kernels: the f32 forward and backward (correctness over
// speed), and dbias of every dtype.
template <typename T> cudaError_t conv2d_fwd_direct(const fk_conv2d_params &p, cudaStream_t s);
template <typename T> cudaError_t conv2d_bwd_direct(const fk_conv2d_bwd_params &p, cudaStream_t s);
template <typename T> cudaError_t conv2d_dbias(const fk_conv2d_bwd_params &p, cudaStream_t s);

// Geometry every launcher needs; M = N P Q output pixels, per group N_gemm = K / groups
// output channels and K_gemm = R S C / groups taps, ordered (r, s, c), c fastest.
struct ConvDims {
  int m, c_group, k_group, k_gemm, k_gemm_padded;
  explicit ConvDims(const fk_conv2d_shape &s)
      : m(s.n * s.p * s.q), c_group(s.c / s.groups), k_group(s.k / s.groups),
        k_gemm(s.r * s.s * (s.c / s.groups)), k_gemm_padded((k_gemm + 7) / 8 * 8) {}
};

// One (groups, M, K_gemm padded to 8) matrix of `elem`-byte elements, 256-byte rounded. The
// f16 / bf16 backward's workspace holds im2col(x) (16-bit) then dcol (f32).
inline int64_t col_matrix_bytes(const fk_conv2d_shape &s, size_t elem) {
  const ConvDims d(s);
  return (int64_t(s.groups) * d.m * d.k_gemm_padded * int64_t(elem) + 255) / 256 * 256;
}

// How the f16 / bf16 backward runs and the workspace it needs: one place for the launcher
// and fk_conv2d_bwd_workspace_bytes. dx runs before dweight, so their regions overlap.
// - dx: with the implicit algorithm and unit strides, dx is the forward implicit GEMM of dy
//   with the weights flipped and transposed (copied into the workspace, (C, R, S, K/groups)
//   contiguous): no col2im. Otherwise dcol = dy W in f32 (col_matrix_bytes(s, 4)), then
//   col2im.
// - dweight: im2col(x) in the workspace, then the GEMM over the N P Q pixels split along
//   them into dw_splits f32 partials (after col), summed in a fixed order: deterministic.
//   The splits depend on the shape only (enough tiles for a large GPU: ~256), each at least
//   4 k-tiles of 64 pixels, none empty. No pixels (an empty batch): dweight is zeros, no
//   workspace.
struct BwdPlan {
  bool dx_implicit;
  int dw_splits, dw_k_split; // pixels per split, a multiple of 64
  int64_t dx_bytes, col_bytes, partial_bytes;
  explicit BwdPlan(const fk_conv2d_bwd_params &p) {
    const fk_conv2d_shape &s = p.shape;
    const ConvDims d(s);
    const auto round256 = [](int64_t b) { return (b + 255) / 256 * 256; };
    dx_implicit = p.algo == FK_CONV_ALGO_IMPLICIT_GEMM && s.stride_h == 1 && s.stride_w == 1;
    const int64_t flipped = int64_t(s.c) * s.r * s.s * d.k_group * 2;
    dx_bytes = p.dx == nullptr ? 0 : dx_implicit ? round256(flipped) : col_matrix_bytes(s, 4);
    const int m_ktiles = (d.m + 63) / 64;
    const int64_t tiles = int64_t(s.groups) * ((d.k_group + 127) / 128) * ((d.k_gemm + 127) / 128);
    int64_t splits = (256 + tiles - 1) / tiles;
    splits = std::min<int64_t>({splits, m_ktiles / 4, 64, 65535 / s.groups});
    splits = std::max<int64_t>(splits, 1);
    dw_k_split = int((m_ktiles + splits - 1) / splits) * 64;
    dw_splits = dw_k_split > 0 ? (d.m + dw_k_split - 1) / dw_k_split : 1;
    col_bytes = p.dweight == nullptr ? 0 : col_matrix_bytes(s, 2);
    partial_bytes = p.dweight == nullptr || d.m == 0
                        ? 0
                        : round256(int64_t(s.groups) * dw_splits * d.k_group * d.k_gemm *
                                   int64_t(sizeof(float)));
  }
  int64_t workspace_bytes() const { return std::max(dx_bytes, col_bytes + partial_bytes); }
};

inline bool aligned16(const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The implicit GEMM's 16-byte gathers along C: unit channel stride, C / groups and the
// other strides multiples of 8.
inline bool implicit_gemm_gather_ok(const int64_t (&xs)[4], const fk_conv2d_shape &s) {
  return xs[1] == 1 && (s.c / s.groups) % 8 == 0 && xs[0] % 8 == 0 && xs[2] % 8 == 0 &&
         xs[3] % 8 == 0;
}

} // namespace conv
} // namespace fk
