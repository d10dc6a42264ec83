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
#pragma once

#include "../common/launch.cuh"
#include "../common/mma_sm80.cuh"
#include "../common/numeric.cuh"
#include "../common/tile_io.cuh"
#include "../include/fk_longformer.h"
#include "common/block_info.cuh"
#include "common/delta.cuh"
#include "common/gemm.cuh"
#include "common/mask.cuh"
#include "common/softmax.cuh"

namespace fk {
namespace longformer_bwd_detail {

using namespace attn; // LongformerRule, LongformerRows, gathered_token, LongformerWork,
                      // gemm_abt, gemm_xb, zero, softmax backward, Delta

constexpr int kBlock = FK_LONGFORMER_BWD_BLOCK; // outer tiles and listed inner tiles

// ---------------------------------------------------------------------------------------
// Kernel 1: Delta = rowsum(dO * O) of every token (common/delta.cuh, as the dense kernel);
// padded tokens get 0 (their rows are not read).

template <typename Element>
__global__ void __launch_bounds__(kDeltaThreads)
    longformer_bwd_delta_kernel(const fk_longformer_bwd_params p) {
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int n = p.c.seqlen;
  const int m0 = blockIdx.x * kDeltaRows;
  const uint8_t *pad = p.c.padding_mask ? p.c.padding_mask + int64_t(batch) * n : nullptr;
  const Element *o = static_cast<const Element *>(p.o) + int64_t(batch) * p.base.o_stride.batch +
                     int64_t(head) * p.base.o_stride.head;
  const Element *dout = static_cast<const Element *>(p.dout) + int64_t(batch) * p.do_stride.batch +
                        int64_t(head) * p.do_stride.head;
  float *delta =
      p.delta + int64_t(batch) * p.base.lse_stride.batch + int64_t(head) * p.base.lse_stride.head;
  delta_rows(p, o, dout, delta, m0, n, p.c.head_dim, [&](int i) { return !(pad && pad[i] != 0); });
}

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
  const int chunks_valid = c.head_dim / 8;
  const int m0 = m_block * BM; // entry of the outer rows

  const LongformerRule rule(c, batch, head);
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
  auto nkt = [&] { return (c.seqlen + BN - 1) / BN; };
  auto gathered_key = [&](int gt, int x) {
    return gathered_token(c.k_rows, c.k_rows_per_seq, batch, int64_t(gt) * BN + x, c.seqlen);
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
  const float scale_log2 = c.softmax_scale * kLog2e;

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
        ((int64_t(blockIdx.x % p.num_splits) * c.batch + batch) * c.heads + head) *
            c.q_rows_per_seq +
        m0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row_i[r] < 0) continue;
      float *pr = p.partial + (ws_row0 + warp_row0 + g + 8 * r) * c.head_dim + 2 * t;
#pragma unroll
      for (int i = 0; i < kOTiles; ++i)
        if (i < chunks_valid)
          *reinterpret_cast<float2 *>(pr + i * 8) = make_float2(acc[i][2 * r], acc[i][2 * r + 1]);
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) stage_row<D>(sQ, warp_row0 + g + 8 * r, acc, r, c.softmax_scale, t);
  int *tok_s = sKf; // free now: the tokens of the rows, this warp's written by itself
  if (lane < 16) tok_s[warp_row0 + lane] = rows.token(m0 + warp_row0 + lane);
  __syncwarp();
  Element *dq = static_cast<Element *>(p.dq) + int64_t(batch) * p.dq_stride.batch +
                int64_t(head) * p.dq_stride.head;
  store_rows<D, 16>(dq, p.dq_stride.row, sQ, warp_row0, token_rows([&](int r) { return tok_s[r]; }),
                    chunks_valid, lane);
}

