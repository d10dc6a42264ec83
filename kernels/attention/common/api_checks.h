// Argument checks of the attention C entry points, one function per concern, shared by the
// dense forward and backward (dense_fwd_api.cu, dense_bwd_api.cu) and the Longformer forward
// and backward (longformer_fwd_api.cu, longformer_bwd_api.cu), so that every entry accepts
// and refuses alike. Host code. Each returns whether its arguments are valid (the entries
// return cudaErrorInvalidValue otherwise); check_window also normalises the window.
#pragma once

#include <stdint.h>

#include "../../include/fk_longformer.h"

namespace fk {
namespace check {

// No pointer is NULL.
inline bool all_set() { return true; }
template <class... Rest> bool all_set(const void *ptr, Rest... rest) {
  return ptr != nullptr && all_set(rest...);
}

inline bool dtype_ok(int32_t dtype) { return dtype == FK_DTYPE_F16 || dtype == FK_DTYPE_BF16; }

// Head dims the kernels take: multiples of 8 up to the largest compiled one (padded up to
// the next compiled size; the padding is zero-filled on load and never stored).
constexpr int32_t kDenseMaxHeadDim = 256;
constexpr int32_t kLongformerMaxHeadDim = 128;
inline bool head_dim_ok(int32_t head_dim, int32_t max_head_dim) {
  return head_dim > 0 && head_dim % 8 == 0 && head_dim <= max_head_dim;
}

// Dense window sides: >= 0, or -1 for unbounded. A side at least as long as every sequence
// masks nothing and is made unbounded, which keeps the kernels' 32-bit index arithmetic
// far from overflow (j >= i + diag - wl holds for all i < nq, j >= 0 once wl >= nk;
// j <= i + diag + wr holds for all i >= 0, j < nk once wr >= nq).
inline bool check_window(int32_t &window_left, int32_t &window_right, int32_t seqlen_q,
                         int32_t seqlen_k) {
  if (window_left < -1 || window_right < -1) return false;
  if (window_left >= seqlen_k) window_left = -1;
  if (window_right >= seqlen_q) window_right = -1;
  return true;
}

// The shape every attention entry reads (fk_attention_shape): sizes, GQA grouping, head dim
// (up to the op's max_head_dim), dtype.
inline bool check_shape(const fk_attention_shape &s, int32_t max_head_dim) {
  return s.batch > 0 && s.heads > 0 && s.heads_kv > 0 && s.heads % s.heads_kv == 0 &&
         s.seqlen_q >= 0 && s.seqlen_k >= 0 && head_dim_ok(s.head_dim, max_head_dim) &&
         dtype_ok(s.dtype);
}

// Dense: the shape, and the sequence layout (forward and backward params alike).
template <class Params> bool check_dense_shape(const Params &p) {
  return check_shape(p.base.shape, kDenseMaxHeadDim) &&
         (p.cu_seqlens_q == nullptr) == (p.cu_seqlens_k == nullptr);
}

// Longformer: the shape, with no GQA and one length N < 2^30 for queries and keys.
inline bool check_longformer_shape(const fk_attention_shape &s) {
  return check_shape(s, kLongformerMaxHeadDim) && s.heads_kv == s.heads &&
         s.seqlen_k == s.seqlen_q && s.seqlen_q < (1 << 30);
}

// What THE RULE and the host's work list need, in every pass.
inline bool check_longformer_schedule(const fk_longformer_common &c) {
  return all_set(c.dilation, c.head_class, c.tile_offsets, c.tile_ids) && c.window >= 0 &&
         c.num_classes > 0;
}

// The pass's gathered row lists: q_rows is given exactly for GLOBAL_ROWS; k_rows is
// required for GLOBAL_COLS and optional for LOCAL (packed global keys); a given list has at
// least one entry per sequence. (Their contents are the caller's to validate.)
inline bool check_longformer_rows(const fk_longformer_common &c) {
  const bool q_list = c.pass == FK_LONGFORMER_GLOBAL_ROWS;
  if ((c.q_rows != nullptr) != q_list || (q_list && c.q_rows_per_seq < 1)) return false;
  if (c.pass == FK_LONGFORMER_GLOBAL_COLS && c.k_rows == nullptr) return false;
  const bool k_list = c.pass == FK_LONGFORMER_GLOBAL_COLS || c.pass == FK_LONGFORMER_LOCAL;
  return !(k_list && c.k_rows != nullptr && c.k_rows_per_seq < 1);
}

// Splits (num_splits >= 1; > 1 only for `split_pass`, with its workspace): the split grid's
// x (outer tiles of `block` gathered rows, times splits) and the grid of the combine /
// reduce kernel that follows (4 warps per block, one per listed row) must fit.
inline bool check_splits(int32_t num_splits, const fk_attention_shape &s,
                         const fk_longformer_common &c, int32_t split_pass, bool workspace,
                         int32_t per_seq, int32_t block) {
  if (num_splits < 1) return false;
  if (num_splits == 1) return true;
  if (c.pass != split_pass || !workspace) return false;
  const int64_t outer = (int64_t(per_seq) + block - 1) / block;
  return outer * num_splits <= INT32_MAX && int64_t(s.batch) * s.heads * per_seq / 4 < INT32_MAX;
}

} // namespace check
} // namespace fk
