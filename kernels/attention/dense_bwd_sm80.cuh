// FlashAttention-2-style dense attention backward for sm_80+, deterministic.
//
// Three kernels, in stream order:
// 1. delta: Delta_i = sum_d dO_id O_id (f32, laid out like LSE), memory-bound.
// 2. dK/dV: one thread block per (key block, kv head, batch) keeps K_j, V_j in shared
//    memory and walks every query block (of every query head of the GQA group) that can
//    see it. It works on TRANSPOSED score tiles, S^T = K_j Q_i^T, so a warp owns 16 key
//    rows exactly as a forward warp owns 16 query rows: P^T, dP^T = V_j dO_i^T and
//    dS^T = P^T (dP^T - Delta) stay in registers and feed dV += P^T dO_i and
//    dK += dS^T Q_i directly as MMA A operands, like P in the forward's O += P V.
// 3. dQ: one thread block per (query block, query head, batch) walks the visible key
//    blocks: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K, all in registers.
// Why two passes instead of FA2's single pass with atomicAdd on dQ: every gradient row is
// owned and summed by one thread block in a fixed order, so the result is bitwise
// reproducible, and GQA's sum over a group's query heads needs no atomics either (it is a
// loop inside the dK/dV block). The price is computing S and P twice (once per pass):
// 7 matmuls of Nq x Nk x D instead of 5. Under a window or causal mask each pass visits
// only the block ranges that intersect the visible band, so the cost is O(N * window).
//
// Built, like the forward, from the attention building blocks of common/: the sequence
// bookkeeping (block_info.cuh), the band (mask.cuh), the fragment loops (gemm.cuh: gemm_abt
// is the forward's S = Q K^T, gemm_xb its O += P V), the softmax backward (softmax.cuh) and
// Delta (delta.cuh); tiles move through ../common/tile_io.cuh.
#pragma once

#include "../common/launch.cuh"
#include "../common/mma_sm80.cuh"
#include "../common/tile_io.cuh"
#include "common/block_info.cuh"
#include "common/delta.cuh"
#include "common/gemm.cuh"
#include "common/mask.cuh"
#include "common/softmax.cuh"
#include "dense_bwd.h"

