// Internal interface of Reformer's LSH attention forward and backward: what
// reformer_api.cu dispatches to, instantiated per dtype in its own translation unit (nvcc
// in parallel).
#pragma once

#include <cuda_runtime.h>

#include "../include/fk_reformer.h"

namespace fk {
namespace reformer {

// Hashes (unless given), sorts, attends, combines (params checked by the C entry).
template <typename T> cudaError_t fwd(const fk_reformer_fwd_params &p, cudaStream_t stream);

inline bool hashed(const fk_reformer_fwd_params &p) { return p.seqlen > p.chunk_length; }
// Rounds of the LSE: n_hashes when hashed, 1 for the full-attention fallback.
inline int rounds(const fk_reformer_fwd_params &p) { return hashed(p) ? p.n_hashes : 1; }

// The sort (reformer_sort.cuh) cuts every round into segments of kSortSegment tokens (the
// last may be shorter) and counts each segment's buckets: nb + 1 counters per segment (the
// padding bucket's included whether or not the flag is set), per (b, h, round). (Host and
// device: the workspace's size, and the sort's kernels.)
constexpr int kSortSegment = 1024;
__host__ __device__ inline int sort_segments(int n) {
  return (n + kSortSegment - 1) / kSortSegment;
}
__host__ __device__ inline int64_t sort_counts_per_row(int n, int n_buckets) {
  return int64_t(n_buckets + 1) * sort_segments(n);
}

// The rotations split for the tensor-core hash (hashed here, rows of 16-byte chunks): hi =
// R rounded to the dtype, lo = R - hi rounded, each (H, n_hashes, n_buckets / 2, D) (2-byte
// elements), so that x R = x hi + x lo to about f32 accuracy on 16-bit MMAs.
inline bool rotations_split(const fk_reformer_fwd_params &p) {
  return hashed(p) && p.given_buckets == nullptr && p.head_dim % 8 == 0;
}

// The workspace's parts (byte offsets, each 256-byte aligned), absent ones at -1: the
// padding flag (hashed with key_padding), the sorted order, the sort's sorted segments and
// counts (hashed), the per-round outputs (more than one round), the rotations split.
struct FwdWorkspace {
  int64_t flag = -1, perm = -1, keys = -1, counts = -1, o_rounds = -1, rot_split = -1, bytes = 0;
  explicit FwdWorkspace(const fk_reformer_fwd_params &p) {
    if (!hashed(p)) return;
    const int64_t bhr = int64_t(p.batch) * p.heads * p.n_hashes, rows = bhr * p.seqlen;
    auto take = [&](int64_t n) {
      const int64_t at = bytes;
      bytes += (n + 255) / 256 * 256;
      return at;
    };
    if (p.key_padding != nullptr) flag = take(4);
    perm = take(rows * 4);
    keys = take(rows * 4);
    counts = take(bhr * sort_counts_per_row(p.seqlen, p.n_buckets) * 4);
    if (p.n_hashes > 1) o_rounds = take(rows * p.head_dim * 4);
    if (rotations_split(p))
      rot_split = take(2 * int64_t(p.heads) * p.n_hashes * (p.n_buckets / 2) * p.head_dim * 2);
  }
};

// The backward (params checked by the C entry).
template <typename T> cudaError_t bwd(const fk_reformer_bwd_params &p, cudaStream_t stream);

inline bool hashed(const fk_reformer_bwd_params &p) { return p.seqlen > p.chunk_length; }
inline int rounds(const fk_reformer_bwd_params &p) { return hashed(p) ? p.n_hashes : 1; }

// The backward's workspace (byte offsets, 256-byte aligned, absent parts at -1): the
// padding flag, the sorted order and the sort's sorted segments and counts (hashed), Delta
// per (b, h, token), the rounds' weights w_r = exp(lse_r - logsumexp_r lse_r) per (b, h,
// round, token), and the per-round partials dq, dk, dv per (b, h, round, token, d).
struct BwdWorkspace {
  int64_t flag = -1, perm = -1, keys = -1, counts = -1, delta = -1, wts = -1, dq = -1, dk = -1,
          dv = -1, bytes = 0;
  explicit BwdWorkspace(const fk_reformer_bwd_params &p) {
    auto take = [&](int64_t n) {
      const int64_t at = bytes;
      bytes += (n + 255) / 256 * 256;
      return at;
    };
    const int64_t bhn = int64_t(p.batch) * p.heads * p.seqlen;
    if (hashed(p)) {
      if (p.key_padding != nullptr) flag = take(4);
      perm = take(bhn * p.n_hashes * 4);
      keys = take(bhn * p.n_hashes * 4);
      counts = take(int64_t(p.batch) * p.heads * p.n_hashes *
                    sort_counts_per_row(p.seqlen, p.n_buckets) * 4);
    }
    delta = take(bhn * 4);
    wts = take(bhn * rounds(p) * 4);
    const int64_t part = bhn * rounds(p) * p.head_dim * 4;
    dq = take(part);
    dk = take(part);
    dv = take(part);
  }
};

} // namespace reformer
} // namespace fk
