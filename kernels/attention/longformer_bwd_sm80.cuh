// Longformer attention backward for sm_80+ (fk_longformer.h: fk_longformer_bwd_*),
// deterministic, no atomics.
//
// The dense backward's kernels (dense_bwd_sm80.cuh), from the same building blocks of
// common/, with the dense band replaced by the host's work list and THE RULE of
// fk_longformer.h (common/mask.cuh) applied per element, and with rows that may be
// gathered (q_rows / k_rows) instead of contiguous:
// 1. delta: Delta_i = sum_d dO_id O_id for every token (0 for padded tokens, whose dO and
//    O rows are never read).
// 2. dQ (passes LOCAL, GLOBAL_ROWS): one thread block per (64-query tile, head, sequence),
//    4 warps x 16 query rows, walks its CSR list of contiguous 64-key tiles: S = Q K^T,
//    P = exp(S scale - LSE), dP = dO V^T, dS = P (dP - Delta), dQ += dS K.
// 3. dK/dV (passes LOCAL_BAND, GLOBAL_COLS, GLOBAL_ROWS): one thread block per (64-key
//    tile, head, sequence), 4 warps x 16 key rows, on transposed tiles S^T = K Q^T as in
//    the dense kernel, walks its CSR list of 64-query tiles (each as 64 / kBlockM steps of
//    kBlockM queries): dV += P^T dO, dK += dS^T Q. Writes, or with `accumulate` adds in
//    f32 to, dK and dV.
// Packed global keys (dq LOCAL with k_rows): inner ids below nkt = ceil(N / 64) are
// contiguous key tiles with LOCAL_BAND pairs (their global keys skipped), ids nkt + m are
// tile m of the gathered global keys (k_rows), loaded by token, with GLOBAL_COLS pairs;
// the per-stage key flags hold those keys' tokens, so the causal test (token <= i) is read
// per element like the band's flags. Without k_rows every id is a contiguous LOCAL tile.
// Splits (num_splits > 1; dq GLOBAL_ROWS over key tiles, dkdv GLOBAL_COLS over query
// tiles): grid x = outer tiles x splits (a tile's splits adjacent); split s visits its
// slice of the CSR row and writes its unscaled f32 sums of the listed rows to `partial`;
// longformer_bwd_reduce_kernel (launched after it on the same stream) sums the splits in
// increasing s and writes (or adds) the listed rows as the unsplit pass would.
// Every loaded row that takes no part in the pass (padded token, gathered entry -1, token
// past N, a query row the pass does not own) is zero-filled, and its LSE / Delta are
// replaced by +inf (log2 domain) / 0, so P = 0 and dS = 0 exactly there: whatever such
// rows hold in memory (NaN included) never reaches a result.
// Files: the row-wise kernels (delta, reduce) in longformer_bwd_rowwise_sm80.cuh, dQ in
// longformer_bwd_dq_sm80.cuh, dK/dV in longformer_bwd_dkdv_sm80.cuh; the tile configs and
// launchers here.
#pragma once

#include "../common/launch.cuh"
#include "../include/fk_longformer.h"
#include "longformer_bwd_dkdv_sm80.cuh"
#include "longformer_bwd_dq_sm80.cuh"
#include "longformer_bwd_rowwise_sm80.cuh"

