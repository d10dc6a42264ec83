// C entry points of conv2d: check what would be undefined behaviour on the device, then
// dispatch dtype and algorithm (the activation is a run-time switch in the epilogue) and
// launch on the caller's device and stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "conv.h"

namespace {

using fk::conv::ConvDims;

bool shape_ok(const fk_conv2d_shape &s) {
  if (s.n < 0 || s.c <= 0 || s.h <= 0 || s.w <= 0 || s.k <= 0 || s.r <= 0 || s.s <= 0 ||
      s.stride_h <= 0 || s.stride_w <= 0 || s.pad_h < 0 || s.pad_w < 0 || s.dil_h <= 0 ||
      s.dil_w <= 0 || s.groups <= 0 || s.c % s.groups != 0 || s.k % s.groups != 0)
    return false;
  const int64_t span_h = int64_t(s.h) + 2 * s.pad_h - int64_t(s.dil_h) * (s.r - 1) - 1;
  const int64_t span_w = int64_t(s.w) + 2 * s.pad_w - int64_t(s.dil_w) * (s.s - 1) - 1;
  return span_h >= 0 && span_w >= 0 && s.p == span_h / s.stride_h + 1 &&
         s.q == span_w / s.stride_w + 1;
}

bool is_half_type(int32_t dtype) { return dtype == FK_DTYPE_F16 || dtype == FK_DTYPE_BF16; }

bool fwd_supported(const fk_conv2d_params &p) {
  if (p.activation < FK_ACT_NONE || p.activation > FK_ACT_SILU) return false;
  if (p.algo != FK_CONV_ALGO_IM2COL && p.algo != FK_CONV_ALGO_IMPLICIT_GEMM) return false;
  if (p.dtype == FK_DTYPE_F32) return true; // direct kernel, whichever algo is asked for
  if (!is_half_type(p.dtype)) return false;
  return p.algo == FK_CONV_ALGO_IM2COL || fk::conv::implicit_gemm_gather_ok(p.x_strides, p.shape);
}

int64_t fwd_workspace(const fk_conv2d_params &p) {
  if (!is_half_type(p.dtype) || p.algo != FK_CONV_ALGO_IM2COL) return 0;
  const ConvDims d(p.shape);
  const int64_t bytes = int64_t(p.shape.groups) * d.m * d.k_gemm_padded * 2;
  return (bytes + 255) / 256 * 256;
}

} // namespace

extern "C" int32_t fk_conv2d_supports(const fk_conv2d_params *p) {
  return p != nullptr && shape_ok(p->shape) && fwd_supported(*p);
}

extern "C" int64_t fk_conv2d_workspace_bytes(const fk_conv2d_params *p) {
  return p != nullptr && shape_ok(p->shape) ? fwd_workspace(*p) : 0;
}

extern "C" int32_t fk_conv2d_fwd(const fk_conv2d_params *p, void *stream) {
  if (p == nullptr || p->x == nullptr || p->weight == nullptr || p->y == nullptr ||
      !shape_ok(p->shape) || !fwd_supported(*p) ||
      (fwd_workspace(*p) > 0 && p->workspace == nullptr))
    return cudaErrorInvalidValue;
  if (p->shape.n == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  const bool sm90 = fk::use_sm90_kernels(p->device); // Hopper: the wgmma mainloop
  switch (p->dtype) {
  case FK_DTYPE_F16: return fk::conv::conv2d_fwd_gemm<__half>(*p, s, sm90);
  case FK_DTYPE_BF16: return fk::conv::conv2d_fwd_gemm<__nv_bfloat16>(*p, s, sm90);
  default: return fk::conv::conv2d_fwd_direct<float>(*p, s);
  }
}

// f16 / bf16: GEMMs as fk::conv::BwdPlan lays them out (the implicit algorithm computes dx
// without col2im where the strides are 1; dweight goes through im2col either way); f32:
// direct kernels, no workspace.
extern "C" int32_t fk_conv2d_bwd_supports(const fk_conv2d_bwd_params *p) {
  return p != nullptr && shape_ok(p->shape) &&
         (is_half_type(p->dtype) || p->dtype == FK_DTYPE_F32) &&
         (p->algo == FK_CONV_ALGO_IM2COL || p->algo == FK_CONV_ALGO_IMPLICIT_GEMM);
}

extern "C" int64_t fk_conv2d_bwd_workspace_bytes(const fk_conv2d_bwd_params *p) {
  if (p == nullptr || !fk_conv2d_bwd_supports(p) || !is_half_type(p->dtype)) return 0;
  return fk::conv::BwdPlan(*p).workspace_bytes();
}

extern "C" int32_t fk_conv2d_bwd(const fk_conv2d_bwd_params *p, void *stream) {
  if (p == nullptr || !fk_conv2d_bwd_supports(p) || p->dy == nullptr ||
      (p->dx != nullptr && p->weight == nullptr) || (p->dweight != nullptr && p->x == nullptr) ||
      (fk_conv2d_bwd_workspace_bytes(p) > 0 && p->workspace == nullptr))
    return cudaErrorInvalidValue;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  const bool sm90 = fk::use_sm90_kernels(p->device);
  switch (p->dtype) {
  case FK_DTYPE_F16: return fk::conv::conv2d_bwd_gemm<__half>(*p, s, sm90);
  case FK_DTYPE_BF16: return fk::conv::conv2d_bwd_gemm<__nv_bfloat16>(*p, s, sm90);
  default: return fk::conv::conv2d_bwd_direct<float>(*p, s);
  }
}
