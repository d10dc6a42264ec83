// C entries of Linformer's sequence projection (forward, backward): refuse what would be
// undefined on the device (fk_linformer.h lists it), then dispatch the dtype and launch on
// the caller's device and stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "linformer.h"

namespace {

constexpr int64_t kMaxIndex = (int64_t(1) << 31) - 256; // tile row / column indices
constexpr int64_t kMaxGrid = 65535;                      // grid y, z

bool heads_ok(int32_t heads, int32_t heads_kv) { return heads == 1 || heads == heads_kv; }

// What forward and backward share: sizes, heads, dtype, the inputs k, v, e, f.
template <class P> bool common_ok(const P &p) {
  if (p.k == nullptr || p.v == nullptr || p.e == nullptr || p.f == nullptr) return false;
  if (p.batch < 1 || p.heads_kv < 1 || p.seqlen < 1 || p.k_proj < 1) return false;
  if (p.seqlen > p.n_max || p.n_max > kMaxIndex || p.k_proj > kMaxIndex) return false;
  if (p.head_dim < 8 || p.head_dim > 256 || p.head_dim % 8 != 0) return false;
  if (!heads_ok(p.e_heads, p.heads_kv) || !heads_ok(p.f_heads, p.heads_kv)) return false;
  return p.dtype == FK_DTYPE_F16 || p.dtype == FK_DTYPE_BF16;
}

bool fwd_args_ok(const fk_linformer_proj_params &p) {
  if (!common_ok(p) || p.kp == nullptr || p.vp == nullptr) return false;
  if (p.splits < 1 || p.splits > (p.seqlen + 63) / 64) return false;
  return int64_t(p.batch) * p.heads_kv * p.splits <= kMaxGrid;
}

bool same(const fk_proj_strides &a, const fk_proj_strides &b) {
  return a.head == b.head && a.row == b.row && a.col == b.col;
}

bool bwd_args_ok(const fk_linformer_proj_bwd_params &p) {
  if (!common_ok(p) || p.dkp == nullptr || p.dvp == nullptr || p.dk == nullptr || p.dv == nullptr ||
      p.de == nullptr)
    return false;
  if (p.shared_kv == 1) {
    if (p.f != p.e || !same(p.f_stride, p.e_stride) || p.f_heads != p.e_heads || p.df != nullptr)
      return false;
  } else if (p.shared_kv != 0 || p.df == nullptr) {
    return false;
  }
  if (int64_t(p.batch) * p.heads_kv > kMaxGrid) return false;
  if ((int64_t(p.n_max) + 63) / 64 > kMaxGrid) return false;
  // dE / dF reduction columns: (shared_kv ? 2 : 1) x batch x heads per E head x head_dim.
  const int64_t heads_per = p.e_heads == 1 ? p.heads_kv : 1;
  const int64_t heads_per_f = p.f_heads == 1 ? p.heads_kv : 1;
  const int64_t per = int64_t(p.batch) * p.head_dim;
  return (p.shared_kv ? 2 : 1) * per * heads_per <= kMaxIndex && per * heads_per_f <= kMaxIndex;
}

} // namespace

extern "C" int64_t fk_linformer_proj_workspace_bytes(const fk_linformer_proj_params *p) {
  return p != nullptr && fwd_args_ok(*p) ? fk::linformer::ProjFwdWorkspace(*p).bytes : 0;
}

extern "C" int32_t fk_linformer_proj_fwd(const fk_linformer_proj_params *p, void *stream) {
  if (p == nullptr || !fwd_args_ok(*p)) return cudaErrorInvalidValue;
  if (fk::linformer::ProjFwdWorkspace(*p).bytes > 0 &&
      (p->workspace == nullptr || reinterpret_cast<uintptr_t>(p->workspace) % 256 != 0))
    return cudaErrorInvalidValue;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->dtype == FK_DTYPE_F16 ? fk::linformer::proj_fwd<__half>(*p, s)
                                  : fk::linformer::proj_fwd<__nv_bfloat16>(*p, s);
}

extern "C" int64_t fk_linformer_proj_bwd_workspace_bytes(const fk_linformer_proj_bwd_params *) {
  return 0;
}

extern "C" int32_t fk_linformer_proj_bwd(const fk_linformer_proj_bwd_params *p, void *stream) {
  if (p == nullptr || !bwd_args_ok(*p)) return cudaErrorInvalidValue;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->dtype == FK_DTYPE_F16 ? fk::linformer::proj_bwd<__half>(*p, s)
                                  : fk::linformer::proj_bwd<__nv_bfloat16>(*p, s);
}
