// Internal interface of Linformer's sequence projection: what linformer_api.cu dispatches
// to, instantiated per dtype and direction in its own translation unit (nvcc in parallel).
#pragma once

#include <cuda_runtime.h>

#include "../include/fk_linformer.h"

namespace fk {
namespace linformer {

// kp, vp (params checked by the C entry).
template <typename T> cudaError_t proj_fwd(const fk_linformer_proj_params &p, cudaStream_t stream);
// dk, dv, de [, df] (params checked by the C entry).
template <typename T>
cudaError_t proj_bwd(const fk_linformer_proj_bwd_params &p, cudaStream_t stream);

// The forward's split-K partials: f32 (batch, heads_kv, splits, k_proj, head_dim), one such
// part for kp and one for vp, each 256-byte aligned; nothing when splits == 1.
struct ProjFwdWorkspace {
  int64_t kp = 0, vp = 0, bytes = 0;
  explicit ProjFwdWorkspace(const fk_linformer_proj_params &p) {
    if (p.splits <= 1) return;
    const int64_t n = int64_t(p.batch) * p.heads_kv * p.splits * p.k_proj * p.head_dim * 4;
    kp = 0;
    vp = (n + 255) / 256 * 256;
    bytes = 2 * vp;
  }
};

// The split of the forward's reduction over N: whole 64-position blocks per split.
inline int proj_k_split(int seqlen, int splits) {
  const int blocks = (seqlen + 63) / 64;
  return (blocks + splits - 1) / splits * 64;
}
// The splits that hold positions (<= splits): 5 blocks in 4 splits of 2 use 3.
inline int proj_used_splits(int seqlen, int splits) {
  return (seqlen + proj_k_split(seqlen, splits) - 1) / proj_k_split(seqlen, splits);
}

} // namespace linformer
} // namespace fk
