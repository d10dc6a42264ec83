// C entry point of dense attention backward: checks what would otherwise be undefined
// behaviour on the device (common/api_checks.h, as the forward does), then turns run-time
// (dtype, head dim, masking) into the compile-time instantiation and launches it on the
// caller's device and stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "common/api_checks.h"
#include "common/tma_maps.cuh"
#include "dense_bwd.h"

namespace {

template <int D, typename T>
cudaError_t dispatch_mask(const fk_attention_bwd_params &p, cudaStream_t s) {
  const bool has_mask = p.window_left >= 0 || p.window_right >= 0;
  return has_mask ? fk::run_dense_bwd_sm80<D, T, true>(p, s)
                  : fk::run_dense_bwd_sm80<D, T, false>(p, s);
}

template <int D, typename T>
cudaError_t dispatch_mask_sm90(const fk_attention_bwd_params &p, cudaStream_t s) {
  const bool has_mask = p.window_left >= 0 || p.window_right >= 0;
  return has_mask ? fk::run_dense_bwd_sm90<D, T, true>(p, s)
                  : fk::run_dense_bwd_sm90<D, T, false>(p, s);
}

// Head dims are padded up to the next compiled one; the kernels zero-fill the padded
// columns on load and skip them on store.
template <typename T>
cudaError_t dispatch_head_dim(const fk_attention_bwd_params &p, cudaStream_t s) {
  if (fk::use_sm90_kernels(p.base.shape.device) && fk::dense_bwd_sm90_eligible(p)) {
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
// TMA describes Q, dO, K, V as in the forward (dense_fwd_sm90_eligible); dQ, dK and dV are
// stored two elements at a time.
bool dense_bwd_sm90_eligible(const fk_attention_bwd_params &p) {
  const fk_attention_shape &s = p.base.shape;
  const MapExtent e(p);
  const auto pairs_ok = [&](const void *base, const fk_strides &st) {
    return reinterpret_cast<uintptr_t>(base) % 4 == 0 && st.row % 2 == 0 && st.head % 2 == 0 &&
           (e.batch == 1 || st.batch % 2 == 0);
  };
  return attention_map_ok(p.base.q, p.base.q_stride, e.rows_q, s.heads, e.batch) &&
         attention_map_ok(p.dout, p.do_stride, e.rows_q, s.heads, e.batch) &&
         attention_map_ok(p.base.k, p.base.k_stride, e.rows_k, s.heads_kv, e.batch) &&
         attention_map_ok(p.base.v, p.base.v_stride, e.rows_k, s.heads_kv, e.batch) &&
         pairs_ok(p.dq, p.dq_stride) && pairs_ok(p.dk, p.dk_stride) && pairs_ok(p.dv, p.dv_stride);
}
} // namespace fk

extern "C" int32_t fk_attention_bwd(const fk_attention_bwd_params *params, void *stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  fk_attention_bwd_params p = *params;
  if (!fk::check::all_set(p.base.q, p.base.k, p.base.v, p.o, p.dout, p.lse, p.dq, p.dk, p.dv,
                          p.delta) ||
      !fk::check::check_dense_shape(p) ||
      !fk::check::check_window(p.window_left, p.window_right, p.base.shape.seqlen_q,
                               p.base.shape.seqlen_k))
    return cudaErrorInvalidValue;

  fk::DeviceGuard guard(p.base.shape.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p.base.shape.dtype == FK_DTYPE_F16 ? dispatch_head_dim<__half>(p, s)
                                            : dispatch_head_dim<__nv_bfloat16>(p, s);
}
