// Dense attention backward for Hopper (sm_90a): Delta is dense_bwd_sm80.cuh's kernel 1;
// dK / dV and dQ run on TMA, mbarriers and wgmma, each in its own kernel as on the sm80
// path (every gradient row summed by one block in a fixed order: deterministic, no atomics;
// the price is computing S and P in both, 7 matmuls instead of 5).
//
// Both kernels: three warpgroups, a producer (setmaxnreg.dec) whose elected thread loads
// by TMA (128-byte swizzle, zero fill past the tensor and past head_dim) what a block keeps
// once and, into two stages with `full` (bytes) and `empty` (one arrival per consumer)
// mbarriers, what it streams; two consumers (setmaxnreg.inc) of 64 rows each that run the
// score products by wgmma from shared memory (all K-major), the band (common/mask.cuh) and
// the softmax backward (common/softmax.cuh) on the accumulators (mma.sync's m16n8 fragment
// layout per warp, so common/ runs on them unchanged), then the gradient products by wgmma
// with the left operand from registers and the right one MN-major (as P V in the forward),
// releasing a stage once its last wgmma has retired.
// - dK / dV (first): one block per (128 keys (D 256: 64), kv head, batch) keeps K and V and streams
// Q
//   and dO of every (query head of the GQA group, 64-query block) that sees the keys:
//   S^T = K Q^T, dP^T = V dO^T, P^T, dS^T (the queries' LSE and Delta staged per step in
//   the warpgroup's shared memory), dV += P^T dO, dK += dS^T Q.
// - dQ: one block per (128 queries, head, batch), the last query blocks first (causal: the
//   most work), keeps Q and dO and streams K and V in 64-key (D 256: 32) blocks: S = Q K^T,
//   dP = dO V^T, P, dS, dQ += dS K.
// Varlen batches: the maps span the packed rows (total_q / total_k); rows of a box past the
// sequence are masked or not stored, as in dense_fwd_sm90.cuh. Head dims padded to 64, 128
// and 256; at 256 dK / dV blocks hold 64 keys, whose dV warpgroup 0 accumulates and dK
// warpgroup 1 (one gradient is 128 registers a thread), and dQ streams 32-key stages. Not
// yet here (issue 17): a persistent scheduler, overlap of one step's softmax with another's
// wgmma.
#pragma once

#include "../common/launch.cuh"
#include "../common/sm90.cuh"
#include "../common/sm90_pipeline.cuh"
#include "common/block_info.cuh"
#include "common/mask.cuh"
#include "common/sm90_tiles.cuh"
#include "common/softmax.cuh"
#include "common/tma_maps.cuh"
#include "dense_bwd_sm80.cuh"

namespace fk {

template <int kHeadDim_, typename Element_> struct AttnBwdDqTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "wgmma n of sm90.cuh");
  // D 256: 32-key stages (Q and dO take 128 KB; two stages of K and V another 64 KB).
  static constexpr int kBlockM = 128, kBlockN = kHeadDim == 256 ? 32 : 64;
  static constexpr int kDBlocks = kHeadDim / 64; // 64-column sub-tiles (one swizzle span)
  static constexpr int kConsumers = 2, kLaunchThreads = 384;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2; // Q or dO
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2; // one K or V stage
  static constexpr size_t kBarrierOffset = 2 * size_t(kTileQBytes) + 4 * size_t(kTileKVBytes);
  static constexpr size_t kSmemBytes = kBarrierOffset + 8 * (1 + 2 * 2) + 1024;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
};

