// C entry point of dense attention forward: checks what would be undefined behaviour on
// the device (common/api_checks.h, as the backward does), then turns run-time (dtype, head
// dim, masking) into the compile-time instantiation and launches it on the caller's device
// and stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "common/api_checks.h"
#include "common/tma_maps.cuh"
#include "dense_fwd.h"

namespace {

template <int D, typename T>
cudaError_t dispatch_mask(const fk_attention_fwd_params &p, cudaStream_t s) {
  const bool has_mask = p.window_left >= 0 || p.window_right >= 0;
  return has_mask ? fk::run_dense_fwd_sm80<D, T, true>(p, s)
                  : fk::run_dense_fwd_sm80<D, T, false>(p, s);
}

template <int D, typename T>
cudaError_t dispatch_mask_sm90(const fk_attention_fwd_params &p, cudaStream_t s) {
  const bool has_mask = p.window_left >= 0 || p.window_right >= 0;
  return has_mask ? fk::run_dense_fwd_sm90<D, T, true>(p, s)
                  : fk::run_dense_fwd_sm90<D, T, false>(p, s);
}

// Head dims are padded up to the next compiled size (64, 128, 256). Hopper takes the TMA +
// wgmma kernels where they apply (dense batch, TMA-describable operands).
template <typename T>
cudaError_t dispatch_head_dim(const fk_attention_fwd_params &p, cudaStream_t s) {
  if (fk::use_sm90_kernels(p.base.shape.device) && fk::dense_fwd_sm90_eligible(p)) {
    if (p.base.shape.head_dim <= 64) return dispatch_mask_sm90<64, T>(p, s);
    if (p.base.shape.head_dim <= 128) return dispatch_mask_sm90<128, T>(p, s);
    return dispatch_mask_sm90<256, T>(p, s);
  }
  if (p.base.shape.head_dim <= 64) return dispatch_mask<64, T>(p, s);
  if (p.base.shape.head_dim <= 128) return dispatch_mask<128, T>(p, s);
  return dispatch_mask<256, T>(p, s);
}

} // namespace

namespace fk {
// TMA describes Q, K, V as (head_dim, rows, heads, batch) tensors (16-byte-aligned bases
// and strides; a size-1 dimension's stride is never used), varlen ones as one batch of
// total_q / total_k packed rows; O is stored two elements at a time. No keys at all stay
// on the sm80 kernel (a tensor map has no zero-sized dimension).
bool dense_fwd_sm90_eligible(const fk_attention_fwd_params &p) {
  const fk_attention_shape &s = p.base.shape;
  const MapExtent e(p);
  const fk_strides &o = p.base.o_stride;
  return attention_map_ok(p.base.q, p.base.q_stride, e.rows_q, s.heads, e.batch) &&
         attention_map_ok(p.base.k, p.base.k_stride, e.rows_k, s.heads_kv, e.batch) &&
         attention_map_ok(p.base.v, p.base.v_stride, e.rows_k, s.heads_kv, e.batch) &&
         reinterpret_cast<uintptr_t>(p.o) % 4 == 0 && o.row % 2 == 0 && o.head % 2 == 0 &&
         (e.batch == 1 || o.batch % 2 == 0);
}
} // namespace fk

extern "C" int32_t fk_attention_supports_head_dim(int32_t head_dim) {
  return fk::check::head_dim_ok(head_dim, fk::check::kDenseMaxHeadDim);
}

extern "C" int32_t fk_attention_fwd(const fk_attention_fwd_params *params, void *stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  fk_attention_fwd_params p = *params;
  if (!fk::check::all_set(p.base.q, p.base.k, p.base.v, p.o, p.lse) ||
      !fk::check::check_dense_shape(p) ||
      !fk::check::check_window(p.window_left, p.window_right, p.base.shape.seqlen_q,
                               p.base.shape.seqlen_k))
    return cudaErrorInvalidValue;
  if (p.base.shape.seqlen_q == 0) return cudaSuccess; // varlen batch of empty query sequences
  fk::DeviceGuard guard(p.base.shape.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p.base.shape.dtype == FK_DTYPE_F16 ? dispatch_head_dim<__half>(p, s)
                                            : dispatch_head_dim<__nv_bfloat16>(p, s);
}

extern "C" const char *fk_error_string(int32_t code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