// ---------------------------------------------------------------------------------------
// Kernel 3: dK, dV. 64 key rows per block (16 per warp), kBlockM queries per step (a listed
// 64-query tile is kBlock / kBlockM steps); Q, dO, LSE, Delta and the query tokens double
// buffered.
template <int kHeadDim_, typename Element_, int kBlockM_, int kMinBlocksPerSm_>
struct LongformerBwdKVTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlock;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kSubSteps = kBlock / kBlockM;
  static constexpr int kNWarps = kBlockN / 16;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static_assert(kBlockM % 16 == 0 && kBlock % kBlockM == 0, "steps split a listed tile");
  static_assert(kNThreads >= kBlockM, "one thread per query loads LSE / Delta");
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements of K or V
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements of one Q or dO stage
  // K, V; two stages of Q and of dO; two stages of LSE (log2), Delta, query token and
  // query residue; the key rows' tokens and the first key entry (for the epilogue).
  static constexpr size_t kSmemBytes = size_t(2 * kSmemKV + 4 * kSmemQ) * sizeof(Element) +
                                       8 * kBlockM * sizeof(float) + (kBlockN + 1) * sizeof(int);
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocksPerSm)
    longformer_bwd_dkdv_kernel(const fk_longformer_bwd_params p) {
  using Element = typename Tr::Element;
  using ET = ElemTraits<Element>;
  constexpr int D = Tr::kHeadDim;
  constexpr int BN = Tr::kBlockN;
  constexpr int BM = Tr::kBlockM;
  constexpr int kSTiles = BM / 8; // 8-query column tiles of S^T
  constexpr int kOTiles = D / 8;  // 8-column tiles of dK, dV
  constexpr int kDv = 0, kDk = 1;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sK = reinterpret_cast<Element *>(smem_raw);
  Element *sV = sK + Tr::kSmemKV;
  Element *sQ = sV + Tr::kSmemKV;     // two stages
  Element *sdO = sQ + 2 * Tr::kSmemQ; // two stages
  float *sLse = reinterpret_cast<float *>(sdO + 2 * Tr::kSmemQ); // two stages, log2 domain
  float *sDelta = sLse + 2 * BM;                                  // two stages
  int *sQi = reinterpret_cast<int *>(sDelta + 2 * BM); // two stages: query token or -1
  int *sQr = sQi + 2 * BM;                              // two stages: its residue
  // The key rows' tokens (-1: none), then the block's first key entry n0. At D = 128 they
  // are written before the loop and the epilogue reads them here (n0 is a division when
  // split, not worth a register through the loop: fewer spills); at D = 64 (no spills
  // either way, measured) the epilogue computes them.
  constexpr bool kTokInSmem = D > 64;
  int *sKtok = sQr + 2 * BM;

  const fk_longformer_common &c = p.c;
  // Split over queries (GLOBAL_COLS, num_splits > 1; the entry point checks): the splits
  // of one outer tile are adjacent blocks of the grid's x.
  const LongformerWork work(p.num_splits);
  const int n_block = work.outer;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int pass = c.pass;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = warp * 16; // this warp's 16 key rows
  const int chunks_valid = c.head_dim / 8;
  const int n0 = n_block * BN; // entry of the outer (key) rows

  const LongformerRule rule(c, batch, head);
  // Outer rows: gathered k_rows for GLOBAL_COLS, else contiguous. Inner rows: gathered
  // q_rows for GLOBAL_ROWS, else contiguous.
  const LongformerRows krows(pass == FK_LONGFORMER_GLOBAL_COLS ? c.k_rows : nullptr,
                             c.k_rows_per_seq, batch, rule.n);
  const LongformerRows qrows(pass == FK_LONGFORMER_GLOBAL_ROWS ? c.q_rows : nullptr,
                             c.q_rows_per_seq, batch, rule.n);
  int tile_begin, tile_end;
  work.entries(c, p.num_splits, batch, head, tile_begin, tile_end);
  const int n_iters = (tile_end - tile_begin) * Tr::kSubSteps;

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

  // First query entry of step it, and the token of its row r if a row of the pass, else -1.
  auto iter_m0 = [&](int it) {
    return c.tile_ids[tile_begin + it / Tr::kSubSteps] * kBlock + (it % Tr::kSubSteps) * BM;
  };
  auto q_tok = [&](int m0, int r) {
    const int i = qrows.token(m0 + r);
    return rule.query_ok(pass, i) ? i : -1;
  };
  auto load_q_do = [&](int it, int stage) {
    const int m0 = iter_m0(it);
    auto tok = [&](int r) { return q_tok(m0, r); };
    load_tile<Tr::kNThreads, D, BM>(token_rows(tok), chunks_valid, tid,
                                    tile_source(sQ + stage * Tr::kSmemQ, q, p.base.q_stride.row),
                                    tile_source(sdO + stage * Tr::kSmemQ, dout, p.do_stride.row));
  };
  // Token, residue, LSE (log2) and Delta of query tid of step it (tid < BM).
  auto fetch_stats = [&](int it, int &qi, int &qr, float &l2, float &dl) {
    qi = q_tok(iter_m0(it), tid);
    qr = qi >= 0 ? rule.residue(qi) : 0;
    l2 = qi >= 0 ? lse_log2(p.lse[lse_base + qi]) : INFINITY;
    dl = qi >= 0 ? p.delta[lse_base + qi] : 0.f;
  };

  // This thread's key rows g and g + 8.
  int key_i[2], key_res[2];
  bool key_ok[2], key_glob[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    key_i[r] = krows.token(n0 + warp_row0 + g + 8 * r);
    key_ok[r] = rule.key_ok(key_i[r]);
    key_glob[r] = key_ok[r] && rule.global(key_i[r]);
    key_res[r] = key_ok[r] ? rule.residue(key_i[r]) : 0;
  }

  if (kTokInSmem && tid < BN) sKtok[tid] = krows.token(n0 + tid);
  if (kTokInSmem && tid == 0) sKtok[BN] = n0;
  if (n_iters > 0) {
    auto k_tok = [&](int r) {
      const int j = krows.token(n0 + r);
      return rule.key_ok(j) ? j : -1;
    };
    load_tile<Tr::kNThreads, D, BN>(token_rows(k_tok), chunks_valid, tid,
                                    tile_source(sK, k, p.base.k_stride.row));
    load_tile<Tr::kNThreads, D, BN>(token_rows(k_tok), chunks_valid, tid,
                                    tile_source(sV, v, p.base.v_stride.row));
    load_q_do(0, 0);
    if (tid < BM) fetch_stats(0, sQi[tid], sQr[tid], sLse[tid], sDelta[tid]);
  }
  cp_async_commit();

  float acc[2][kOTiles][4];
  zero(acc[kDv]);
  zero(acc[kDk]);
  const float scale_log2 = c.softmax_scale * kLog2e;

  for (int it = 0; it < n_iters; ++it) {
    const int stage = it & 1;
    const bool has_next = it + 1 < n_iters;
    int next_qi = -1, next_qr = 0;
    float next_l2 = INFINITY, next_dl = 0.f;
    if (has_next) {
      load_q_do(it + 1, stage ^ 1);
      cp_async_commit();
      if (tid < BM) fetch_stats(it + 1, next_qi, next_qr, next_l2, next_dl);
      cp_async_wait<1>(); // step it has landed, step it + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sQs = sQ + stage * Tr::kSmemQ;
    const Element *sdOs = sdO + stage * Tr::kSmemQ;
    const float *lse_s = sLse + stage * BM;
    const float *delta_s = sDelta + stage * BM;
    const int *qi_s = sQi + stage * BM;
    const int *qr_s = sQr + stage * BM;

    // The rule per element, before S^T is live (fewer registers): bit 4 j + e of
    // `allowed` is element s[j][e], key row g + 8 (e >= 2), query column 8 j + 2 t + (e & 1).
    static_assert(4 * kSTiles <= 32, "a thread's elements fit a 32-bit mask");
    uint32_t allowed = 0;
#pragma unroll
    for (int j = 0; j < kSTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = qi_s[j * 8 + 2 * t + (e & 1)];
        const int r = e >> 1;
        if (rule.pair(pass, qi, key_i[r], qi >= 0, key_ok[r], key_glob[r],
                      qr_s[j * 8 + 2 * t + (e & 1)] == key_res[r]))
          allowed |= 1u << (4 * j + e);
      }

    // S^T = K_j Q_i^T: rows = this warp's keys, columns = the step's BM queries; then
    // P^T = exp2(S^T scale log2e - lse2[query]) where allowed, else 0.
    float s[kSTiles][4];
    zero(s);
    gemm_abt<D>(s, sK, warp_row0, sQs, lane);
    probs_cols(s, lse_s, scale_log2, t, allowed);

    // dV += P^T dO_i.
    gemm_xb<D>(acc[kDv], s, sdOs, lane);

    // dP^T = V_j dO_i^T, then dS^T = P^T (dP^T - Delta[query]), dK += dS^T Q_i.
    float dp[kSTiles][4];
    zero(dp);
    gemm_abt<D>(dp, sV, warp_row0, sdOs, lane);
    ds_cols(dp, s, delta_s, t);
    gemm_xb<D>(acc[kDk], dp, sQs, lane);

    if (has_next && tid < BM) {
      sQi[(stage ^ 1) * BM + tid] = next_qi;
      sQr[(stage ^ 1) * BM + tid] = next_qr;
      sLse[(stage ^ 1) * BM + tid] = next_l2;
      sDelta[(stage ^ 1) * BM + tid] = next_dl;
    }
    __syncthreads(); // everyone is done with this stage before it is refilled
  }

  // Nothing is in flight (the last step waited with wait<0>; with none, nothing was
  // loaded). The barrier orders sKtok's writes (made even when n_iters == 0) before the
  // epilogue reads them.
  __syncthreads();
  // Exact zeros for keys that can never be a key (the overwrite and split results; the
  // accumulate path leaves such rows alone).
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (!key_ok[r])
#pragma unroll
      for (int i = 0; i < kOTiles; ++i)
        acc[kDk][i][2 * r] = acc[kDk][i][2 * r + 1] = acc[kDv][i][2 * r] = acc[kDv][i][2 * r + 1] =
            0.f;
  if (p.num_splits > 1) {
    // GLOBAL_COLS split: this split's unscaled f32 sums of every listed key (zeros for a
    // padded one) at the key's entry index, dK then dV; the reduce writes or adds them.
    const int64_t ws_row0 =
        ((int64_t(blockIdx.x % p.num_splits) * c.batch + batch) * c.heads + head) *
            c.k_rows_per_seq +
        (kTokInSmem ? sKtok[BN] : n0);
    const int64_t dv_off =
        int64_t(p.num_splits) * c.batch * c.heads * c.k_rows_per_seq * c.head_dim;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (key_i[r] < 0) continue;
      float *pk = p.partial + (ws_row0 + warp_row0 + g + 8 * r) * c.head_dim + 2 * t;
#pragma unroll
      for (int i = 0; i < kOTiles; ++i)
        if (i < chunks_valid) {
          *reinterpret_cast<float2 *>(pk + i * 8) =
              make_float2(acc[kDk][i][2 * r], acc[kDk][i][2 * r + 1]);
          *reinterpret_cast<float2 *>(pk + dv_off + i * 8) =
              make_float2(acc[kDv][i][2 * r], acc[kDv][i][2 * r + 1]);
        }
    }
    return;
  }
  Element *dk = static_cast<Element *>(p.dk) + int64_t(batch) * p.dk_stride.batch +
                int64_t(head) * p.dk_stride.head;
  Element *dv = static_cast<Element *>(p.dv) + int64_t(batch) * p.dv_stride.batch +
                int64_t(head) * p.dv_stride.head;
  if (p.accumulate) {
    // Read, add in f32, round once, write: this thread's two rows, two columns per tile.
    // Keys that can never be a key (padded) are left as they are.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!key_ok[r]) continue;
      Element *dkr = dk + int64_t(key_i[r]) * p.dk_stride.row + 2 * t;
      Element *dvr = dv + int64_t(key_i[r]) * p.dv_stride.row + 2 * t;
#pragma unroll
      for (int i = 0; i < kOTiles; ++i) {
        if (i >= chunks_valid) break;
        uint32_t *pk = reinterpret_cast<uint32_t *>(dkr + i * 8);
        uint32_t *pv = reinterpret_cast<uint32_t *>(dvr + i * 8);
        const float2 ok = unpack2<Element>(*pk);
        const float2 ov = unpack2<Element>(*pv);
        *pk = ET::pack(fmaf(acc[kDk][i][2 * r], c.softmax_scale, ok.x),
                       fmaf(acc[kDk][i][2 * r + 1], c.softmax_scale, ok.y));
        *pv = ET::pack(acc[kDv][i][2 * r] + ov.x, acc[kDv][i][2 * r + 1] + ov.y);
      }
    }
    return;
  }
  // Overwrite: every row with a token (the tile's keys, or the listed ones for
  // GLOBAL_COLS), staged in this warp's rows of sK / sV for 16-byte stores.