template <class Traits, bool kHasMask>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1)
    dense_bwd_dq_sm90_kernel(const __grid_constant__ CUtensorMap map_q,
                             const __grid_constant__ CUtensorMap map_do,
                             const __grid_constant__ CUtensorMap map_k,
                             const __grid_constant__ CUtensorMap map_v,
                             const fk_attention_bwd_params p) {
#ifdef FK_SM90_DEVICE_CODE
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM, BN = Traits::kBlockN;
  constexpr int kSTiles = BN / 8, kOTiles = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char *base = sm90::align_1024(smem_raw);
  unsigned char *sQ = base;
  unsigned char *sdO = sQ + Traits::kTileQBytes;
  unsigned char *sK = sdO + Traits::kTileQBytes;
  unsigned char *sV = sK + 2 * Traits::kTileKVBytes;
  uint64_t *q_full = reinterpret_cast<uint64_t *>(base + Traits::kBarrierOffset);
  uint64_t *kv_full = q_full + 1, *kv_empty = kv_full + 2;

  const int m_block = gridDim.x - 1 - blockIdx.x; // the heaviest (causal: last) first
  const int head = blockIdx.y;
  const attn::SeqInfo seq(p, blockIdx.z);
  const int nq = seq.nq, nk = seq.nk, m0 = m_block * BM;
  if (m0 >= nq) return; // past this sequence's queries (varlen)
  const int diag = nk - nq, wl = p.window_left, wr = p.window_right;
  const int kv_head = head / (p.base.shape.heads / p.base.shape.heads_kv);
  const int map_batch = seq.varlen ? 0 : seq.batch;
  int n_begin, n_end;
  attn::key_blocks<kHasMask>(m0, BM, BN, nq, nk, diag, wl, wr, n_begin, n_end);
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    sm90::mbarrier_init(q_full, 1);
    sm90::init_stage_barriers(kv_full, kv_empty, 2, 1, Traits::kConsumers);
  }
  __syncthreads();

  if (wg == Traits::kConsumers) { // producer
    sm90::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x % 128 == 0 && n_end > n_begin) {
      sm90::mbarrier_arrive_expect_tx(q_full, 2 * Traits::kTileQBytes);
#pragma unroll
      for (int b = 0; b < Traits::kDBlocks; ++b) {
        sm90::tma_load_4d(sQ + b * BM * 128, &map_q, q_full, 64 * b, seq.q_start + m0, head,
                          map_batch);
        sm90::tma_load_4d(sdO + b * BM * 128, &map_do, q_full, 64 * b, seq.q_start + m0, head,
                          map_batch);
      }
      int stage = 0;
      uint32_t phase = 0;
      for (int n = n_begin; n < n_end; ++n) {
        sm90::mbarrier_wait(&kv_empty[stage], phase ^ 1);
        sm90::mbarrier_arrive_expect_tx(&kv_full[stage], 2 * Traits::kTileKVBytes);
        unsigned char *k = sK + stage * Traits::kTileKVBytes;
        unsigned char *v = sV + stage * Traits::kTileKVBytes;
#pragma unroll
        for (int b = 0; b < Traits::kDBlocks; ++b) {
          sm90::tma_load_4d(k + b * BN * 128, &map_k, &kv_full[stage], 64 * b, seq.k_start + n * BN,
                            kv_head, map_batch);
          sm90::tma_load_4d(v + b * BN * 128, &map_v, &kv_full[stage], 64 * b, seq.k_start + n * BN,
                            kv_head, map_batch);
        }
        if (++stage == 2) stage = 0, phase ^= 1;
      }
    }
    return;
  }

  // Consumers: warpgroup wg owns rows m0 + 64 wg .. + 63; this thread rows row0 and row0 + 8.
  sm90::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = 64 * wg + 16 * ((threadIdx.x / 32) % 4); // in the block
  const float scale_log2 = p.base.shape.softmax_scale * attn::kLog2e;
  // LSE (log2 domain) and Delta of this thread's rows (rows past nq: P = 0, dS = 0).
  float l2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    attn::query_stats(p, seq, head, m0 + warp_row0 + g + 8 * r, l2[r], dl[r]);
  float acc[1][kOTiles][4];
  float (&accd)[D / 2] = reinterpret_cast<float (&)[D / 2]>(acc);
