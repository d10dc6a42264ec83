// C entries of the fused feed-forward block (forward, backward): refuse what would be undefined on
// the device, then dispatch the dtype (activation, gate, biases and residual are run-time switches
// of the epilogues) and launch on the caller's device and stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "../common/tma_host.cuh"
#include "ffn.h"

namespace {

bool width_ok(int32_t v) { return v > 0 && v % 8 == 0; }

bool fwd_args_ok(const fk_ffn_params &p) {
  if (p.x == nullptr || p.w1 == nullptr || p.w2 == nullptr || p.h == nullptr || p.y == nullptr)
    return false;
  if (p.w3 == nullptr && p.b3 != nullptr) return false;
  if (p.tokens < 0 || !width_ok(p.d_model) || !width_ok(p.d_hidden)) return false;
  // The gated GEMM has 2 d_hidden columns, 64 per block along grid y (at most 65535).
  if (int64_t(p.d_hidden) * 2 > int64_t(65535) * 64 || int64_t(p.d_model) > int64_t(65535) * 64)
    return false;
  if (p.tokens > (int64_t(1) << 31) - 256) return false;
  if (p.x_stride < p.d_model || p.w1_stride < p.d_model || p.w2_stride < p.d_hidden ||
      p.h_stride < p.d_hidden || p.y_stride < p.d_model ||
      (p.w3 != nullptr && p.w3_stride < p.d_model))
    return false;
  if (p.activation < FK_FFN_RELU || p.activation > FK_FFN_SILU) return false;
  if (p.residual != 0 && p.residual != 1) return false;
  return p.dtype == FK_DTYPE_F16 || p.dtype == FK_DTYPE_BF16;
}

bool bwd_args_ok(const fk_ffn_bwd_params &p) {
  const bool gated = p.w3 != nullptr;
  if (p.x == nullptr || p.w1 == nullptr || p.w2 == nullptr || p.dy == nullptr || p.dx == nullptr ||
      p.dw1 == nullptr || p.dw2 == nullptr || (gated && p.dw3 == nullptr))
    return false;
  if (!gated && (p.b3 != nullptr || p.db3 != nullptr || p.dw3 != nullptr)) return false;
  if (p.tokens < 1 || !width_ok(p.d_model) || !width_ok(p.d_hidden)) return false;
  if (int64_t(p.d_hidden) * 2 > int64_t(65535) * 64 || int64_t(p.d_model) > int64_t(65535) * 64 ||
      p.tokens > (int64_t(1) << 31) - 256)
    return false;
  if (p.x_stride < p.d_model || p.w1_stride < p.d_model || p.w2_stride < p.d_hidden ||
      p.dy_stride < p.d_model || p.dx_stride < p.d_model || p.dw1_stride < p.d_model ||
      p.dw2_stride < p.d_hidden || (gated && (p.w3_stride < p.d_model || p.dw3_stride < p.d_model)))
    return false;
  if (p.activation < FK_FFN_RELU || p.activation > FK_FFN_SILU) return false;
  if (p.residual != 0 && p.residual != 1) return false;
  return p.dtype == FK_DTYPE_F16 || p.dtype == FK_DTYPE_BF16;
}

} // namespace

namespace fk {
namespace ffn {
bool ffn_sm90_eligible(const fk_ffn_params &p) {
  const int64_t t = p.tokens;
  return tma_matrix_ok(p.x, p.x_stride, t, p.d_model) &&
         tma_matrix_ok(p.w1, p.w1_stride, p.d_hidden, p.d_model) &&
         (p.w3 == nullptr || tma_matrix_ok(p.w3, p.w3_stride, p.d_hidden, p.d_model)) &&
         tma_matrix_ok(p.h, p.h_stride, t, p.d_hidden) &&
         tma_matrix_ok(p.w2, p.w2_stride, p.d_model, p.d_hidden);
}
bool ffn_bwd_sm90_eligible(const fk_ffn_bwd_params &p) {
  const int64_t t = p.tokens;
  return tma_matrix_ok(p.x, p.x_stride, t, p.d_model) &&
         tma_matrix_ok(p.dy, p.dy_stride, t, p.d_model) &&
         tma_matrix_ok(p.w1, p.w1_stride, p.d_hidden, p.d_model) &&
         (p.w3 == nullptr || tma_matrix_ok(p.w3, p.w3_stride, p.d_hidden, p.d_model)) &&
         tma_matrix_ok(p.w2, p.w2_stride, p.d_model, p.d_hidden); // the workspace always is
}
} // namespace ffn
} // namespace fk

extern "C" int64_t fk_ffn_bwd_workspace_bytes(const fk_ffn_bwd_params *p) {
  return p != nullptr && bwd_args_ok(*p) ? fk::ffn::FfnBwdWorkspace(*p).bytes : 0;
}

extern "C" int32_t fk_ffn_bwd(const fk_ffn_bwd_params *p, void *stream) {
  if (p == nullptr || !bwd_args_ok(*p) || p->workspace == nullptr ||
      reinterpret_cast<uintptr_t>(p->workspace) % 256 != 0)
    return cudaErrorInvalidValue;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  if (fk::use_sm90_kernels(p->device) && fk::ffn::ffn_bwd_sm90_eligible(*p))
    return p->dtype == FK_DTYPE_F16 ? fk::ffn::ffn_bwd_sm90<__half>(*p, s)
                                    : fk::ffn::ffn_bwd_sm90<__nv_bfloat16>(*p, s);
  return p->dtype == FK_DTYPE_F16 ? fk::ffn::ffn_bwd<__half>(*p, s)
                                  : fk::ffn::ffn_bwd<__nv_bfloat16>(*p, s);
}

extern "C" int32_t fk_ffn_fwd(const fk_ffn_params *p, void *stream) {
  if (p == nullptr || !fwd_args_ok(*p)) return cudaErrorInvalidValue;
  if (p->tokens == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  // Hopper: TMA + wgmma where every matrix is TMA-describable (the tensor maps' rules).
  if (fk::use_sm90_kernels(p->device) && fk::ffn::ffn_sm90_eligible(*p))
    return p->dtype == FK_DTYPE_F16 ? fk::ffn::ffn_fwd_sm90<__half>(*p, s)
                                    : fk::ffn::ffn_fwd_sm90<__nv_bfloat16>(*p, s);
  return p->dtype == FK_DTYPE_F16 ? fk::ffn::ffn_fwd<__half>(*p, s)
                                  : fk::ffn::ffn_fwd<__nv_bfloat16>(*p, s);
}