#pragma unroll
  for (int r = 0; r < 2; ++r)
    stage_row<D>(sK, warp_row0 + g + 8 * r, acc[kDk], r, c.softmax_scale, t);
#pragma unroll
  for (int r = 0; r < 2; ++r) stage_row<D>(sV, warp_row0 + g + 8 * r, acc[kDv], r, 1.f, t);
  int *tok_s = sKtok; // the tokens of the rows (D = 128: written before the loop)
  if (!kTokInSmem && lane < 16) tok_s[warp_row0 + lane] = krows.token(n0 + warp_row0 + lane);
  __syncwarp();
  auto staged_token = [&](int r) { return tok_s[r]; };
  store_rows<D, 16>(dk, p.dk_stride.row, sK, warp_row0, token_rows(staged_token), chunks_valid,
                    lane);
  store_rows<D, 16>(dv, p.dv_stride.row, sV, warp_row0, token_rows(staged_token), chunks_valid,
                    lane);
}

// ---------------------------------------------------------------------------------------
// Kernel 4: reduce of the splits (dq GLOBAL_ROWS: kKV = false; dkdv GLOBAL_COLS: kKV =
// true). One warp per (b, h, entry x) of the gathered list whose token is in [0, N);
// sums the splits' f32 partials in increasing s (deterministic), then writes what the
// unsplit pass writes: dQ = scale * sum (a padded row's partials are zeros); dK = scale *
// sum, dV = sum, overwritten, or added in f32 (one rounding) with `accumulate`, where a
// padded key is left as it is.
constexpr int kReduceWarps = 4;

