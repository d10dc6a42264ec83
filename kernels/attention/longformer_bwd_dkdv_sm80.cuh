// Longformer attention backward (longformer_bwd_sm80.cuh): the dK/dV kernel (passes
// LOCAL_BAND, GLOBAL_COLS, GLOBAL_ROWS).
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
  const fk_attention_shape &sh = p.base.shape;
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
  const int chunks_valid = sh.head_dim / 8;
  const int n0 = n_block * BN; // entry of the outer (key) rows

  const LongformerRule rule(c, sh.seqlen_q, batch, head);
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
  const float scale_log2 = sh.softmax_scale * kLog2e;

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
  // This thread's first key row (warp_row0 + g), from a fresh thread index: held through
  // the loop it was the one spilled register (D = 128).
  const int row_g = [] {
    const int tid_e = fresh_thread_idx();
    return (tid_e / 32) * 16 + (tid_e % 32) / 4;
  }();
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
        ((int64_t(blockIdx.x % p.num_splits) * sh.batch + batch) * sh.heads + head) *
            c.k_rows_per_seq +
        (kTokInSmem ? sKtok[BN] : n0);
    const int64_t dv_off =
        int64_t(p.num_splits) * sh.batch * sh.heads * c.k_rows_per_seq * sh.head_dim;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (key_i[r] < 0) continue;
      float *pk = p.partial + (ws_row0 + row_g + 8 * r) * sh.head_dim + 2 * t;
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
        *pk = ET::pack(fmaf(acc[kDk][i][2 * r], sh.softmax_scale, ok.x),
                       fmaf(acc[kDk][i][2 * r + 1], sh.softmax_scale, ok.y));
        *pv = ET::pack(acc[kDv][i][2 * r] + ov.x, acc[kDv][i][2 * r + 1] + ov.y);
      }
    }
    return;
  }
  // Overwrite: every row with a token (the tile's keys, or the listed ones for
  // GLOBAL_COLS), staged in this warp's rows of sK / sV for 16-byte stores.
#pragma unroll
  for (int r = 0; r < 2; ++r) stage_row<D>(sK, row_g + 8 * r, acc[kDk], r, sh.softmax_scale, t);
#pragma unroll
  for (int r = 0; r < 2; ++r) stage_row<D>(sV, row_g + 8 * r, acc[kDv], r, 1.f, t);
  int *tok_s = sKtok; // the tokens of the rows (D = 128: written before the loop)
  if (!kTokInSmem && lane < 16) tok_s[warp_row0 + lane] = krows.token(n0 + warp_row0 + lane);
  __syncwarp();
  auto staged_token = [&](int r) { return tok_s[r]; };
  store_rows<D, 16>(dk, p.dk_stride.row, sK, warp_row0, token_rows(staged_token), chunks_valid,
                    lane);
  store_rows<D, 16>(dv, p.dv_stride.row, sV, warp_row0, token_rows(staged_token), chunks_valid,
                    lane);
}

} // namespace longformer_bwd_detail
} // namespace fk
