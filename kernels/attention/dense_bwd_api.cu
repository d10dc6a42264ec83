// C entry point of dense attention backward: checks what would otherwise be undefined
// behaviour on the device, then turns run-time (dtype, head dim, masking) into the
// compile-time instantiation and launches it on the caller's device and stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "dense_bwd.h"

namespace {

template <int D, typename T>
cudaError_t dispatch_mask(const fk_attention_bwd_params &p, cudaStream_t s) {
  const bool has_mask = p.window_left >= 0 || p.window_right >= 0;
  return has_mask ? fk::run_dense_bwd_sm80<D, T, true>(p, s)
                  : fk::run_dense_bwd_sm80<D, T, false>(p, s);
}

// Head dims are padded up to the next compiled one; the kernels zero-fill the padded
// columns on load and skip them on store.
template <typename T>
cudaError_t dispatch_head_dim(const fk_attention_bwd_params &p, cudaStream_t s) {
  if (p.head_dim <= 64) return dispatch_mask<64, T>(p, s);
  if (p.head_dim <= 128) return dispatch_mask<128, T>(p, s);
  return dispatch_mask<256, T>(p, s);
}

} // namespace

extern "C" int32_t fk_attention_bwd(const fk_attention_bwd_params *params, void *stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  fk_attention_bwd_params p = *params;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.o == nullptr ||
      p.dout == nullptr || p.lse == nullptr || p.dq == nullptr || p.dk == nullptr ||
      p.dv == nullptr || p.delta == nullptr)
    return cudaErrorInvalidValue;
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.heads <= 0 || p.heads_kv <= 0 || p.heads % p.heads_kv != 0 ||
      p.seqlen_q < 0 || p.seqlen_k < 0 || p.head_dim <= 0 || p.head_dim % 8 != 0 ||
      p.head_dim > 256 || p.window_left < -1 || p.window_right < -1)
    return cudaErrorInvalidValue;
  if (p.dtype != FK_DTYPE_F16 && p.dtype != FK_DTYPE_BF16) return cudaErrorInvalidValue;
  // A window side at least as long as every sequence masks nothing: make it unbounded,
  // which keeps the kernels' index arithmetic far from int32 overflow.
  // (j >= i + diag - wl holds for all i < nq, j >= 0 once wl >= nk; j <= i + diag + wr
  // holds for all i >= 0, j < nk once wr >= nq.)
  if (p.window_left >= p.seqlen_k) p.window_left = -1;
  if (p.window_right >= p.seqlen_q) p.window_right = -1;

  fk::DeviceGuard guard(p.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
  case FK_DTYPE_F16: return dispatch_head_dim<__half>(p, s);
  case FK_DTYPE_BF16: return dispatch_head_dim<__nv_bfloat16>(p, s);
  default: return cudaErrorInvalidValue;
  }
}