template <typename Element, bool kKV>
__global__ void __launch_bounds__(32 * kReduceWarps)
    longformer_bwd_reduce_kernel(const fk_longformer_bwd_params p) {
  using ET = ElemTraits<Element>;
  const fk_longformer_common &c = p.c;
  const int per_seq = kKV ? c.k_rows_per_seq : c.q_rows_per_seq;
  const int32_t *list = kKV ? c.k_rows : c.q_rows;
  const int64_t per_split = int64_t(c.batch) * c.heads * per_seq; // rows of one split
  const int64_t w = int64_t(blockIdx.x) * kReduceWarps + threadIdx.x / 32;
  if (w >= per_split) return;
  const int lane = threadIdx.x % 32;
  const int x = int(w % per_seq);
  const int head = int(w / per_seq % c.heads);
  const int batch = int(w / per_seq / c.heads);
  const int tok = list[int64_t(batch) * per_seq + x];
  if (tok < 0 || tok >= c.seqlen) return;
  const int S = p.num_splits;
  const int dim = c.head_dim;
  if (!kKV) {
    Element *dq = static_cast<Element *>(p.dq) + int64_t(batch) * p.dq_stride.batch +
                  int64_t(tok) * p.dq_stride.row + int64_t(head) * p.dq_stride.head;
    for (int d = 2 * lane; d < dim; d += 64) {
      float a0 = 0.f, a1 = 0.f;
      for (int s = 0; s < S; ++s) {
        const float2 v =
            *reinterpret_cast<const float2 *>(p.partial + (s * per_split + w) * dim + d);
        a0 += v.x;
        a1 += v.y;
      }
      *reinterpret_cast<uint32_t *>(dq + d) = ET::pack(a0 * c.softmax_scale, a1 * c.softmax_scale);
    }
    return;
  }
  const bool padded = c.padding_mask && c.padding_mask[int64_t(batch) * c.seqlen + tok] != 0;
  if (p.accumulate && padded) return;
  const int64_t dv_off = int64_t(S) * per_split * dim;
  Element *dk = static_cast<Element *>(p.dk) + int64_t(batch) * p.dk_stride.batch +
                int64_t(tok) * p.dk_stride.row + int64_t(head) * p.dk_stride.head;
  Element *dv = static_cast<Element *>(p.dv) + int64_t(batch) * p.dv_stride.batch +
                int64_t(tok) * p.dv_stride.row + int64_t(head) * p.dv_stride.head;
  for (int d = 2 * lane; d < dim; d += 64) {
    float k0 = 0.f, k1 = 0.f, v0 = 0.f, v1 = 0.f;
    for (int s = 0; s < S; ++s) {
      const float *pk = p.partial + (s * per_split + w) * dim + d;
      const float2 kk = *reinterpret_cast<const float2 *>(pk);
      const float2 vv = *reinterpret_cast<const float2 *>(pk + dv_off);
      k0 += kk.x, k1 += kk.y, v0 += vv.x, v1 += vv.y;
    }
    uint32_t *pk = reinterpret_cast<uint32_t *>(dk + d);
    uint32_t *pv = reinterpret_cast<uint32_t *>(dv + d);
    if (p.accumulate) {
      const float2 ok = unpack2<Element>(*pk);
      const float2 ov = unpack2<Element>(*pv);
      *pk = ET::pack(fmaf(k0, c.softmax_scale, ok.x), fmaf(k1, c.softmax_scale, ok.y));
      *pv = ET::pack(v0 + ov.x, v1 + ov.y);
    } else {
      *pk = ET::pack(k0 * c.softmax_scale, k1 * c.softmax_scale);
      *pv = ET::pack(v0, v1);
    }
  }
}

} // namespace longformer_bwd_detail

