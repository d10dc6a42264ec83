// C entry points of the Longformer backward (fk_longformer.h): check what would be
// undefined behaviour on the device, then dispatch on (dtype, head dim) and launch on the
// caller's device and stream. The work list (CSR) and the gathered row lists are validated
// by the caller.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "longformer_bwd.h"

namespace {

// What every entry point needs of the shared fields.
bool longformer_bwd_common_ok(const fk_longformer_bwd_params *p) {
  if (p == nullptr) return false;
  const fk_longformer_common &c = p->c;
  return c.batch > 0 && c.heads > 0 && c.seqlen >= 0 && c.seqlen < (1 << 30) &&
         c.head_dim > 0 && c.head_dim % 8 == 0 && c.head_dim <= 128 &&
         (c.dtype == FK_DTYPE_F16 || c.dtype == FK_DTYPE_BF16) && p->dout != nullptr &&
         p->delta != nullptr;
}

// What dq and dkdv need besides: the rule's inputs, the schedule, the pass's row lists.
bool longformer_bwd_pass_ok(const fk_longformer_bwd_params *p) {
  const fk_longformer_common &c = p->c;
  if (p->q == nullptr || p->k == nullptr || p->v == nullptr || p->lse == nullptr ||
      c.dilation == nullptr || c.head_class == nullptr || c.tile_offsets == nullptr ||
      c.tile_ids == nullptr || c.window < 0 || c.num_classes <= 0)
    return false;
  if (c.pass == FK_LONGFORMER_GLOBAL_ROWS && (c.q_rows == nullptr || c.q_rows_per_seq < 0))
    return false;
  if (c.pass == FK_LONGFORMER_GLOBAL_COLS && (c.k_rows == nullptr || c.k_rows_per_seq < 0))
    return false;
  return true;
}

template <typename T>
cudaError_t longformer_bwd_dq_dispatch(const fk_longformer_bwd_params &p, cudaStream_t s) {
  if (p.c.head_dim <= 64) return fk::run_longformer_bwd_dq_sm80<64, T>(p, s);
  return fk::run_longformer_bwd_dq_sm80<128, T>(p, s);
}

template <typename T>
cudaError_t longformer_bwd_dkdv_dispatch(const fk_longformer_bwd_params &p, cudaStream_t s) {
  if (p.c.head_dim <= 64) return fk::run_longformer_bwd_dkdv_sm80<64, T>(p, s);
  return fk::run_longformer_bwd_dkdv_sm80<128, T>(p, s);
}

} // namespace

extern "C" int32_t fk_longformer_bwd_delta(const fk_longformer_bwd_params *p, void *stream) {
  if (!longformer_bwd_common_ok(p) || p->o == nullptr) return cudaErrorInvalidValue;
  if (p->c.seqlen == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->c.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->c.dtype == FK_DTYPE_F16 ? fk::run_longformer_bwd_delta_sm80<__half>(*p, s)
                                    : fk::run_longformer_bwd_delta_sm80<__nv_bfloat16>(*p, s);
}

extern "C" int32_t fk_longformer_bwd_dq(const fk_longformer_bwd_params *p, void *stream) {
  if (!longformer_bwd_common_ok(p) || !longformer_bwd_pass_ok(p) || p->dq == nullptr ||
      (p->c.pass != FK_LONGFORMER_LOCAL && p->c.pass != FK_LONGFORMER_GLOBAL_ROWS))
    return cudaErrorInvalidValue;
  if (p->c.seqlen == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->c.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->c.dtype == FK_DTYPE_F16 ? longformer_bwd_dq_dispatch<__half>(*p, s)
                                    : longformer_bwd_dq_dispatch<__nv_bfloat16>(*p, s);
}

extern "C" int32_t fk_longformer_bwd_dkdv(const fk_longformer_bwd_params *p, void *stream) {
  if (!longformer_bwd_common_ok(p) || !longformer_bwd_pass_ok(p) || p->dk == nullptr ||
      p->dv == nullptr ||
      (p->c.pass != FK_LONGFORMER_LOCAL_BAND && p->c.pass != FK_LONGFORMER_GLOBAL_COLS &&
       p->c.pass != FK_LONGFORMER_GLOBAL_ROWS))
    return cudaErrorInvalidValue;
  if (p->c.seqlen == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->c.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->c.dtype == FK_DTYPE_F16 ? longformer_bwd_dkdv_dispatch<__half>(*p, s)
                                    : longformer_bwd_dkdv_dispatch<__nv_bfloat16>(*p, s);
}
