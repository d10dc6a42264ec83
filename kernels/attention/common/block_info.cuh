// Where a thread block's rows live: the sequence and row bookkeeping of the attention
// kernels.
// - SeqInfo: one sequence of a dense or variable-length (cu_seqlens) batch, its lengths and
//   where its rows start in Q-like and K-like tensors and in LSE. Used by the dense
//   forward and backward.
// - TileCoords, QueryTile: a persistent grid's tile order and query tiles (the Hopper
//   kernels).
// - fresh_thread_idx, fresh_block_idx_z: an index read again for an epilogue.
// - LongformerRows, gathered_token: the rows of one side of a Longformer pass, contiguous
//   tokens or a gathered list (q_rows / k_rows); LongformerWork: the slice of its CSR row
//   of the host's work list a block visits (its split of it when num_splits > 1). Used by
//   the Longformer forward and backward.
#pragma once

#include <stdint.h>

#include "../../include/fk_longformer.h"
#include "mask.cuh"

namespace fk {
namespace attn {

// threadIdx.x / blockIdx.z read anew, for an epilogue. The compiler treats every read of a
// special register as the same value, so an index the kernel read at its start is kept in
// a register through the whole main loop only for the epilogue's addresses; at 255
// registers that one is what spills (stored before the loop, reloaded after it). An
// opaque read makes the epilogue fetch it again instead. The CPU emulator (host C++, no
// __CUDA_ARCH__) reads the variable.
__device__ __forceinline__ int fresh_thread_idx() {
#ifdef __CUDA_ARCH__
  unsigned v;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v));
  return int(v);
#else
  return int(threadIdx.x);
#endif
}
__device__ __forceinline__ int fresh_block_idx_z() {
#ifdef __CUDA_ARCH__
  unsigned v;
  asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(v));
  return int(v);
#else
  return int(blockIdx.z);
#endif
}

// Rows of one sequence (batch entry). Dense: the batch strides locate it; varlen: the
// packed row offsets do (and the batch strides are ignored). Params: the forward's or the
// backward's (same field names).
struct SeqInfo {
  int nq, nk;  // lengths
  int q_start; // first packed row of Q / O / dO / dQ (0 for dense)
  int k_start; // first packed row of K / V / dK / dV (0 for dense)
  bool varlen;
  int batch;

  template <class Params> __device__ __forceinline__ SeqInfo(const Params &p, int b) : batch(b) {
    varlen = p.cu_seqlens_q != nullptr;
    if (varlen) {
      q_start = p.cu_seqlens_q[b];
      nq = p.cu_seqlens_q[b + 1] - q_start;
      k_start = p.cu_seqlens_k[b];
      nk = p.cu_seqlens_k[b + 1] - k_start;
    } else {
      q_start = 0;
      k_start = 0;
      nq = p.base.shape.seqlen_q;
      nk = p.base.shape.seqlen_k;
    }
  }
  // Element offset of row 0 of this sequence, head `head`, of a Q-like tensor.
  __device__ __forceinline__ int64_t q_offset(int64_t batch_stride, int64_t row_stride,
                                              int64_t head_stride, int head) const {
    return (varlen ? int64_t(q_start) * row_stride : int64_t(batch) * batch_stride) +
           int64_t(head) * head_stride;
  }
  __device__ __forceinline__ int64_t k_offset(int64_t batch_stride, int64_t row_stride,
                                              int64_t head_stride, int head) const {
    return (varlen ? int64_t(k_start) * row_stride : int64_t(batch) * batch_stride) +
           int64_t(head) * head_stride;
  }
  // Index of row 0 of this sequence, head `head`, in LSE / Delta.
  template <class Params>
  __device__ __forceinline__ int64_t lse_offset(const Params &p, int head) const {
    return (varlen ? int64_t(q_start) : int64_t(batch) * p.base.lse_stride.batch) +
           int64_t(head) * p.base.lse_stride.head;
  }
};

// Tile i of a persistent grid over (row block, head, batch), the heads and batches of a
// row block adjacent: row block i / (heads batch) counted from the last (`from_last`: query
// blocks, the heaviest first under causal masking) or from the first (key blocks, likewise),
// head i % heads, batch i / heads % batch. Used by the Hopper attention kernels.
struct TileCoords {
  int block, head, batch;
  __device__ __forceinline__ TileCoords(int i, int blocks, int heads, int batches, bool from_last) {
    const int hb = heads * batches;
    block = from_last ? blocks - 1 - i / hb : i / hb;
    head = i % heads;
    batch = i % hb / heads;
  }
};

