// C entry point of the Longformer local-attention forward: checks what would be undefined
// behaviour on the device, then dispatches on (dtype, head dim) and launches on the
// caller's device and stream. The tile plan (CSR) is validated by the caller.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "longformer_fwd.h"

namespace {

template <typename T>
cudaError_t longformer_dispatch_head_dim(const fk_longformer_fwd_params &p, cudaStream_t s) {
  if (p.head_dim <= 64) return fk::run_longformer_fwd_sm80<64, T>(p, s);
  return fk::run_longformer_fwd_sm80<128, T>(p, s);
}

} // namespace

extern "C" int32_t fk_longformer_fwd(const fk_longformer_fwd_params *p, void *stream) {
  if (p == nullptr || p->q == nullptr || p->k == nullptr || p->v == nullptr || p->o == nullptr ||
      p->lse == nullptr || p->dilation == nullptr || p->head_class == nullptr ||
      p->tile_offsets == nullptr || p->tile_ids == nullptr || p->batch <= 0 || p->heads <= 0 ||
      p->seqlen < 0 || p->window < 0 || p->num_classes <= 0 || p->head_dim <= 0 ||
      p->head_dim % 8 != 0 || p->head_dim > 128)
    return cudaErrorInvalidValue;
  if (p->seqlen == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
  case FK_DTYPE_F16: return longformer_dispatch_head_dim<__half>(*p, s);
  case FK_DTYPE_BF16: return longformer_dispatch_head_dim<__nv_bfloat16>(*p, s);
  default: return cudaErrorInvalidValue;
  }
}