namespace fk {
namespace dense_bwd_detail {

using namespace attn; // SeqInfo, the band, gemm_abt, gemm_xb, zero, softmax backward, Delta

// ---------------------------------------------------------------------------------------
// Kernel 1: Delta = rowsum(dO * O) (common/delta.cuh: 128 threads, 8 lanes per row, 64 rows
// per block).

template <typename Element>
__global__ void __launch_bounds__(kDeltaThreads)
    dense_bwd_delta_kernel(const fk_attention_bwd_params p) {
  const int head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  const int m0 = blockIdx.x * kDeltaRows;
  if (m0 >= seq.nq) return;
  const Element *o =
      static_cast<const Element *>(p.o) +
      seq.q_offset(p.base.o_stride.batch, p.base.o_stride.row, p.base.o_stride.head, head);
  const Element *dout = static_cast<const Element *>(p.dout) +
                        seq.q_offset(p.do_stride.batch, p.do_stride.row, p.do_stride.head, head);
  float *delta = p.delta + seq.lse_offset(p, head);
  delta_rows(p, o, dout, delta, m0, seq.nq, p.base.shape.head_dim, [](int) { return true; });
}

// ---------------------------------------------------------------------------------------
// Kernel 2: dK, dV.
//
// kBlockN key rows per block, 16 per row group of warps; kBlockM queries per step.
// kSplitRoles: two warps per row group, both compute S^T and P^T, one then accumulates
// dV (all of D), the other computes dP^T, dS^T and accumulates dK; this halves the
// accumulator registers per thread (needed at D = 256) for 5 instead of 4 matmuls.
template <int kHeadDim_, typename Element_, int kBlockN_, int kBlockM_, bool kSplitRoles_,
          int kMinBlocksPerSm_>
struct DenseBwdKVTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr bool kSplitRoles = kSplitRoles_;
  static constexpr int kRowGroups = kBlockN / 16;
  static constexpr int kNWarps = kRowGroups * (kSplitRoles ? 2 : 1);
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static_assert(kBlockN % 16 == 0 && kBlockM % 16 == 0, "MMA tiles are 16 rows");
  static_assert(kNThreads >= kBlockM, "one thread per query loads LSE / Delta");
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements of K or V
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements of one Q or dO stage
  // K, V; two stages of Q and of dO; two stages of LSE (log2) and of Delta.
  static constexpr size_t kSmemBytes =
      size_t(2 * kSmemKV + 4 * kSmemQ) * sizeof(Element) + 4 * kBlockM * sizeof(float);
};

template <class Tr, bool kHasMask>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocksPerSm)
    dense_bwd_dkdv_kernel(const fk_attention_bwd_params p) {
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim;
  constexpr int BN = Tr::kBlockN;
  constexpr int BM = Tr::kBlockM;
  constexpr int kSTiles = BM / 8; // 8-query column tiles of S^T
  constexpr int kOTiles = D / 8;  // 8-column tiles of dK, dV
  constexpr bool kSplit = Tr::kSplitRoles;
  // acc[kDv] accumulates dV, acc[kDk] dK; with split roles a warp holds only its own.
  constexpr int kNAcc = kSplit ? 1 : 2;
  constexpr int kDv = 0;
  constexpr int kDk = kSplit ? 0 : 1;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sK = reinterpret_cast<Element *>(smem_raw);
  Element *sV = sK + Tr::kSmemKV;
  Element *sQ = sV + Tr::kSmemKV;      // two stages
  Element *sdO = sQ + 2 * Tr::kSmemQ;  // two stages
  float *sLse = reinterpret_cast<float *>(sdO + 2 * Tr::kSmemQ); // two stages, log2 domain
  float *sDelta = sLse + 2 * BM;                                  // two stages

  const int n_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = (kSplit ? warp / 2 : warp) * 16; // this warp's 16 key rows
  const bool do_dv = !kSplit || warp % 2 == 0;
  const bool do_dk = !kSplit || warp % 2 == 1;

  const int nq = seq.nq, nk = seq.nk;
  const int n0 = n_block * BN;
  if (n0 >= nk) return; // past this sequence's keys (varlen): nothing to write
  const int diag = nk - nq;
  const int wl = p.window_left, wr = p.window_right;
  const int chunks_valid = p.base.shape.head_dim / 8;
  const int group = p.base.shape.heads / p.base.shape.heads_kv;
  const int head0 = kv_head * group;

  // The query blocks that see some key of this block.
  int m_begin, n_mblocks;
  query_blocks<kHasMask>(n0, BN, BM, nq, nk, diag, wl, wr, m_begin, n_mblocks);
  const int n_iters = group * n_mblocks; // (query head, query block) pairs, head-major

  const Element *q = static_cast<const Element *>(p.base.q) +
                     seq.q_offset(p.base.q_stride.batch, p.base.q_stride.row, 0, 0);
  const Element *dout =
      static_cast<const Element *>(p.dout) + seq.q_offset(p.do_stride.batch, p.do_stride.row, 0, 0);
  const Element *k =
      static_cast<const Element *>(p.base.k) +
      seq.k_offset(p.base.k_stride.batch, p.base.k_stride.row, p.base.k_stride.head, kv_head) +
      int64_t(n0) * p.base.k_stride.row;
  const Element *v =
      static_cast<const Element *>(p.base.v) +
      seq.k_offset(p.base.v_stride.batch, p.base.v_stride.row, p.base.v_stride.head, kv_head) +
      int64_t(n0) * p.base.v_stride.row;

  auto iter_head = [&](int it) { return head0 + it / n_mblocks; };
  auto iter_m0 = [&](int it) { return (m_begin + it % n_mblocks) * BM; };
  auto load_q_do = [&](int it, int stage) {
    const int h = iter_head(it);
    const int m0 = iter_m0(it);
    // One fill for both (same rows): the row tests and shared offsets are shared.
    load_tile<Tr::kNThreads, D, BM>(
        FirstRows{nq - m0}, chunks_valid, tid,
        tile_source(sQ + stage * Tr::kSmemQ,
                    q + int64_t(h) * p.base.q_stride.head + int64_t(m0) * p.base.q_stride.row,
                    p.base.q_stride.row),
        tile_source(sdO + stage * Tr::kSmemQ,
                    dout + int64_t(h) * p.do_stride.head + int64_t(m0) * p.do_stride.row,
                    p.do_stride.row));
  };
  // LSE (log2 domain) and Delta of query m0 + tid of iteration it (tid < BM).
  auto fetch_stats = [&](int it, float &l2, float &dl) {
    query_stats(p, seq, iter_head(it), iter_m0(it) + tid, l2, dl);
  };

  if (n_iters > 0) {
    load_tile<Tr::kNThreads, D, BN>(FirstRows{nk - n0}, chunks_valid, tid,
                                    tile_source(sK, k, p.base.k_stride.row));
    load_tile<Tr::kNThreads, D, BN>(FirstRows{nk - n0}, chunks_valid, tid,
                                    tile_source(sV, v, p.base.v_stride.row));
    load_q_do(0, 0);
    if (tid < BM) fetch_stats(0, sLse[tid], sDelta[tid]);
  }
  cp_async_commit();

  float acc[kNAcc][kOTiles][4];
#pragma unroll
  for (int a = 0; a < kNAcc; ++a) zero(acc[a]);
  const float scale_log2 = p.base.shape.softmax_scale * kLog2e;

  for (int it = 0; it < n_iters; ++it) {
    const int stage = it & 1;
    const bool has_next = it + 1 < n_iters;
    float next_l2 = INFINITY, next_dl = 0.f;
    if (has_next) {
      load_q_do(it + 1, stage ^ 1);
      cp_async_commit();
      // Into registers now, into shared memory after this step's math (the global
      // load latency hides behind it).
      if (tid < BM) fetch_stats(it + 1, next_l2, next_dl);
      cp_async_wait<1>(); // step it has landed, step it + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sQs = sQ + stage * Tr::kSmemQ;
    const Element *sdOs = sdO + stage * Tr::kSmemQ;
    const float *lse_s = sLse + stage * BM;
    const float *delta_s = sDelta + stage * BM;
    const int m0 = iter_m0(it);

    // S^T = K_j Q_i^T: rows = this warp's keys, columns = the step's BM queries.
    float s[kSTiles][4];
    zero(s);
    gemm_abt<D>(s, sK, warp_row0, sQs, lane);

    if (tile_needs_mask<kHasMask>(m0, BM, n0, BN, nq, nk, diag, wl, wr)) {
      band_key_rows<kHasMask>(s, n0 + warp_row0 + g, m0 + 2 * t, nq, nk, diag, wl, wr);
    }
    // P^T = exp2(S^T scale log2e - lse2[query]); the query is the column: 2 t + (e & 1).
    probs_cols(s, lse_s, scale_log2, t);

    // dV += P^T dO_i (P^T straight from the accumulators, like P V in the forward).
    if (do_dv) gemm_xb<D>(acc[kDv], s, sdOs, lane);

    if (do_dk) {
      // dP^T = V_j dO_i^T, then dS^T = P^T (dP^T - Delta[query]).
      float dp[kSTiles][4];
      zero(dp);
      gemm_abt<D>(dp, sV, warp_row0, sdOs, lane);
      ds_cols(dp, s, delta_s, t);
      // dK += dS^T Q_i (scale applied at the end).
      gemm_xb<D>(acc[kDk], dp, sQs, lane);
    }

    if (has_next && tid < BM) {
      sLse[(stage ^ 1) * BM + tid] = next_l2;
      sDelta[(stage ^ 1) * BM + tid] = next_dl;
    }
    __syncthreads(); // everyone is done with this stage before it is refilled
  }

  // Epilogue: stage this warp's rows of dK (in sK) / dV (in sV) for 16-byte stores. Keys
  // that no query sees (n_iters == 0) get zeros, as they must. No cp.async wait or barrier
  // is needed first (the emulator's race check agrees): the last step waited with wait<0>
  // and its closing barrier orders every read of these rows (with split roles the row
  // group's other warp reads them too); with n_iters == 0 nothing was loaded or read.
  const int rows_valid = nk - n0;
  if (do_dk) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      stage_row<D>(sK, warp_row0 + g + 8 * r, acc[kDk], r, p.base.shape.softmax_scale, t);
    __syncwarp();
    Element *dk = static_cast<Element *>(p.dk) +
                  seq.k_offset(p.dk_stride.batch, p.dk_stride.row, p.dk_stride.head, kv_head) +
                  int64_t(n0) * p.dk_stride.row;
    store_rows<D, 16>(dk, p.dk_stride.row, sK, warp_row0, FirstRows{rows_valid}, chunks_valid,
                      lane);
  }
  if (do_dv) {
#pragma unroll
    for (int r = 0; r < 2; ++r) stage_row<D>(sV, warp_row0 + g + 8 * r, acc[kDv], r, 1.f, t);
    __syncwarp();
    Element *dv = static_cast<Element *>(p.dv) +
                  seq.k_offset(p.dv_stride.batch, p.dv_stride.row, p.dv_stride.head, kv_head) +
                  int64_t(n0) * p.dv_stride.row;
    store_rows<D, 16>(dv, p.dv_stride.row, sV, warp_row0, FirstRows{rows_valid}, chunks_valid,
                      lane);
  }
}