#pragma unroll
  for (int e = 0; e < D / 2; ++e) accd[e] = 0.f;

  if (n_end > n_begin) sm90::mbarrier_wait(q_full, 0);
  int stage = 0;
  uint32_t phase = 0;
  for (int n = n_begin; n < n_end; ++n) {
    sm90::mbarrier_wait(&kv_full[stage], phase);
    const unsigned char *k = sK + stage * Traits::kTileKVBytes;
    const unsigned char *v = sV + stage * Traits::kTileKVBytes;

    // S = Q K^T and dP = dO V^T for this warpgroup's 64 rows and the block's BN keys.
    float s[1][kSTiles][4], dp[1][kSTiles][4];
    float (&sd)[BN / 2] = reinterpret_cast<float (&)[BN / 2]>(s);
    float (&dpd)[BN / 2] = reinterpret_cast<float (&)[BN / 2]>(dp);
#pragma unroll
    for (int e = 0; e < BN / 2; ++e) sd[e] = dpd[e] = 0.f;
    sm90::fence_registers(sd);
    sm90::fence_registers(dpd);
    sm90::wgmma_fence();
    attn::wgmma_rows_x_rows<Element, BN, D>(sd, sQ + wg * 64 * 128, BM, k);
    attn::wgmma_rows_x_rows<Element, BN, D>(dpd, sdO + wg * 64 * 128, BM, v);
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_registers(sd);
    sm90::fence_registers(dpd);

    const int n0 = n * BN;
    if (attn::tile_needs_mask<kHasMask>(m0, BM, n0, BN, nq, nk, diag, wl, wr)) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int query = m0 + warp_row0 + g + (e >= 2 ? 8 : 0);
          const int key = n0 + j * 8 + 2 * t + (e & 1);
          if (!attn::visible<kHasMask>(query, key, nq, nk, diag, wl, wr)) s[0][j][e] = -INFINITY;
        }
    }
    attn::probs_rows(s[0], l2, scale_log2); // P
    attn::ds_rows(dp[0], s[0], dl); // dS = P (dP - Delta)

    // dQ += dS K: dS from registers, K MN-major.
    uint32_t af[BN / 16][4];
    uint32_t (&afd)[BN / 4] = reinterpret_cast<uint32_t (&)[BN / 4]>(af);
    attn::pack_a<Element>(dp[0], af);
    sm90::fence_registers(accd);
    sm90::wgmma_fence();
    attn::wgmma_regs_x_rows<Element, D, BN>(accd, af, k);
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_registers(accd);
    sm90::fence_registers(afd);
    if (threadIdx.x % 128 == 0) sm90::mbarrier_arrive(&kv_empty[stage]);
    if (++stage == 2) stage = 0, phase ^= 1;
  }

  // Epilogue: dQ = scale dS K straight from the accumulators (rows without any visible key
  // get zeros; rows past nq and columns past head_dim are not stored).
  Element *dq = static_cast<Element *>(p.dq) +
                seq.q_offset(p.dq_stride.batch, p.dq_stride.row, p.dq_stride.head, head);
  const float scale = p.base.shape.softmax_scale;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp_row0 + g + 8 * r;
    if (row >= nq) continue;
    attn::store_row_pairs(dq + int64_t(row) * p.dq_stride.row, acc[0], r, scale,
                          p.base.shape.head_dim, t);
  }
#endif
}

// dK / dV: one block per (key block of 128 (D 256: 64), kv head, batch). The producer loads K and V
// once and, for every (query head of the GQA group, query block of 64) that sees the key block, Q
// and dO into two stages; each consumer owns 64 keys (D 256: the block's 64, and one of the two
// gradients): S^T = K Q^T and dP^T = V dO^T by wgmma from shared memory, the band, P^T and dS^T on
// the accumulators (the queries are the columns: their LSE and Delta staged per step in this
// warpgroup's shared memory), then dV += P^T dO and dK += dS^T Q by wgmma with P^T / dS^T from
// registers and dO / Q MN-major. GQA's sum over the group is this loop: no atomics, deterministic.
template <int kHeadDim_, typename Element_> struct AttnBwdKVTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "wgmma n of sm90.cuh");
  // D 256: a thread cannot hold both gradients' accumulators (2 x 128 registers), so the
  // consumers split the roles over the same 64 keys: warpgroup 0 accumulates dV, 1 dK.
  static constexpr bool kSplitRoles = kHeadDim == 256;
  static constexpr int kBlockN = kSplitRoles ? 64 : 128, kBlockM = 64; // keys, queries a step
  static constexpr int kDBlocks = kHeadDim / 64;
  static constexpr int kConsumers = 2, kLaunchThreads = 384;
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2; // K or V
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2; // one Q or dO stage
  static constexpr size_t kStatsOffset = 2 * size_t(kTileKVBytes) + 4 * size_t(kTileQBytes);
  // Per consumer, two steps of LSE (log2) and Delta for kBlockM queries.
  static constexpr size_t kBarrierOffset = kStatsOffset + kConsumers * 2 * 2 * kBlockM * 4;
  static constexpr size_t kSmemBytes = kBarrierOffset + 8 * (1 + 2 * 2) + 1024;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
};

