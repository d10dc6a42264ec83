// Longformer attention backward (longformer_bwd_sm80.cuh): the dQ kernel (passes LOCAL,
// GLOBAL_ROWS).
#pragma once

#include "../common/mma_sm80.cuh"
#include "../common/numeric.cuh"
#include "../common/tile_io.cuh"
#include "../include/fk_longformer.h"
#include "common/block_info.cuh"
#include "common/gemm.cuh"
#include "common/mask.cuh"
#include "common/softmax.cuh"
#include "longformer_bwd_rowwise_sm80.cuh"

namespace fk {
namespace longformer_bwd_detail {

// ---------------------------------------------------------------------------------------
// Kernel 2: dQ. 64 query rows per block (16 per warp), 64 keys per step, K / V double
// buffered.
template <int kHeadDim_, typename Element_, int kKeySplit_, int kMinBlocksPerSm_>
struct LongformerBwdQTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlock;
  static constexpr int kBlockN = kBlock;
  static constexpr int kKeySplit = kKeySplit_; // a step's keys in this many parts
  static constexpr int kNWarps = kBlockM / 16;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements of Q or dO
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements of one K or V stage
  // Q, dO; two stages of K and of V; two stages of key flags.
  static constexpr size_t kSmemBytes =
      size_t(2 * kSmemQ + 4 * kSmemKV) * sizeof(Element) + 2 * kBlockN * sizeof(int);
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocksPerSm)
    longformer_bwd_dq_kernel(const fk_longformer_bwd_params p) {
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kSTiles = BN / 8; // 8-key column tiles of S
  constexpr int kOTiles = D / 8;  // 8-column tiles of dQ
  constexpr int KP = BN / Tr::kKeySplit; // keys per part of a step
  constexpr int kPTiles = KP / 8;
  static_assert(KP % 16 == 0, "a part is whole k-steps of dS K");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sQ = reinterpret_cast<Element *>(smem_raw);
  Element *sdO = sQ + Tr::kSmemQ;
  Element *sK = sdO + Tr::kSmemQ;     // two stages
  Element *sV = sK + 2 * Tr::kSmemKV; // two stages
  int *sKf = reinterpret_cast<int *>(sV + 2 * Tr::kSmemKV); // two stages of key flags

  const fk_longformer_common &c = p.c;
  const fk_attention_shape &sh = p.base.shape;
  // Split over keys (GLOBAL_ROWS, num_splits > 1; the entry point checks): the splits of
  // one outer tile are adjacent blocks of the grid's x.
  const int num_splits = max(p.num_splits, 1);
  const int m_block = blockIdx.x / num_splits;
  const int split = blockIdx.x % num_splits;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int pass = c.pass;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = warp * 16;
  const int chunks_valid = sh.head_dim / 8;
  const int m0 = m_block * BM; // entry of the outer rows

  const LongformerRule rule(c, sh.seqlen_q, batch, head);
  // Outer rows: gathered q_rows for GLOBAL_ROWS, contiguous tokens for LOCAL.
  const LongformerRows rows(pass == FK_LONGFORMER_GLOBAL_ROWS ? c.q_rows : nullptr,
                            c.q_rows_per_seq, batch, rule.n);
  const int64_t csr_row =
      (int64_t(batch) * c.num_classes + c.head_class[head]) * (gridDim.x / num_splits) + m_block;
  // Split s visits entries [len * s / S, len * (s + 1) / S) of the row (S = 1: all).
  const int row_begin = c.tile_offsets[csr_row];
  const int64_t row_len = c.tile_offsets[csr_row + 1] - row_begin;
  const int it_begin = row_begin + int(row_len * split / num_splits);
  const int it_end = row_begin + int(row_len * (split + 1) / num_splits);

  // Packed global keys (LOCAL with k_rows): inner ids >= nkt are tiles of the gathered
  // keys, key row x of gathered tile gt is token k_rows[b][gt * BN + x] (none when -1,
  // outside [0, N) or past per_seq). Read from the parameters where used (registers).
  auto packed = [&] { return pass == FK_LONGFORMER_LOCAL && c.k_rows != nullptr; };
  auto nkt = [&] { return (sh.seqlen_q + BN - 1) / BN; };
  auto gathered_key = [&](int gt, int x) {
    return gathered_token(c.k_rows, c.k_rows_per_seq, batch, int64_t(gt) * BN + x, sh.seqlen_q);
  };

  const Element *q = static_cast<const Element *>(p.base.q) +
                     int64_t(batch) * p.base.q_stride.batch + int64_t(head) * p.base.q_stride.head;
  const Element *dout = static_cast<const Element *>(p.dout) + int64_t(batch) * p.do_stride.batch +
                        int64_t(head) * p.do_stride.head;
  const Element *k = static_cast<const Element *>(p.base.k) +
                     int64_t(batch) * p.base.k_stride.batch + int64_t(head) * p.base.k_stride.head;
  const Element *v = static_cast<const Element *>(p.base.v) +
                     int64_t(batch) * p.base.v_stride.batch + int64_t(head) * p.base.v_stride.head;
  const int64_t lse_base =
      int64_t(batch) * p.base.lse_stride.batch + int64_t(head) * p.base.lse_stride.head;

  // Token of tile row r if it is a row of this pass, else -1 (zero-filled).
  auto q_tok = [&](int r) {
    const int i = rows.token(m0 + r);
    return rule.query_ok(pass, i) ? i : -1;
  };
  auto load_kv = [&](int it, int stage) {
    const int tile = c.tile_ids[it];
    const bool gtile = packed() && tile >= nkt();
    const int k0 = tile * BN;
    auto k_tok = [&](int r) {
      const int j = gtile ? gathered_key(tile - nkt(), r) : k0 + r < rule.n ? k0 + r : -1;
      return rule.key_ok(j) ? j : -1;
    };
    load_tile<Tr::kNThreads, D, BN>(token_rows(k_tok), chunks_valid, tid,
                                    tile_source(sK + stage * Tr::kSmemKV, k, p.base.k_stride.row),
                                    tile_source(sV + stage * Tr::kSmemKV, v, p.base.v_stride.row));
  };

  // Flags of key r = tid < BN of step it: -1 if it can never be a key; of a contiguous
  // tile (key k0 + r) its residue, plus 2^30 if global; of a gathered key tile its token
  // (the pairs are GLOBAL_COLS there: only the causal test needs the key).
  auto key_flags = [&](int it) {
    const int tile = c.tile_ids[it];
    if (packed() && tile >= nkt()) {
      const int j = gathered_key(tile - nkt(), tid);
      return rule.key_ok(j) ? j : -1;
    }
    const int j = tile * BN + tid;
    if (j >= rule.n || !rule.key_ok(j)) return -1;
    return rule.residue(j) | (rule.global(j) ? 1 << 30 : 0);
  };

  if (it_begin < it_end) {
    // Q and dO rows. At D = 64 the token is looked up before the padding-chunk test
    // (all chunks of a row alike; measured 2 registers fewer on sm_90a), at D = 128 only
    // for real chunks (fewer spills).
    auto q_row = [&](int r, ChunkOk chunk_ok, int &row) {
      if constexpr (D == 64) {
        row = q_tok(r);
        return row >= 0 && chunk_ok();
      } else {
        row = chunk_ok() ? q_tok(r) : -1;
        return row >= 0;
      }
    };
    load_tile<Tr::kNThreads, D, BM>(q_row, chunks_valid, tid,
                                    tile_source(sQ, q, p.base.q_stride.row));
    load_tile<Tr::kNThreads, D, BM>(q_row, chunks_valid, tid,
                                    tile_source(sdO, dout, p.do_stride.row));
    load_kv(it_begin, 0);
    if (tid < BN) sKf[tid] = key_flags(it_begin);
  }
  cp_async_commit();

  // This thread's rows g and g + 8: token, whether a row of the pass, residue, LSE (log2),
  // Delta.
  int row_i[2], row_res[2];
  bool row_ok[2];
  float l2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_i[r] = rows.token(m0 + warp_row0 + g + 8 * r);
    row_ok[r] = rule.query_ok(pass, row_i[r]);
    row_res[r] = row_ok[r] ? rule.residue(row_i[r]) : 0;
    l2[r] = row_ok[r] ? lse_log2(p.lse[lse_base + row_i[r]]) : INFINITY;
    dl[r] = row_ok[r] ? p.delta[lse_base + row_i[r]] : 0.f;
  }