// A query tile of the Hopper forward's and dQ's persistent grids: BM query rows of one
// (head, sequence) and the blocks of BN keys they see. Tile i of m_blocks query blocks x
// heads x batch (TileCoords: the last query blocks first). A varlen sequence shorter than
// the longest has tiles past its end (empty()), which producer and consumers both skip.
struct QueryTile {
  SeqInfo seq; // lengths and packed row offsets of the tile's sequence
  int m0, head, n_begin, n_end, diag;
  int map_batch; // the tensor maps' batch coordinate: the batch, or 0 (varlen: packed rows)
  __device__ bool empty() const { return m0 >= seq.nq; }
  __device__ bool any_keys() const { return !empty() && n_begin < n_end; }

  template <bool kHasMask, int BM, int BN, class Params>
  static __device__ __forceinline__ QueryTile at(const Params &p, int i, int m_blocks) {
    const TileCoords c(i, m_blocks, p.base.shape.heads, p.base.shape.batch, true);
    QueryTile t{SeqInfo(p, c.batch), c.block * BM, c.head, 0, 0, 0, 0};
    t.diag = t.seq.nk - t.seq.nq;
    t.map_batch = t.seq.varlen ? 0 : t.seq.batch;
    key_blocks<kHasMask>(t.m0, BM, BN, t.seq.nq, t.seq.nk, t.diag, p.window_left, p.window_right,
                         t.n_begin, t.n_end);
    return t;
  }
};

// Token of entry x of sequence b's gathered list (B, per_seq): -1 past per_seq, for a -1
// entry, or outside [0, n).
__device__ __forceinline__ int gathered_token(const int32_t *list, int per_seq, int b, int64_t x,
                                              int n) {
  if (x >= per_seq) return -1;
  const int tok = list[int64_t(b) * per_seq + x];
  return tok >= 0 && tok < n ? tok : -1;
}

// The rows of one side of a Longformer pass for one sequence: contiguous tokens 0..N-1
// (list == nullptr) or a gathered list of `count` entries. token(idx) is the token of
// entry idx, or -1 (past the end, a -1 entry, or out of [0, N)).
struct LongformerRows {
  const int32_t *list;
  int count, n;
  __device__ __forceinline__ LongformerRows(const int32_t *rows, int per_seq, int b, int n_)
      : list(rows ? rows + int64_t(b) * per_seq : nullptr), count(rows ? per_seq : n_), n(n_) {}
  __device__ __forceinline__ int token(int idx) const {
    if (idx >= count) return -1;
    const int t = list ? list[idx] : idx;
    return t >= 0 && t < n ? t : -1;
  }
};

// The inner tiles a Longformer block visits. Grid x is outer tiles x splits, a tile's
// splits adjacent (num_splits > 1: the entry points allow it where the pass has few outer
// rows and long inner lists); split s of S visits entries [len s / S, len (s + 1) / S) of
// its CSR row (b, class of h, outer tile), S = 1 all of it.
struct LongformerWork {
  int outer; // this block's outer tile
  int split;
  __device__ __forceinline__ explicit LongformerWork(int num_splits)
      : outer(blockIdx.x / max(num_splits, 1)), split(blockIdx.x % max(num_splits, 1)) {}
  // This block's entries [begin, end) of c.tile_ids (num_splits: the parameter, as above).
  __device__ __forceinline__ void entries(const fk_longformer_common &c, int num_splits, int b,
                                          int h, int &begin, int &end) const {
    const int splits = max(num_splits, 1);
    const int outer_tiles = gridDim.x / splits;
    const int64_t csr_row = (int64_t(b) * c.num_classes + c.head_class[h]) * outer_tiles + outer;
    const int row_begin = c.tile_offsets[csr_row];
    const int64_t row_len = c.tile_offsets[csr_row + 1] - row_begin;
    begin = row_begin + int(row_len * split / splits);
    end = row_begin + int(row_len * (split + 1) / splits);
  }
};

} // namespace attn
} // namespace fk
