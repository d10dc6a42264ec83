// C entry point of dense attention forward: turns run-time (head dim, dtype, causal)
// into the compile-time instantiation and launches it on the caller's device and stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dense_fwd.h"

namespace {

template <int D, typename T>
cudaError_t dispatch_causal(const fk_attention_fwd_params &p, cudaStream_t s) {
  return p.causal ? fk::run_dense_fwd_sm80<D, T, true>(p, s)
                  : fk::run_dense_fwd_sm80<D, T, false>(p, s);
}

template <typename T> cudaError_t dispatch_head_dim(const fk_attention_fwd_params &p, cudaStream_t s) {
  switch (p.head_dim) {
  case 64: return dispatch_causal<64, T>(p, s);
  case 128: return dispatch_causal<128, T>(p, s);
  default: return cudaErrorInvalidValue;
  }
}

// Launch on params.device, then give the calling thread its previous device back.
class DeviceGuard {
public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

private:
  int previous_ = 0;
  cudaError_t status_;
};

} // namespace

extern "C" int32_t fk_attention_fwd_supports_head_dim(int32_t head_dim) {
  return head_dim == 64 || head_dim == 128;
}

extern "C" int32_t fk_attention_fwd(const fk_attention_fwd_params *p, void *stream) {
  if (p == nullptr || p->q == nullptr || p->k == nullptr || p->v == nullptr || p->o == nullptr ||
      p->lse == nullptr || p->batch <= 0 || p->heads <= 0 || p->seqlen_q <= 0 || p->seqlen_k <= 0)
    return cudaErrorInvalidValue;
  DeviceGuard guard(p->device);
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