template <class Traits, bool kHasMask>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1)
    dense_bwd_dkdv_sm90_kernel(const __grid_constant__ CUtensorMap map_q,
                               const __grid_constant__ CUtensorMap map_do,
                               const __grid_constant__ CUtensorMap map_k,
                               const __grid_constant__ CUtensorMap map_v,
                               const fk_attention_bwd_params p) {
#ifdef FK_SM90_DEVICE_CODE
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, BN = Traits::kBlockN, BM = Traits::kBlockM;
  constexpr int kSTiles = BM / 8, kOTiles = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char *base = sm90::align_1024(smem_raw);
  unsigned char *sK = base;
  unsigned char *sV = sK + Traits::kTileKVBytes;
  unsigned char *sQ = sV + Traits::kTileKVBytes; // two stages
  unsigned char *sdO = sQ + 2 * Traits::kTileQBytes;
  float *stats = reinterpret_cast<float *>(base + Traits::kStatsOffset);
  uint64_t *kv_full = reinterpret_cast<uint64_t *>(base + Traits::kBarrierOffset);
  uint64_t *full = kv_full + 1, *empty = full + 2;

  const int kv_head = blockIdx.y;
  const attn::SeqInfo seq(p, blockIdx.z);
  const int nq = seq.nq, nk = seq.nk, n0 = blockIdx.x * BN;
  if (n0 >= nk) return; // past this sequence's keys (varlen)
  const int diag = nk - nq, wl = p.window_left, wr = p.window_right;
  const int group = p.base.shape.heads / p.base.shape.heads_kv, head0 = kv_head * group;
  const int map_batch = seq.varlen ? 0 : seq.batch;
  int m_begin, n_mblocks;
  attn::query_blocks<kHasMask>(n0, BN, BM, nq, nk, diag, wl, wr, m_begin, n_mblocks);
  const int n_iters = group * n_mblocks; // (query head, query block) pairs, head-major
  const auto iter_head = [&](int it) { return head0 + it / n_mblocks; };
  const auto iter_m0 = [&](int it) { return (m_begin + it % n_mblocks) * BM; };
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    sm90::mbarrier_init(kv_full, 1);
    sm90::init_stage_barriers(full, empty, 2, 1, Traits::kConsumers);
  }
  __syncthreads();

  if (wg == Traits::kConsumers) { // producer
    sm90::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x % 128 == 0 && n_iters > 0) {
      sm90::mbarrier_arrive_expect_tx(kv_full, 2 * Traits::kTileKVBytes);
#pragma unroll
      for (int b = 0; b < Traits::kDBlocks; ++b) {
        sm90::tma_load_4d(sK + b * BN * 128, &map_k, kv_full, 64 * b, seq.k_start + n0, kv_head,
                          map_batch);
        sm90::tma_load_4d(sV + b * BN * 128, &map_v, kv_full, 64 * b, seq.k_start + n0, kv_head,
                          map_batch);
      }
      int stage = 0;
      uint32_t phase = 0;
      for (int it = 0; it < n_iters; ++it) {
        sm90::mbarrier_wait(&empty[stage], phase ^ 1);
        sm90::mbarrier_arrive_expect_tx(&full[stage], 2 * Traits::kTileQBytes);
        unsigned char *q = sQ + stage * Traits::kTileQBytes;
        unsigned char *dout = sdO + stage * Traits::kTileQBytes;
        const int row = seq.q_start + iter_m0(it), h = iter_head(it);
#pragma unroll
        for (int b = 0; b < Traits::kDBlocks; ++b) {
          sm90::tma_load_4d(q + b * BM * 128, &map_q, &full[stage], 64 * b, row, h, map_batch);
          sm90::tma_load_4d(dout + b * BM * 128, &map_do, &full[stage], 64 * b, row, h, map_batch);
        }
        if (++stage == 2) stage = 0, phase ^= 1;
      }
    }
    return;
  }

  // Consumers. Without split roles warpgroup wg owns keys n0 + 64 wg .. + 63 and both their
  // gradients; with them both own keys n0 .. + 63, warpgroup 0 their dV, 1 their dK. This
  // thread: keys row0 and row0 + 8 of its warp's 16.
  sm90::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, tid = threadIdx.x % 128;
  const int wg_key0 = Traits::kSplitRoles ? 0 : 64 * wg; // in the block
  const int warp_row0 = wg_key0 + 16 * ((threadIdx.x / 32) % 4);
  const float scale_log2 = p.base.shape.softmax_scale * attn::kLog2e;
  float *my_stats = stats + wg * 2 * 2 * BM; // [step parity][lse2 | delta][BM]

  // One consumer's work, for the gradients its role accumulates (compile-time flags).
  const auto consume = [&](auto dv_role, auto dk_role) {
    constexpr bool kDv = decltype(dv_role)::value, kDk = decltype(dk_role)::value;
    constexpr int kGrads = int(kDv) + int(kDk);
    float grad[kGrads][1][kOTiles][4]; // dV (where kDv) first, then dK
    float (&dvd)[D / 2] = reinterpret_cast<float (&)[D / 2]>(grad[0]);
    float (&dkd)[D / 2] = reinterpret_cast<float (&)[D / 2]>(grad[kGrads - 1]);
#pragma unroll
    for (int i = 0; i < kGrads; ++i)
#pragma unroll
      for (int e = 0; e < D / 2; ++e) reinterpret_cast<float (&)[D / 2]>(grad[i])[e] = 0.f;

    if (n_iters > 0) sm90::mbarrier_wait(kv_full, 0);
    int stage = 0;
    uint32_t phase = 0;
    for (int it = 0; it < n_iters; ++it) {
      const int h = iter_head(it), m0 = iter_m0(it);
      // This step's queries' LSE (log2) and Delta into the warpgroup's buffer of this step's
      // parity (the barrier of the step before ordered every read of it).
      float *lse_s = my_stats + (it & 1) * 2 * BM, *delta_s = lse_s + BM;
      if (tid < BM) attn::query_stats(p, seq, h, m0 + tid, lse_s[tid], delta_s[tid]);
      sm90::named_barrier_sync(2 + wg, 128);
      sm90::mbarrier_wait(&full[stage], phase);
      const unsigned char *q = sQ + stage * Traits::kTileQBytes;
      const unsigned char *dout = sdO + stage * Traits::kTileQBytes;

      // S^T = K Q^T (and for dK dP^T = V dO^T) for this warpgroup's 64 keys and the step's
      // BM queries.
      float s[1][kSTiles][4], dp[1][kSTiles][4];
      float (&sd)[BM / 2] = reinterpret_cast<float (&)[BM / 2]>(s);
      float (&dpd)[BM / 2] = reinterpret_cast<float (&)[BM / 2]>(dp);
#pragma unroll
      for (int e = 0; e < BM / 2; ++e) sd[e] = 0.f;
      sm90::fence_registers(sd);
      if constexpr (kDk) {
#pragma unroll
        for (int e = 0; e < BM / 2; ++e) dpd[e] = 0.f;
        sm90::fence_registers(dpd);
      }
      sm90::wgmma_fence();
      attn::wgmma_rows_x_rows<Element, BM, D>(sd, sK + wg_key0 * 128, BN, q);
      if constexpr (kDk) attn::wgmma_rows_x_rows<Element, BM, D>(dpd, sV + wg_key0 * 128, BN, dout);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_registers(sd);
      if constexpr (kDk) sm90::fence_registers(dpd);

      if (attn::tile_needs_mask<kHasMask>(m0, BM, n0, BN, nq, nk, diag, wl, wr)) {
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = n0 + warp_row0 + g + (e >= 2 ? 8 : 0);
            const int query = m0 + j * 8 + 2 * t + (e & 1);
            if (!attn::visible<kHasMask>(query, key, nq, nk, diag, wl, wr)) s[0][j][e] = -INFINITY;
          }
      }
      attn::probs_cols(s[0], lse_s, scale_log2, t); // P^T
      if constexpr (kDk) attn::ds_cols(dp[0], s[0], delta_s, t); // dS^T = P^T (dP^T - Delta)

      // dV += P^T dO and dK += dS^T Q: P^T, dS^T from registers, dO and Q MN-major.
      uint32_t pf[BM / 16][4], af[BM / 16][4];
      uint32_t (&pfd)[BM / 4] = reinterpret_cast<uint32_t (&)[BM / 4]>(pf);
      uint32_t (&afd)[BM / 4] = reinterpret_cast<uint32_t (&)[BM / 4]>(af);
      if constexpr (kDv) {
        attn::pack_a<Element>(s[0], pf);
        sm90::fence_registers(dvd);
      }
      if constexpr (kDk) {
        attn::pack_a<Element>(dp[0], af);
        sm90::fence_registers(dkd);
      }
      sm90::wgmma_fence();
      if constexpr (kDv) attn::wgmma_regs_x_rows<Element, D, BM>(dvd, pf, dout);
      if constexpr (kDk) attn::wgmma_regs_x_rows<Element, D, BM>(dkd, af, q);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      if constexpr (kDv) {
        sm90::fence_registers(dvd);
        sm90::fence_registers(pfd);
      }
      if constexpr (kDk) {
        sm90::fence_registers(dkd);
        sm90::fence_registers(afd);
      }
      if (threadIdx.x % 128 == 0) sm90::mbarrier_arrive(&empty[stage]);
      if (++stage == 2) stage = 0, phase ^= 1;
    }

    // Epilogue: dK = scale dS^T Q, dV straight from the accumulators (keys no query sees
    // get zeros; keys past nk and columns past head_dim are not stored).
    Element *dkp = static_cast<Element *>(p.dk) +
                   seq.k_offset(p.dk_stride.batch, p.dk_stride.row, p.dk_stride.head, kv_head);
    Element *dvp = static_cast<Element *>(p.dv) +
                   seq.k_offset(p.dv_stride.batch, p.dv_stride.row, p.dv_stride.head, kv_head);
    const float scale = p.base.shape.softmax_scale;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = n0 + warp_row0 + g + 8 * r;
      if (key >= nk) continue;
      if constexpr (kDk)
        attn::store_row_pairs(dkp + int64_t(key) * p.dk_stride.row, grad[kGrads - 1][0], r, scale,
                              p.base.shape.head_dim, t);
      if constexpr (kDv)
        attn::store_row_pairs(dvp + int64_t(key) * p.dv_stride.row, grad[0][0], r, 1.f,
                              p.base.shape.head_dim, t);
    }
  };
  if constexpr (Traits::kSplitRoles) {
    if (wg == 0)
      consume(std::true_type(), std::false_type());
    else
      consume(std::false_type(), std::true_type());
  } else {
    consume(std::true_type(), std::true_type());
  }