// ---------------------------------------------------------------------------------------
// Kernel 3: dQ. kBlockM query rows per block (16 per warp), kBlockN keys per step.
template <int kHeadDim_, typename Element_, int kBlockM_, int kBlockN_, int kMinBlocksPerSm_>
struct DenseBwdQTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kBlockM / 16;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "MMA tiles are 16 rows");
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements of Q or dO
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements of one K or V stage
  // Q, dO; two stages of K and of V.
  static constexpr size_t kSmemBytes = size_t(2 * kSmemQ + 4 * kSmemKV) * sizeof(Element);
};

template <class Tr, bool kHasMask>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocksPerSm)
    dense_bwd_dq_kernel(const fk_attention_bwd_params p) {
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kSTiles = BN / 8; // 8-key column tiles of S
  constexpr int kOTiles = D / 8;  // 8-column tiles of dQ

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sQ = reinterpret_cast<Element *>(smem_raw);
  Element *sdO = sQ + Tr::kSmemQ;
  Element *sK = sdO + Tr::kSmemQ;      // two stages
  Element *sV = sK + 2 * Tr::kSmemKV;  // two stages

  // Reverse order: under causal masking the last query blocks have the most work.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = warp * 16;

  const int nq = seq.nq, nk = seq.nk;
  const int m0 = m_block * BM;
  if (m0 >= nq) return; // past this sequence's queries (varlen)
  const int diag = nk - nq;
  const int wl = p.window_left, wr = p.window_right;
  const int chunks_valid = p.base.shape.head_dim / 8;
  const int kv_head = head / (p.base.shape.heads / p.base.shape.heads_kv);

  // The key blocks that some query of this block sees.
  int n_begin, n_end;
  key_blocks<kHasMask>(m0, BM, BN, nq, nk, diag, wl, wr, n_begin, n_end);

  const Element *q =
      static_cast<const Element *>(p.base.q) +
      seq.q_offset(p.base.q_stride.batch, p.base.q_stride.row, p.base.q_stride.head, head) +
      int64_t(m0) * p.base.q_stride.row;
  const Element *dout = static_cast<const Element *>(p.dout) +
                        seq.q_offset(p.do_stride.batch, p.do_stride.row, p.do_stride.head, head) +
                        int64_t(m0) * p.do_stride.row;
  const Element *k =
      static_cast<const Element *>(p.base.k) +
      seq.k_offset(p.base.k_stride.batch, p.base.k_stride.row, p.base.k_stride.head, kv_head);
  const Element *v =
      static_cast<const Element *>(p.base.v) +
      seq.k_offset(p.base.v_stride.batch, p.base.v_stride.row, p.base.v_stride.head, kv_head);

  auto load_kv = [&](int n, int stage) {
    const int n0 = n * BN;
    load_tile<Tr::kNThreads, D, BN>(FirstRows{nk - n0}, chunks_valid, tid,
                                    tile_source(sK + stage * Tr::kSmemKV,
                                                k + int64_t(n0) * p.base.k_stride.row,
                                                p.base.k_stride.row));
    load_tile<Tr::kNThreads, D, BN>(FirstRows{nk - n0}, chunks_valid, tid,
                                    tile_source(sV + stage * Tr::kSmemKV,
                                                v + int64_t(n0) * p.base.v_stride.row,
                                                p.base.v_stride.row));
  };

  const bool any_keys = n_end > n_begin;
  if (any_keys) {
    load_tile<Tr::kNThreads, D, BM>(FirstRows{nq - m0}, chunks_valid, tid,
                                    tile_source(sQ, q, p.base.q_stride.row));
    load_tile<Tr::kNThreads, D, BM>(FirstRows{nq - m0}, chunks_valid, tid,
                                    tile_source(sdO, dout, p.do_stride.row));
    load_kv(n_begin, 0);
  }
  cp_async_commit();

  // LSE (log2 domain) and Delta of this thread's rows g and g + 8.
  float l2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) query_stats(p, seq, head, m0 + warp_row0 + g + 8 * r, l2[r], dl[r]);

  float acc[kOTiles][4];
  zero(acc);
  const float scale_log2 = p.base.shape.softmax_scale * kLog2e;

  for (int n = n_begin; n < n_end; ++n) {
    const int stage = (n - n_begin) & 1;
    if (n + 1 < n_end) {
      load_kv(n + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>(); // block n has landed, block n + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sKs = sK + stage * Tr::kSmemKV;
    const Element *sVs = sV + stage * Tr::kSmemKV;
    const int n0 = n * BN;

    // S = Q K^T, exactly the forward's.
    float s[kSTiles][4];
    zero(s);
    gemm_abt<D>(s, sQ, warp_row0, sKs, lane);

    if (tile_needs_mask<kHasMask>(m0, BM, n0, BN, nq, nk, diag, wl, wr)) {
      band_query_rows<kHasMask>(s, m0 + warp_row0 + g, n0 + 2 * t, nq, nk, diag, wl, wr);
    }
    // P = exp2(S scale log2e - lse2[row]); the row is g + 8 (e >= 2).
    probs_rows(s, l2, scale_log2);

    // dP = dO V^T (dO as the A operand like Q, V as the B operand like K).
    float dp[kSTiles][4];
    zero(dp);
    gemm_abt<D>(dp, sdO, warp_row0, sVs, lane);
    // dS = P (dP - Delta[row]).
    ds_rows(dp, s, dl);

    // dQ += dS K (dS from the accumulators, K as the B operand like V in P V).
    gemm_xb<D>(acc, dp, sKs, lane);
    __syncthreads(); // everyone is done with this stage before it is refilled
  }

  // Epilogue: rows without any visible key get zeros. Stage this warp's rows in sQ (only
  // this warp ever read them) for 16-byte stores. No cp.async wait or barrier is needed
  // first (the emulator's race check agrees): nothing is in flight (the last key block
  // waited with wait<0>; with none, nothing was loaded) and Q landed before the first key
  // block's barrier.
#pragma unroll
  for (int r = 0; r < 2; ++r)
    stage_row<D>(sQ, warp_row0 + g + 8 * r, acc, r, p.base.shape.softmax_scale, t);
  __syncwarp();
  Element *dq = static_cast<Element *>(p.dq) +
                seq.q_offset(p.dq_stride.batch, p.dq_stride.row, p.dq_stride.head, head) +
                int64_t(m0) * p.dq_stride.row;
  store_rows<D, 16>(dq, p.dq_stride.row, sQ, warp_row0, FirstRows{nq - m0}, chunks_valid, lane);
}

} // namespace dense_bwd_detail

