// C entry point of the Longformer forward (passes LOCAL and GLOBAL_ROWS): checks what would
// be undefined behaviour on the device, then dispatches on (dtype, head dim) and launches on
// the caller's device and stream (GLOBAL_ROWS with num_splits > 1: the split kernel, then
// the combine kernel, on that stream). The tile plan (CSR), q_rows and k_rows are
// validated by the caller.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "longformer_fwd.h"

namespace {

template <typename T>
cudaError_t longformer_dispatch_head_dim(const fk_longformer_fwd_params &p, cudaStream_t s) {
  if (p.c.head_dim <= 64) return fk::run_longformer_fwd_sm80<64, T>(p, s);
  return fk::run_longformer_fwd_sm80<128, T>(p, s);
}

} // namespace

extern "C" int32_t fk_longformer_fwd(const fk_longformer_fwd_params *p, void *stream) {
  if (p == nullptr) return cudaErrorInvalidValue;
  const fk_longformer_common &c = p->c;
  if (p->q == nullptr || p->k == nullptr || p->v == nullptr || p->o == nullptr ||
      p->lse == nullptr || c.dilation == nullptr || c.head_class == nullptr ||
      c.tile_offsets == nullptr || c.tile_ids == nullptr || c.batch <= 0 || c.heads <= 0 ||
      c.seqlen < 0 || c.window < 0 || c.num_classes <= 0 || c.head_dim <= 0 ||
      c.head_dim % 8 != 0 || c.head_dim > 128)
    return cudaErrorInvalidValue;
  // Outer rows: contiguous query tiles (LOCAL) or the gathered q_rows (GLOBAL_ROWS). k_rows:
  // LOCAL's packed global keys (optional); GLOBAL_ROWS does not read it. Splits over keys:
  // GLOBAL_ROWS only, with both workspaces.
  if (p->num_splits < 1) return cudaErrorInvalidValue;
  switch (c.pass) {
  case FK_LONGFORMER_LOCAL:
    if (c.q_rows != nullptr || p->num_splits != 1) return cudaErrorInvalidValue;
    if (c.k_rows != nullptr && c.k_rows_per_seq < 1) return cudaErrorInvalidValue;
    break;
  case FK_LONGFORMER_GLOBAL_ROWS:
    if (c.q_rows == nullptr || c.q_rows_per_seq < 1) return cudaErrorInvalidValue;
    if (p->num_splits > 1) {
      if (p->partial_o == nullptr || p->partial_lse == nullptr) return cudaErrorInvalidValue;
      // The split grid's x (outer tiles x splits) and the combine grid must fit.
      const int64_t outer = (int64_t(c.q_rows_per_seq) + FK_LONGFORMER_BLOCK_M - 1) /
                            FK_LONGFORMER_BLOCK_M;
      if (outer * p->num_splits > INT32_MAX ||
          int64_t(c.batch) * c.heads * c.q_rows_per_seq / 4 >= INT32_MAX)
        return cudaErrorInvalidValue;
    }
    break;
  default: return cudaErrorInvalidValue;
  }
  if (c.seqlen == 0) return cudaSuccess;
  fk::DeviceGuard guard(c.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  switch (c.dtype) {
  case FK_DTYPE_F16: return longformer_dispatch_head_dim<__half>(*p, s);
  case FK_DTYPE_BF16: return longformer_dispatch_head_dim<__nv_bfloat16>(*p, s);
  default: return cudaErrorInvalidValue;
  }
}