#endif
}

template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_bwd_sm90(const fk_attention_bwd_params &p, cudaStream_t stream) {
  using Q = AttnBwdDqTraitsSm90<kHeadDim, Element>;
  using KV = AttnBwdKVTraitsSm90<kHeadDim, Element>;
  constexpr bool kBf16 = std::is_same<Element, __nv_bfloat16>::value;
  const fk_attention_shape &s = p.base.shape;
  cudaError_t err = run_dense_bwd_delta_sm80<Element>(p, stream);
  if (err != cudaSuccess) return err;
  const MapExtent e(p);
  // Q and dO in boxes of each kernel's query rows, K and V of its key rows.
  CUtensorMap mq, mdo, mk, mv;
  const auto maps = [&](int q_rows, int k_rows) {
    cudaError_t r;
    if ((r = attention_map(&mq, p.base.q, p.base.q_stride, e.rows_q, s.heads, e.batch, s.head_dim,
                           q_rows, kBf16)) ||
        (r = attention_map(&mdo, p.dout, p.do_stride, e.rows_q, s.heads, e.batch, s.head_dim,
                           q_rows, kBf16)) ||
        (r = attention_map(&mk, p.base.k, p.base.k_stride, e.rows_k, s.heads_kv, e.batch,
                           s.head_dim, k_rows, kBf16)) ||
        (r = attention_map(&mv, p.base.v, p.base.v_stride, e.rows_k, s.heads_kv, e.batch,
                           s.head_dim, k_rows, kBf16)))
      return r;
    return cudaSuccess;
  };
  if ((err = maps(KV::kBlockM, KV::kBlockN))) return err;
  const dim3 kv_grid((s.seqlen_k + KV::kBlockN - 1) / KV::kBlockN, s.heads_kv, s.batch);
  err = launch_kernel_sm90(dense_bwd_dkdv_sm90_kernel<KV, kHasMask>, kv_grid,
                           dim3(KV::kLaunchThreads), KV::kSmemBytes, stream, mq, mdo, mk, mv, p);
  if (err != cudaSuccess || s.seqlen_q == 0) return err;
  if ((err = maps(Q::kBlockM, Q::kBlockN))) return err;
  const dim3 q_grid((s.seqlen_q + Q::kBlockM - 1) / Q::kBlockM, s.heads, s.batch);
  return launch_kernel_sm90(dense_bwd_dq_sm90_kernel<Q, kHasMask>, q_grid, dim3(Q::kLaunchThreads),
                            Q::kSmemBytes, stream, mq, mdo, mk, mv, p);
}

} // namespace fk
