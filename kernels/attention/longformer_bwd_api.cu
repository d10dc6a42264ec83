// C entry points of the Longformer backward (fk_longformer.h): check what would be
// undefined behaviour on the device, then dispatch on (dtype, head dim) and launch on the
// caller's device and stream (with num_splits > 1: the split pass, then its reduce, on
// that stream). The work list (CSR) and the gathered row lists are validated by the
// caller.
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

// Splits (num_splits > 1): only `split_pass` (dq GLOBAL_ROWS, dkdv GLOBAL_COLS), with the
// workspace; the split grid's x (outer tiles x splits) and the reduce's grid must fit.
bool longformer_bwd_splits_ok(const fk_longformer_bwd_params *p, int split_pass,
                              int32_t per_seq) {
  if (p->num_splits < 1) return false;
  if (p->num_splits == 1) return true;
  if (p->c.pass != split_pass || p->partial == nullptr) return false;
  const int64_t outer =
      (int64_t(per_seq) + FK_LONGFORMER_BWD_BLOCK - 1) / FK_LONGFORMER_BWD_BLOCK;
  return outer * p->num_splits <= INT32_MAX &&
         int64_t(p->c.batch) * p->c.heads * per_seq / 4 < INT32_MAX;
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
      (p->c.pass != FK_LONGFORMER_LOCAL && p->c.pass != FK_LONGFORMER_GLOBAL_ROWS) ||
      !longformer_bwd_splits_ok(p, FK_LONGFORMER_GLOBAL_ROWS, p->c.q_rows_per_seq))
    return cudaErrorInvalidValue;
  // LOCAL's packed global keys (optional): a list of at least one entry per sequence.
  if (p->c.pass == FK_LONGFORMER_LOCAL && p->c.k_rows != nullptr && p->c.k_rows_per_seq < 1)
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
       p->c.pass != FK_LONGFORMER_GLOBAL_ROWS) ||
      !longformer_bwd_splits_ok(p, FK_LONGFORMER_GLOBAL_COLS, p->c.k_rows_per_seq))
    return cudaErrorInvalidValue;
  if (p->c.seqlen == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->c.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->c.dtype == FK_DTYPE_F16 ? longformer_bwd_dkdv_dispatch<__half>(*p, s)
                                    : longformer_bwd_dkdv_dispatch<__nv_bfloat16>(*p, s);
}
