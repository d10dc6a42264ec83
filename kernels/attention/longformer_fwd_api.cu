// C entry point of the Longformer forward (passes LOCAL and GLOBAL_ROWS): checks what would
// be undefined behaviour on the device (common/api_checks.h, as the backward does), then
// dispatches on (dtype, head dim) and launches on the caller's device and stream
// (GLOBAL_ROWS with num_splits > 1: the split kernel, then the combine kernel, on that
// stream). The tile plan (CSR), q_rows and k_rows are validated by the caller.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "common/api_checks.h"
#include "longformer_fwd.h"

namespace {

template <typename T>
cudaError_t longformer_dispatch_head_dim(const fk_longformer_fwd_params &p, cudaStream_t s) {
  if (p.base.shape.head_dim <= 64) return fk::run_longformer_fwd_sm80<64, T>(p, s);
  return fk::run_longformer_fwd_sm80<128, T>(p, s);
}

} // namespace

extern "C" int32_t fk_longformer_fwd(const fk_longformer_fwd_params *p, void *stream) {
  if (p == nullptr) return cudaErrorInvalidValue;
  const fk_longformer_common &c = p->c;
  const fk_attention_shape &sh = p->base.shape;
  // Outer rows: contiguous query tiles (LOCAL) or the gathered q_rows (GLOBAL_ROWS). k_rows:
  // LOCAL's packed global keys (optional); GLOBAL_ROWS does not read it. Splits over keys:
  // GLOBAL_ROWS only, with both workspaces.
  if (!fk::check::all_set(p->base.q, p->base.k, p->base.v, p->o, p->lse) ||
      !fk::check::check_longformer_shape(sh) || !fk::check::check_longformer_schedule(c) ||
      (c.pass != FK_LONGFORMER_LOCAL && c.pass != FK_LONGFORMER_GLOBAL_ROWS) ||
      !fk::check::check_longformer_rows(c) ||
      !fk::check::check_splits(p->num_splits, sh, c, FK_LONGFORMER_GLOBAL_ROWS,
                               p->partial_o != nullptr && p->partial_lse != nullptr,
                               c.q_rows_per_seq, FK_LONGFORMER_BLOCK_M))
    return cudaErrorInvalidValue;
  if (sh.seqlen_q == 0) return cudaSuccess;
  fk::DeviceGuard guard(sh.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return sh.dtype == FK_DTYPE_F16 ? longformer_dispatch_head_dim<__half>(*p, s)
                                  : longformer_dispatch_head_dim<__nv_bfloat16>(*p, s);
}
