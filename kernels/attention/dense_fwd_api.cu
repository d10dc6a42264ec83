// C entry point of dense attention forward: checks what would be undefined behaviour on
// the device, then turns run-time (dtype, head dim, masking) into the compile-time
// instantiation and launches it on the caller's device and stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "dense_fwd.h"

namespace {

template <int D, typename T>
cudaError_t dispatch_mask(const fk_attention_fwd_params &p, cudaStream_t s) {
  const bool has_mask = p.window_left >= 0 || p.window_right >= 0;
  return has_mask ? fk::run_dense_fwd_sm80<D, T, true>(p, s)
                  : fk::run_dense_fwd_sm80<D, T, false>(p, s);
}

// Head dims are padded up to the next compiled size (64, 128, 256).
template <typename T>
cudaError_t dispatch_head_dim(const fk_attention_fwd_params &p, cudaStream_t s) {
  if (p.head_dim <= 64) return dispatch_mask<64, T>(p, s);
  if (p.head_dim <= 128) return dispatch_mask<128, T>(p, s);
  return dispatch_mask<256, T>(p, s);
}

} // namespace

extern "C" int32_t fk_attention_supports_head_dim(int32_t head_dim) {
  return head_dim > 0 && head_dim % 8 == 0 && head_dim <= 256;
}

extern "C" int32_t fk_attention_fwd(const fk_attention_fwd_params *p, void *stream) {
  if (p == nullptr || p->q == nullptr || p->k == nullptr || p->v == nullptr || p->o == nullptr ||
      p->lse == nullptr || p->batch <= 0 || p->heads <= 0 || p->heads_kv <= 0 ||
      p->heads % p->heads_kv != 0 || p->seqlen_q < 0 || p->seqlen_k < 0 ||
      !fk_attention_supports_head_dim(p->head_dim) ||
      (p->cu_seqlens_q == nullptr) != (p->cu_seqlens_k == nullptr))
    return cudaErrorInvalidValue;
  if (p->seqlen_q == 0) return cudaSuccess; // varlen batch of empty query sequences
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
  case FK_DTYPE_F16: return dispatch_head_dim<__half>(*p, s);
  case FK_DTYPE_BF16: return dispatch_head_dim<__nv_bfloat16>(*p, s);
  default: return cudaErrorInvalidValue;
  }
}

extern "C" const char *fk_error_string(int32_t code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