  float acc[kOTiles][4];
  zero(acc);
  const float scale_log2 = sh.softmax_scale * kLog2e;

  for (int it = it_begin; it < it_end; ++it) {
    const int stage = (it - it_begin) & 1;
    const bool has_next = it + 1 < it_end;
    int next_kf = -1;
    if (has_next) {
      load_kv(it + 1, stage ^ 1);
      cp_async_commit();
      // Into a register now, into shared memory after this step's math.
      if (tid < BN) next_kf = key_flags(it + 1);
      cp_async_wait<1>(); // step it has landed, step it + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sKs = sK + stage * Tr::kSmemKV;
    const Element *sVs = sV + stage * Tr::kSmemKV;
    const int tile = c.tile_ids[it];
    const int k0 = tile * BN;

    // The rule per element, before S is live (fewer registers): bit 4 j + e of `allowed`
    // is element s[j][e], query row g + 8 (e >= 2), key column 8 j + 2 t + (e & 1).
    static_assert(4 * kSTiles <= 32, "a thread's elements fit a 32-bit mask");
    const int *kf_s = sKf + stage * BN;
    uint32_t allowed = 0;
    {
      // Contiguous key tile (column x = key k0 + x): LOCAL, or with packed global keys
      // LOCAL_BAND (the global keys are in the gathered tiles); GLOBAL_ROWS as is. Gathered
      // key tile: GLOBAL_COLS, column x = the flag (its token: every listed key of a local
      // row, causal: token <= i).
      const bool gtile = packed() && tile >= nkt();
      const int tpass = gtile      ? FK_LONGFORMER_GLOBAL_COLS
                        : packed() ? FK_LONGFORMER_LOCAL_BAND
                                   : pass;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int kf = kf_s[j * 8 + 2 * t + e];
          const int col = gtile ? kf : k0 + j * 8 + 2 * t + e;
          const bool k_glob = (kf >> 30) & 1;
          const int k_res = kf & ((1 << 30) - 1);
#pragma unroll
          for (int r = 0; r < 2; ++r)
            if (rule.pair(tpass, row_i[r], col, row_ok[r], kf >= 0, k_glob, k_res == row_res[r]))
              allowed |= 1u << (4 * j + 2 * r + e);
        }
    }

    // The step's keys in kKeySplit parts of KP (fewer live registers at D = 128).
#pragma unroll 1
    for (int kp = 0; kp < Tr::kKeySplit; ++kp) {
      const Element *sKp = sKs + kp * KP * D; // KP % 8 == 0 keeps the swizzle
      const Element *sVp = sVs + kp * KP * D;
      const uint32_t allowed_p = allowed >> (4 * kPTiles * kp);
      // S = Q K^T, then P = exp2(S scale log2e - lse2[row]) where allowed, else 0.
      float s[kPTiles][4];
      zero(s);
      gemm_abt<D>(s, sQ, warp_row0, sKp, lane);
      probs_rows(s, l2, scale_log2, allowed_p);

      // dP = dO V^T, dS = P (dP - Delta[row]).
      float dp[kPTiles][4];
      zero(dp);
      gemm_abt<D>(dp, sdO, warp_row0, sVp, lane);
      ds_rows(dp, s, dl);

      // dQ += dS K.
      gemm_xb<D>(acc, dp, sKp, lane);
    }
    if (has_next && tid < BN) sKf[(stage ^ 1) * BN + tid] = next_kf;
    __syncthreads(); // everyone is done with this stage before it is refilled
  }

