// Internal interface of the fused feed-forward block: the launcher ffn_api.cu dispatches
// to, instantiated per dtype in its own translation unit so nvcc compiles them in
// parallel.
#pragma once

#include <cuda_runtime.h>

#include "../include/fk_ffn.h"

namespace fk {
namespace ffn {

// Both GEMMs of the forward (params checked by the C entry, tokens > 0).
template <typename T> cudaError_t ffn_fwd(const fk_ffn_params &p, cudaStream_t stream);
// The same on Hopper's TMA + wgmma path (ffn_sm90.cuh), for a device that use_sm90_kernels()
// and params that ffn_sm90_eligible().
template <typename T> cudaError_t ffn_fwd_sm90(const fk_ffn_params &p, cudaStream_t stream);
bool ffn_sm90_eligible(const fk_ffn_params &p);
// The backward on Hopper's path (ffn_bwd_sm90.cuh), likewise.
template <typename T> cudaError_t ffn_bwd_sm90(const fk_ffn_bwd_params &p, cudaStream_t stream);
bool ffn_bwd_sm90_eligible(const fk_ffn_bwd_params &p);
// The backward's GEMMs and column sums (params checked by the C entry).
template <typename T> cudaError_t ffn_bwd(const fk_ffn_bwd_params &p, cudaStream_t stream);

// The backward's workspace, each part 256-byte aligned: u and g (gated only) in f32,
// h and [du | dg] in the storage dtype, all (tokens, d_hidden) row-major (dU: 2 d_hidden
// wide when gated).
struct FfnBwdWorkspace {
  int64_t u = 0, g = 0, h = 0, d_u = 0, bytes = 0;
  explicit FfnBwdWorkspace(const fk_ffn_bwd_params &p) {
    const int64_t n = int64_t(p.tokens) * p.d_hidden;
    const bool gated = p.w3 != nullptr;
    u = take(n * 4);
    g = gated ? take(n * 4) : 0;
    h = take(n * 2);
    d_u = take(n * 2 * (gated ? 2 : 1));
  }

private:
  int64_t take(int64_t b) {
    const int64_t at = bytes;
    bytes += (b + 255) / 256 * 256;
    return at;
  }
};

// The workspace's buffers for storage type T: u [and g] in f32, h and d_u in T ((tokens, K):
// du, then dg when gated).
template <typename T> struct FfnBwdBuffers {
  float *u, *g;
  T *h, *d_u;
  explicit FfnBwdBuffers(const fk_ffn_bwd_params &p) {
    const FfnBwdWorkspace ws(p);
    auto *base = static_cast<unsigned char *>(p.workspace);
    u = reinterpret_cast<float *>(base + ws.u);
    g = p.w3 != nullptr ? reinterpret_cast<float *>(base + ws.g) : nullptr;
    h = reinterpret_cast<T *>(base + ws.h);
    d_u = reinterpret_cast<T *>(base + ws.d_u);
  }
};

} // namespace ffn
} // namespace fk