// Tile configuration per padded head dim (tiles are FK_LONGFORMER_BWD_BLOCK = 64 on both
// sides): 4 warps per block; dK/dV takes kKVBlockM queries per step (the dense D = 128
// choice: 32); dQ works through a step's 64 keys in kQKeySplit parts.
template <int kHeadDim> struct LongformerBwdConfigSm80;
template <> struct LongformerBwdConfigSm80<64> {
  static constexpr int kKVBlockM = 64, kKVMinBlocks = 2;
  static constexpr int kQKeySplit = 1, kQMinBlocks = 2;
};
template <> struct LongformerBwdConfigSm80<128> {
  static constexpr int kKVBlockM = 32, kKVMinBlocks = 1;
  static constexpr int kQKeySplit = 2, kQMinBlocks = 1;
};

template <typename Element>
cudaError_t run_longformer_bwd_delta_sm80(const fk_longformer_bwd_params &p, cudaStream_t stream) {
  using namespace longformer_bwd_detail;
  const dim3 grid((p.c.seqlen + kDeltaRows - 1) / kDeltaRows, p.c.heads, p.c.batch);
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
  const int64_t rows =
      int64_t(p.c.batch) * p.c.heads * (kKV ? p.c.k_rows_per_seq : p.c.q_rows_per_seq);
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
      p.c.pass == FK_LONGFORMER_GLOBAL_ROWS ? p.c.q_rows_per_seq : p.c.seqlen);
  if (tiles == 0) return cudaSuccess;
  // Split over keys: the splits of an outer tile are adjacent in x (entry point: x fits).
  const int num_splits = p.num_splits > 1 ? p.num_splits : 1;
  const cudaError_t err =
      launch_kernel(longformer_bwd_dq_kernel<Tr>,
                    dim3(unsigned(tiles) * unsigned(num_splits), p.c.heads, p.c.batch),
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
      p.c.pass == FK_LONGFORMER_GLOBAL_COLS ? p.c.k_rows_per_seq : p.c.seqlen);
  if (tiles == 0) return cudaSuccess;
  // Split over queries: the splits of an outer tile are adjacent in x (entry point: x fits).
  const int num_splits = p.num_splits > 1 ? p.num_splits : 1;
  const cudaError_t err =
      launch_kernel(longformer_bwd_dkdv_kernel<Tr>,
                    dim3(unsigned(tiles) * unsigned(num_splits), p.c.heads, p.c.batch),
                    dim3(Tr::kNThreads), Tr::kSmemBytes, stream, p);
  if (err != cudaSuccess || num_splits == 1) return err;
  return launch_longformer_bwd_reduce<Element, true>(p, stream);
}

} // namespace fk