  // Epilogue: rows that are not rows of the pass (LOCAL: global and padded rows) get exact
  // zeros, as do rows without any key. Stage this warp's rows in sQ, then store every row
  // with a token: the whole tile for LOCAL, the listed rows for GLOBAL_ROWS. No cp.async
  // wait or barrier is needed first (the emulator's race check agrees): the last step
  // waited with wait<0> and its closing barrier orders every read of sKf (reused for the
  // tokens); only this warp read its sQ rows; with no step nothing was loaded or written.
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (!row_ok[r])
#pragma unroll
      for (int i = 0; i < kOTiles; ++i) acc[i][2 * r] = acc[i][2 * r + 1] = 0.f;
  if (p.num_splits > 1) {
    // GLOBAL_ROWS split: this split's unscaled f32 sums of every listed row (zeros for a
    // padded one, or without keys) at the row's entry index; the reduce writes dQ.
    const int64_t ws_row0 =
        ((int64_t(blockIdx.x % p.num_splits) * sh.batch + batch) * sh.heads + head) *
            c.q_rows_per_seq +
        m0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row_i[r] < 0) continue;
      float *pr = p.partial + (ws_row0 + warp_row0 + g + 8 * r) * sh.head_dim + 2 * t;
#pragma unroll
      for (int i = 0; i < kOTiles; ++i)
        if (i < chunks_valid)
          *reinterpret_cast<float2 *>(pr + i * 8) = make_float2(acc[i][2 * r], acc[i][2 * r + 1]);
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) stage_row<D>(sQ, warp_row0 + g + 8 * r, acc, r, sh.softmax_scale, t);
  int *tok_s = sKf; // free now: the tokens of the rows, this warp's written by itself
  if (lane < 16) tok_s[warp_row0 + lane] = rows.token(m0 + warp_row0 + lane);
  __syncwarp();
  Element *dq = static_cast<Element *>(p.dq) + int64_t(batch) * p.dq_stride.batch +
                int64_t(head) * p.dq_stride.head;
  store_rows<D, 16>(dq, p.dq_stride.row, sQ, warp_row0, token_rows([&](int r) { return tok_s[r]; }),
                    chunks_valid, lane);
}

} // namespace longformer_bwd_detail
} // namespace fk