namespace fk {

// Tile configuration per padded head dim (tiles are FK_LONGFORMER_BWD_BLOCK = 64 on both
// sides): 4 warps per block; dK/dV takes kKVBlockM queries per step (the dense D = 128
// choice: 32); dQ works through a step's 64 keys in kQKeySplit parts (D = 128: 4 parts of
// 16 keys, 238-250 registers; 2 parts of 32 spilled 4 bytes on sm_80).
template <int kHeadDim> struct LongformerBwdConfigSm80;
template <> struct LongformerBwdConfigSm80<64> {
  static constexpr int kKVBlockM = 64, kKVMinBlocks = 2;
  static constexpr int kQKeySplit = 1, kQMinBlocks = 2;
};
template <> struct LongformerBwdConfigSm80<128> {
  static constexpr int kKVBlockM = 32, kKVMinBlocks = 1;
  static constexpr int kQKeySplit = 4, kQMinBlocks = 1;
};

template <typename Element>
cudaError_t run_longformer_bwd_delta_sm80(const fk_longformer_bwd_params &p, cudaStream_t stream) {
  using namespace longformer_bwd_detail;
  const dim3 grid((p.base.shape.seqlen_q + kDeltaRows - 1) / kDeltaRows, p.base.shape.heads,
                  p.base.shape.batch);
  return launch_kernel(longformer_bwd_delta_kernel<Element>, grid, dim3(kDeltaThreads), 0, stream,
                       p);
}

// Number of outer tiles: contiguous ceil(N / 64) or gathered ceil(per_seq / 64).
inline int longformer_bwd_outer_tiles(int rows) {
  return (rows + FK_LONGFORMER_BWD_BLOCK - 1) / FK_LONGFORMER_BWD_BLOCK;
}

// The reduce of a split pass (num_splits > 1), after it on the same stream: one warp per
// entry of the gathered list of every (b, h).
template <typename Element, bool kKV>
cudaError_t launch_longformer_bwd_reduce(const fk_longformer_bwd_params &p, cudaStream_t stream) {
  using namespace longformer_bwd_detail;
  const int64_t rows = int64_t(p.base.shape.batch) * p.base.shape.heads *
                       (kKV ? p.c.k_rows_per_seq : p.c.q_rows_per_seq);
  const dim3 grid(unsigned((rows + kReduceWarps - 1) / kReduceWarps));
  return launch_kernel(longformer_bwd_reduce_kernel<Element, kKV>, grid, dim3(32 * kReduceWarps), 0,
                       stream, p);
}

template <int kHeadDim, typename Element>
cudaError_t run_longformer_bwd_dq_sm80(const fk_longformer_bwd_params &p, cudaStream_t stream) {
  using namespace longformer_bwd_detail;
  using C = LongformerBwdConfigSm80<kHeadDim>;
  using Tr = LongformerBwdQTraitsSm80<kHeadDim, Element, C::kQKeySplit, C::kQMinBlocks>;
  static_assert(Tr::kSmemBytes <= 99 * 1024, "shared memory must fit sm_86 / sm_89");
  const int tiles = longformer_bwd_outer_tiles(
      p.c.pass == FK_LONGFORMER_GLOBAL_ROWS ? p.c.q_rows_per_seq : p.base.shape.seqlen_q);
  if (tiles == 0) return cudaSuccess;
  // Split over keys: the splits of an outer tile are adjacent in x (entry point: x fits).
  const int num_splits = p.num_splits > 1 ? p.num_splits : 1;
  const cudaError_t err = launch_kernel(
      longformer_bwd_dq_kernel<Tr>,
      dim3(unsigned(tiles) * unsigned(num_splits), p.base.shape.heads, p.base.shape.batch),
      dim3(Tr::kNThreads), Tr::kSmemBytes, stream, p);
  if (err != cudaSuccess || num_splits == 1) return err;
  return launch_longformer_bwd_reduce<Element, false>(p, stream);
}

template <int kHeadDim, typename Element>
cudaError_t run_longformer_bwd_dkdv_sm80(const fk_longformer_bwd_params &p, cudaStream_t stream) {
  using namespace longformer_bwd_detail;
  using C = LongformerBwdConfigSm80<kHeadDim>;
  using Tr = LongformerBwdKVTraitsSm80<kHeadDim, Element, C::kKVBlockM, C::kKVMinBlocks>;
  static_assert(Tr::kSmemBytes <= 99 * 1024, "shared memory must fit sm_86 / sm_89");
  const int tiles = longformer_bwd_outer_tiles(
      p.c.pass == FK_LONGFORMER_GLOBAL_COLS ? p.c.k_rows_per_seq : p.base.shape.seqlen_q);
  if (tiles == 0) return cudaSuccess;
  // Split over queries: the splits of an outer tile are adjacent in x (entry point: x fits).
  const int num_splits = p.num_splits > 1 ? p.num_splits : 1;
  const cudaError_t err = launch_kernel(
      longformer_bwd_dkdv_kernel<Tr>,
      dim3(unsigned(tiles) * unsigned(num_splits), p.base.shape.heads, p.base.shape.batch),
      dim3(Tr::kNThreads), Tr::kSmemBytes, stream, p);
  if (err != cudaSuccess || num_splits == 1) return err;
  return launch_longformer_bwd_reduce<Element, true>(p, stream);
}

} // namespace fk