// Tile configuration per padded head dim. Every configuration stays within 99 KB of
// dynamic shared memory (sm_86 / sm_89) and 4 warps per block.
// - dK/dV: kKVBlockN keys per block, kKVBlockM queries per step. D = 256 splits the dK
//   and dV accumulators over two warps per 16 keys (kKVSplitRoles).
// - dQ: kQBlockM queries per block, kQBlockN keys per step.
template <int kHeadDim> struct DenseBwdConfigSm80;
template <> struct DenseBwdConfigSm80<64> {
  static constexpr int kKVBlockN = 64, kKVBlockM = 64, kKVMinBlocks = 2;
  static constexpr bool kKVSplitRoles = false;
  static constexpr int kQBlockM = 64, kQBlockN = 64, kQMinBlocks = 2;
};
template <> struct DenseBwdConfigSm80<128> {
  static constexpr int kKVBlockN = 64, kKVBlockM = 32, kKVMinBlocks = 1;
  static constexpr bool kKVSplitRoles = false;
  static constexpr int kQBlockM = 64, kQBlockN = 64, kQMinBlocks = 1;
};
template <> struct DenseBwdConfigSm80<256> {
  static constexpr int kKVBlockN = 32, kKVBlockM = 32, kKVMinBlocks = 1;
  static constexpr bool kKVSplitRoles = true;
  static constexpr int kQBlockM = 64, kQBlockN = 16, kQMinBlocks = 1;
};

