// Internal interface of the convolution family: the launchers conv_api.cu dispatches to,
// each instantiated in its own translation unit so nvcc compiles them in parallel.
#pragma once

#include <cuda_runtime.h>

#include "../include/fk_conv.h"

namespace fk {
namespace conv {

// f16 / bf16 forward on the tensor-core GEMM core (params->algo picks im2col or implicit).
template <typename T> cudaError_t conv2d_fwd_gemm(const fk_conv2d_params &p, cudaStream_t s);
// The same on Hopper's wgmma mainloop (conv_gemm_sm90.cuh), one group only.
template <typename T> cudaError_t conv2d_fwd_gemm_sm90(const fk_conv2d_params &p, cudaStream_t s);
// f16 / bf16 backward on the GEMM core; needs conv2d_bwd_workspace_bytes of workspace. sm90:
// its GEMMs on Hopper's wgmma mainloop (one group only).
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

inline bool aligned16(const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The implicit GEMM's 16-byte gathers along C: unit channel stride, C / groups and the
// other strides multiples of 8.
inline bool implicit_gemm_gather_ok(const int64_t (&xs)[4], const fk_conv2d_shape &s) {
  return xs[1] == 1 && (s.c / s.groups) % 8 == 0 && xs[0] % 8 == 0 && xs[2] % 8 == 0 &&
         xs[3] % 8 == 0;
}

} // namespace conv
} // namespace fk
