// Tensor maps of the attention operands for the Hopper kernels (dense_fwd_sm90.cuh,
// dense_bwd_sm90.cuh): Q-like and K-like tensors as (head_dim, rows, heads, batch), a
// varlen batch as one batch of its packed rows.
#pragma once

#include "../../common/tma_host.cuh"
#include "../../include/flashkernels.h"

namespace fk {

// Tensor maps of Q, K, V as (head_dim, rows, heads, batch) tensors; boxes of 64 columns x
// the block's rows. A stride of a size-1 dimension is never used: any valid one will do.
inline cudaError_t attention_map(CUtensorMap *map, const void *base, const fk_strides &st, int rows,
                                 int heads, int batch, int head_dim, int box_rows, bool bf16) {
  const int64_t dims[4] = {head_dim, rows, heads, batch};
  const int64_t strides[3] = {rows > 1 ? st.row : 8, heads > 1 ? st.head : 8,
                              batch > 1 ? st.batch : 8};
  const uint32_t box[4] = {64, uint32_t(box_rows), 1, 1};
  return encode_map_sw128(map, base, 4, dims, strides, box, bf16);
}

// The (rows, batch) a map of a Q-like (rows_q) or K-like tensor spans: the longest
// sequence and the batch, or a varlen batch's packed rows as one batch.
struct MapExtent {
  int rows_q, rows_k, batch;
  template <class Params> explicit MapExtent(const Params &p) {
    const fk_attention_shape &s = p.base.shape;
    const bool varlen = p.cu_seqlens_q != nullptr;
    rows_q = varlen ? p.total_q : s.seqlen_q;
    rows_k = varlen ? p.total_k : s.seqlen_k;
    batch = varlen ? 1 : s.batch;
  }
};

// Whether TMA can describe a Q-like or K-like operand of this extent.
inline bool attention_map_ok(const void *base, const fk_strides &st, int rows, int heads,
                             int batch) {
  const int64_t strides[3] = {rows > 1 ? st.row : 8, heads > 1 ? st.head : 8,
                              batch > 1 ? st.batch : 8};
  return rows >= 1 && tma_strides_ok(base, 4, strides);
}

} // namespace fk