// Kernel 1 (Delta): what the sm80 and the Hopper backward share. Grids are sized by the
// longest sequence; an empty one would be a launch error, and has nothing to compute.
template <typename Element>
cudaError_t run_dense_bwd_delta_sm80(const fk_attention_bwd_params &p, cudaStream_t stream) {
  using namespace dense_bwd_detail;
  if (p.base.shape.seqlen_q == 0) return cudaSuccess;
  const dim3 grid((p.base.shape.seqlen_q + kDeltaRows - 1) / kDeltaRows, p.base.shape.heads,
                  p.base.shape.batch);
  return launch_kernel(dense_bwd_delta_kernel<Element>, grid, dim3(kDeltaThreads), 0, stream, p);
}

// Kernels 1 and 2 (Delta, then dK / dV).
template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_bwd_delta_dkdv_sm80(const fk_attention_bwd_params &p, cudaStream_t stream) {
  using namespace dense_bwd_detail;
  using C = DenseBwdConfigSm80<kHeadDim>;
  using KV = DenseBwdKVTraitsSm80<kHeadDim, Element, C::kKVBlockN, C::kKVBlockM, C::kKVSplitRoles,
                                  C::kKVMinBlocks>;
  static_assert(KV::kSmemBytes <= 99 * 1024, "shared memory must fit sm_86 / sm_89 (99 KB)");
  cudaError_t err = run_dense_bwd_delta_sm80<Element>(p, stream);
  if (err != cudaSuccess) return err;
  // seqlen_q == 0 still needs dK = dV = 0: kernel 2 writes them.
  if (p.base.shape.seqlen_k > 0) {
    const dim3 grid((p.base.shape.seqlen_k + KV::kBlockN - 1) / KV::kBlockN, p.base.shape.heads_kv,
                    p.base.shape.batch);
    err = launch_kernel(dense_bwd_dkdv_kernel<KV, kHasMask>, grid, dim3(KV::kNThreads),
                        KV::kSmemBytes, stream, p);
  }
  return err;
}

template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_bwd_sm80(const fk_attention_bwd_params &p, cudaStream_t stream) {
  using namespace dense_bwd_detail;
  using C = DenseBwdConfigSm80<kHeadDim>;
  using Q = DenseBwdQTraitsSm80<kHeadDim, Element, C::kQBlockM, C::kQBlockN, C::kQMinBlocks>;
  static_assert(Q::kSmemBytes <= 99 * 1024, "shared memory must fit sm_86 / sm_89 (99 KB)");
  cudaError_t err = run_dense_bwd_delta_dkdv_sm80<kHeadDim, Element, kHasMask>(p, stream);
  if (err != cudaSuccess || p.base.shape.seqlen_q == 0) return err;
  const dim3 grid((p.base.shape.seqlen_q + Q::kBlockM - 1) / Q::kBlockM, p.base.shape.heads,
                  p.base.shape.batch);
  return launch_kernel(dense_bwd_dq_kernel<Q, kHasMask>, grid, dim3(Q::kNThreads), Q::kSmemBytes,
                       stream, p);
}

} // namespace fk
