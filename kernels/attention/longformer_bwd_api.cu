// C entry points of the Longformer backward (fk_longformer.h): check what would be
// undefined behaviour on the device (common/api_checks.h, as the forward does), then
// dispatch on (dtype, head dim) and launch on the caller's device and stream (with
// num_splits > 1: the split pass, then its reduce, on that stream). The work list (CSR)
// and the gathered row lists are validated by the caller.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "common/api_checks.h"
#include "longformer_bwd.h"

namespace {

// What every entry point needs (common/api_checks.h, as the forward): the shared fields,
// dO and the Delta workspace.
bool longformer_bwd_common_ok(const fk_longformer_bwd_params *p) {
  return p != nullptr && fk::check::check_longformer_shape(p->base.shape) &&
         fk::check::all_set(p->dout, p->delta);
}

// What dq and dkdv need besides: the rule's inputs, the schedule, the pass's row lists.
bool longformer_bwd_pass_ok(const fk_longformer_bwd_params *p) {
  return fk::check::all_set(p->base.q, p->base.k, p->base.v, p->lse) &&
         fk::check::check_longformer_schedule(p->c) && fk::check::check_longformer_rows(p->c);
}

template <typename T>
cudaError_t longformer_bwd_dq_dispatch(const fk_longformer_bwd_params &p, cudaStream_t s) {
  if (p.base.shape.head_dim <= 64) return fk::run_longformer_bwd_dq_sm80<64, T>(p, s);
  return fk::run_longformer_bwd_dq_sm80<128, T>(p, s);
}

template <typename T>
cudaError_t longformer_bwd_dkdv_dispatch(const fk_longformer_bwd_params &p, cudaStream_t s) {
  if (p.base.shape.head_dim <= 64) return fk::run_longformer_bwd_dkdv_sm80<64, T>(p, s);
  return fk::run_longformer_bwd_dkdv_sm80<128, T>(p, s);
}

} // namespace

extern "C" int32_t fk_longformer_bwd_delta(const fk_longformer_bwd_params *p, void *stream) {
  if (!longformer_bwd_common_ok(p) || p->o == nullptr) return cudaErrorInvalidValue;
  if (p->base.shape.seqlen_q == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->base.shape.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->base.shape.dtype == FK_DTYPE_F16
             ? fk::run_longformer_bwd_delta_sm80<__half>(*p, s)
             : fk::run_longformer_bwd_delta_sm80<__nv_bfloat16>(*p, s);
}

extern "C" int32_t fk_longformer_bwd_dq(const fk_longformer_bwd_params *p, void *stream) {
  if (!longformer_bwd_common_ok(p) || !longformer_bwd_pass_ok(p) || p->dq == nullptr ||
      (p->c.pass != FK_LONGFORMER_LOCAL && p->c.pass != FK_LONGFORMER_GLOBAL_ROWS) ||
      !fk::check::check_splits(p->num_splits, p->base.shape, p->c, FK_LONGFORMER_GLOBAL_ROWS,
                               p->partial != nullptr, p->c.q_rows_per_seq, FK_LONGFORMER_BWD_BLOCK))
    return cudaErrorInvalidValue;
  if (p->base.shape.seqlen_q == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->base.shape.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->base.shape.dtype == FK_DTYPE_F16 ? longformer_bwd_dq_dispatch<__half>(*p, s)
                                             : longformer_bwd_dq_dispatch<__nv_bfloat16>(*p, s);
}

extern "C" int32_t fk_longformer_bwd_dkdv(const fk_longformer_bwd_params *p, void *stream) {
  if (!longformer_bwd_common_ok(p) || !longformer_bwd_pass_ok(p) || p->dk == nullptr ||
      p->dv == nullptr ||
      (p->c.pass != FK_LONGFORMER_LOCAL_BAND && p->c.pass != FK_LONGFORMER_GLOBAL_COLS &&
       p->c.pass != FK_LONGFORMER_GLOBAL_ROWS) ||
      !fk::check::check_splits(p->num_splits, p->base.shape, p->c, FK_LONGFORMER_GLOBAL_COLS,
                               p->partial != nullptr, p->c.k_rows_per_seq, FK_LONGFORMER_BWD_BLOCK))
    return cudaErrorInvalidValue;
  if (p->base.shape.seqlen_q == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->base.shape.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->base.shape.dtype == FK_DTYPE_F16 ? longformer_bwd_dkdv_dispatch<__half>(*p, s)
                                             : longformer_bwd_dkdv_dispatch<__nv_bfloat16>(*p, s);
}
