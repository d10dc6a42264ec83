// Dense attention backward for Hopper (sm_90a): Delta is dense_bwd_sm80.cuh's kernel 1;
// dK / dV and dQ run on TMA, mbarriers and wgmma, each in its own kernel as on the sm80
// path (every gradient row summed by one block in a fixed order: deterministic, no atomics;
// the price is computing S and P in both, 7 matmuls instead of 5).
//
// Both kernels: persistent grids (one block per multiprocessor at most, walking tiles in
// attn::TileCoords' order: heaviest first under causal masking) of three warpgroups, a
// producer (setmaxnreg.dec) whose elected thread loads by TMA (128-byte swizzle, zero fill
// past the tensor and past head_dim) what a tile keeps (with its own full / empty pair, so
// the next tile's load waits for the consumers to be done with it) and, into two stages
// with `full` (bytes) and `empty` (one arrival per consumer) mbarriers, what it streams;
// two consumers (setmaxnreg.inc) of 64 rows each that run the score products by wgmma from
// shared memory (all K-major), the band (common/mask.cuh) and the softmax backward
// (common/softmax.cuh) on the accumulators (mma.sync's m16n8 fragment layout per warp, so
// common/ runs on them unchanged), then the gradient products by wgmma with the left
// operand from registers and the right one MN-major (as P V in the forward), releasing a
// stage once its last wgmma has retired. Overlap (as the forward's P V): a turn issues the
// next step's score products before the last step's gradient product, and runs the
// softmax backward while the latter is in flight (dQ at every head dim; dK / dV at D 64,
// the only one where the extra live registers fit).
// - dK / dV (first): tiles of (128 keys (D 256: 64), kv head, batch), the first key blocks
//   first; a tile keeps K and V and streams Q and dO of every (query head of the GQA group,
//   64-query block) that sees the keys: S^T = K Q^T, dP^T = V dO^T, P^T, dS^T (the
//   queries' LSE and Delta staged per step in the warpgroup's shared memory), dV += P^T dO,
//   dK += dS^T Q.
// - dQ: tiles of (128 queries, head, batch), the last query blocks first; a tile keeps Q
//   and dO and streams K and V in 64-key (D 256: 32) blocks: S = Q K^T, dP = dO V^T, P, dS,
//   dQ += dS K.
// Varlen batches: the maps span the packed rows (total_q / total_k); rows of a box past the
// sequence are masked or not stored, as in dense_fwd_sm90.cuh. Head dims padded to 64, 128
// and 256; at 256 dK / dV blocks hold 64 keys, whose dV warpgroup 0 accumulates and dK
// warpgroup 1 (one gradient is 128 registers a thread), and dQ streams 32-key stages.
#pragma once

#include "../common/launch.cuh"
#include "../common/persistent.cuh"
#include "../common/sm90.cuh"
#include "../common/sm90_pipeline.cuh"
#include "common/block_info.cuh"
#include "common/mask.cuh"
#include "common/sm90_tiles.cuh"
#include "common/softmax.cuh"
#include "common/tma_maps.cuh"
#include "dense_bwd_sm80.cuh"

namespace fk {

template <int kHeadDim_, typename Element_>
struct AttnBwdDqTraitsSm90 : attn::WarpgroupTraitsSm90<kHeadDim_, Element_> {
  using Base = attn::WarpgroupTraitsSm90<kHeadDim_, Element_>;
  using Base::kHeadDim, Base::kConsumers;
  // D 256: 32-key stages (Q and dO take 128 KB; two stages of K and V another 64 KB).
  static constexpr int kBlockM = 128, kBlockN = kHeadDim == 256 ? 32 : 64;
  // Overlap of the softmax backward with the last block's dQ product: where the registers
  // allow (ptxas: D 256 spilled 28-36 bytes with it).
  static constexpr bool kOverlap = kHeadDim <= 128;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2; // Q or dO
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2; // one K or V stage
  static constexpr size_t kBarrierOffset = 2 * size_t(kTileQBytes) + 4 * size_t(kTileKVBytes);
  static constexpr size_t kSmemBytes = kBarrierOffset + 8 * (2 + 2 * 2) + 1024;
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
  uint64_t *q_empty = q_full + 1, *kv_full = q_full + 2, *kv_empty = kv_full + 2;

  const int heads = p.base.shape.heads, group = heads / p.base.shape.heads_kv;
  const int wl = p.window_left, wr = p.window_right;
  const int m_blocks = (p.base.shape.seqlen_q + BM - 1) / BM; // of the longest sequence
  const int tiles = m_blocks * heads * p.base.shape.batch;
  // Persistent: block b takes tiles b, b + gridDim.x, ... in attn::QueryTile's order (the
  // last query blocks of every head first: the heaviest under causal masking).
  const auto tile_at = [&](int i) { return attn::QueryTile::at<kHasMask, BM, BN>(p, i, m_blocks); };
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    sm90::init_stage_barriers(q_full, q_empty, 1, 1, Traits::kConsumers);
    sm90::init_stage_barriers(kv_full, kv_empty, 2, 1, Traits::kConsumers);
  }
  __syncthreads();

  if (wg == Traits::kConsumers) { // producer
    sm90::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x % 128 == 0) {
      int stage = 0;
      uint32_t phase = 0, q_phase = 0;
      for (int i = blockIdx.x; i < tiles; i += gridDim.x) {
        const attn::QueryTile tl = tile_at(i);
        if (!tl.any_keys()) continue; // nothing to load
        sm90::mbarrier_wait(q_empty, q_phase ^ 1); // the consumers are done with the last Q, dO
        sm90::mbarrier_arrive_expect_tx(q_full, 2 * Traits::kTileQBytes);
        const int row = tl.seq.q_start + tl.m0;
#pragma unroll
        for (int b = 0; b < Traits::kDBlocks; ++b) {
          sm90::tma_load_4d(sQ + b * BM * 128, &map_q, q_full, 64 * b, row, tl.head, tl.map_batch);
          sm90::tma_load_4d(sdO + b * BM * 128, &map_do, q_full, 64 * b, row, tl.head,
                            tl.map_batch);
        }
        q_phase ^= 1;
        const int kv_head = tl.head / group;
        for (int n = tl.n_begin; n < tl.n_end; ++n) {
          sm90::mbarrier_wait(&kv_empty[stage], phase ^ 1);
          sm90::mbarrier_arrive_expect_tx(&kv_full[stage], 2 * Traits::kTileKVBytes);
          unsigned char *k = sK + stage * Traits::kTileKVBytes;
          unsigned char *v = sV + stage * Traits::kTileKVBytes;
          const int key_row = tl.seq.k_start + n * BN;
#pragma unroll
          for (int b = 0; b < Traits::kDBlocks; ++b) {
            sm90::tma_load_4d(k + b * BN * 128, &map_k, &kv_full[stage], 64 * b, key_row, kv_head,
                              tl.map_batch);
            sm90::tma_load_4d(v + b * BN * 128, &map_v, &kv_full[stage], 64 * b, key_row, kv_head,
                              tl.map_batch);
          }
          if (++stage == 2) stage = 0, phase ^= 1;
        }
      }
    }
    return;
  }

  // Consumers: warpgroup wg owns rows m0 + 64 wg .. + 63; this thread rows row0 and row0 + 8.
  sm90::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = 64 * wg + 16 * ((threadIdx.x / 32) % 4); // in the block
  const float scale_log2 = p.base.shape.softmax_scale * attn::kLog2e;
  int stage = 0;
  uint32_t phase = 0, q_phase = 0;
  for (int i = blockIdx.x; i < tiles; i += gridDim.x) {
    const attn::QueryTile tl = tile_at(i);
    if (tl.empty()) continue;
    const int m0 = tl.m0, nq = tl.seq.nq, nk = tl.seq.nk, diag = tl.diag;
    // LSE (log2 domain) and Delta of this thread's rows (rows past nq: P = 0, dS = 0).
    float l2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
      attn::query_stats(p, tl.seq, tl.head, m0 + warp_row0 + g + 8 * r, l2[r], dl[r]);
    float acc[1][kOTiles][4];
    float (&accd)[D / 2] = reinterpret_cast<float (&)[D / 2]>(acc);
#pragma unroll
    for (int e = 0; e < D / 2; ++e) accd[e] = 0.f;

    // A tile without visible keys reads no Q (as in dense_fwd_sm90.cuh: it neither waits
    // for one nor releases it).
    if (tl.any_keys()) {
      sm90::mbarrier_wait(q_full, q_phase);
      q_phase ^= 1;
    }
    // Overlap (kOverlap): one turn issues S_n = Q K_n^T, dP_n = dO V_n^T and then dQ +=
    // dS_{n-1} K_{n-1}; the softmax backward of block n runs while that product is in
    // flight. The first turn issues no dQ product, one more turn the last. Without it a
    // turn issues its own block's product once dS is packed. What a turn issues is a
    // compile-time property of the turn (as in dense_fwd_sm90.cuh: run-time flags make
    // ptxas serialize every wgmma).
    uint32_t af[BN / 16][4]; // dS as mma.sync A fragments: read by the product in flight
    uint32_t (&afd)[BN / 4] = reinterpret_cast<uint32_t (&)[BN / 4]>(af);
    int prev_stage = 0; // overlap: the stage of dS_{n-1}'s K
    // dQ += dS K (dS from registers, K of stage st MN-major); its retirement and the stage's
    // release.
    const auto issue_dq = [&](int st) {
      sm90::wgmma_fence();
      sm90::fence_registers(accd);
      attn::wgmma_regs_x_rows<Element, D, BN>(accd, af, sK + st * Traits::kTileKVBytes);
      sm90::wgmma_commit();
    };
    const auto retire_dq = [&](int st) {
      sm90::wgmma_wait<0>();
      sm90::fence_registers(accd);
      sm90::fence_registers(afd); // dS's registers stay untouched until here
      if (threadIdx.x % 128 == 0) sm90::mbarrier_arrive(&kv_empty[st]);
    };
    const auto turn = [&](int n, auto has_s, auto has_dq) {
      constexpr bool kS = decltype(has_s)::value, kDQ = decltype(has_dq)::value;
      if constexpr (kS) sm90::mbarrier_wait(&kv_full[stage], phase);
      const unsigned char *k = sK + stage * Traits::kTileKVBytes;
      const unsigned char *v = sV + stage * Traits::kTileKVBytes;

      float s[1][kSTiles][4], dp[1][kSTiles][4];
      float (&sd)[BN / 2] = reinterpret_cast<float (&)[BN / 2]>(s);
      float (&dpd)[BN / 2] = reinterpret_cast<float (&)[BN / 2]>(dp);
      if constexpr (kS) {
#pragma unroll
        for (int e = 0; e < BN / 2; ++e) sd[e] = dpd[e] = 0.f;
        sm90::fence_registers(sd);
        sm90::fence_registers(dpd);
      }
      sm90::wgmma_fence();
      if constexpr (kS) { // S = Q K^T, dP = dO V^T for this warpgroup's 64 rows and BN keys
        attn::wgmma_rows_x_rows<Element, BN, D>(sd, sQ + wg * 64 * 128, BM, k);
        attn::wgmma_rows_x_rows<Element, BN, D>(dpd, sdO + wg * 64 * 128, BM, v);
        sm90::wgmma_commit();
      }
      if constexpr (kDQ) issue_dq(prev_stage);
      if constexpr (kS) {
        sm90::wgmma_wait<kDQ ? 1 : 0>(); // S and dP have retired (groups retire in order)
        sm90::fence_registers(sd);
        sm90::fence_registers(dpd);
        // The last key block's S and dP were the last reads of Q and dO.
        if (n + 1 == tl.n_end && threadIdx.x % 128 == 0) sm90::mbarrier_arrive(q_empty);
        const int n0 = n * BN;
        if (attn::tile_needs_mask<kHasMask>(m0, BM, n0, BN, nq, nk, diag, wl, wr)) {
          attn::band_query_rows<kHasMask>(s[0], m0 + warp_row0 + g, n0 + 2 * t, nq, nk, diag, wl,
                                          wr);
        }
        attn::probs_rows(s[0], l2, scale_log2); // P (overlaps the dQ product in flight)
        attn::ds_rows(dp[0], s[0], dl);         // dS = P (dP - Delta)
      }
      if constexpr (kDQ) retire_dq(prev_stage);
      if constexpr (kS) {
        attn::pack_a<Element>(dp[0], af);
        if constexpr (Traits::kOverlap) {
          prev_stage = stage;
        } else {
          issue_dq(stage);
          retire_dq(stage);
        }
        if (++stage == 2) stage = 0, phase ^= 1;
      }
    };
    if (tl.any_keys()) {
      const std::integral_constant<bool, Traits::kOverlap> overlap;
      turn(tl.n_begin, std::true_type(), std::false_type());
      for (int n = tl.n_begin + 1; n < tl.n_end; ++n) turn(n, std::true_type(), overlap);
      if constexpr (Traits::kOverlap) turn(tl.n_end, std::false_type(), std::true_type());
    }

    // Epilogue: dQ = scale dS K straight from the accumulators (rows without any visible
    // key get zeros; rows past nq and columns past head_dim are not stored).
    Element *dq = static_cast<Element *>(p.dq) +
                  tl.seq.q_offset(p.dq_stride.batch, p.dq_stride.row, p.dq_stride.head, tl.head);
    const float scale = p.base.shape.softmax_scale;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp_row0 + g + 8 * r;
      if (row >= nq) continue;
      attn::store_row_pairs(dq + int64_t(row) * p.dq_stride.row, acc[0], r, scale,
                            p.base.shape.head_dim, t);
    }
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
template <int kHeadDim_, typename Element_>
struct AttnBwdKVTraitsSm90 : attn::WarpgroupTraitsSm90<kHeadDim_, Element_> {
  using Base = attn::WarpgroupTraitsSm90<kHeadDim_, Element_>;
  using Base::kHeadDim, Base::kConsumers;
  // D 256: a thread cannot hold both gradients' accumulators (2 x 128 registers), so the
  // consumers split the roles over the same 64 keys: warpgroup 0 accumulates dV, 1 dK.
  static constexpr bool kSplitRoles = kHeadDim == 256;
  // Overlap (in the kernel) keeps step it - 1's packed P^T / dS^T live next to step it's
  // S^T / dP^T and the gradients: only at D 64 does that fit the 240 registers (ptxas: D 128
  // spilled 100-120 bytes, D 256 24-40 in its dK role and 4-24 in its dV role).
  static constexpr bool kOverlap = kHeadDim == 64;
  static constexpr int kBlockN = kSplitRoles ? 64 : 128, kBlockM = 64; // keys, queries a step
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2; // K or V
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2; // one Q or dO stage
  static constexpr size_t kStatsOffset = 2 * size_t(kTileKVBytes) + 4 * size_t(kTileQBytes);
  // Per consumer, two steps of LSE (log2) and Delta for kBlockM queries.
  static constexpr size_t kBarrierOffset = kStatsOffset + kConsumers * 2 * 2 * kBlockM * 4;
  static constexpr size_t kSmemBytes = kBarrierOffset + 8 * (2 + 2 * 2) + 1024;
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
  uint64_t *kv_empty = kv_full + 1, *full = kv_full + 2, *empty = full + 2;

  const int heads_kv = p.base.shape.heads_kv, group = p.base.shape.heads / heads_kv;
  const int wl = p.window_left, wr = p.window_right;
  const int n_blocks = (p.base.shape.seqlen_k + BN - 1) / BN; // of the longest sequence
  const int tiles = n_blocks * heads_kv * p.base.shape.batch;
  // Persistent: block b takes tiles b, b + gridDim.x, ... (attn::TileCoords: the first key
  // blocks of every kv head first, the most queries see them under causal masking). A
  // tile's steps are the (query head of the GQA group, query block) pairs that see its
  // keys, head-major; a varlen sequence shorter than the longest skips its tiles past its
  // end (`empty`).
  struct Tile {
    attn::SeqInfo seq;
    int n0, kv_head, m_begin, n_mblocks, diag, map_batch, group;
    __device__ bool empty() const { return n0 >= seq.nk; }
    __device__ int steps() const { return empty() ? 0 : group * n_mblocks; }
    __device__ int step_head(int it) const { return kv_head * group + it / n_mblocks; }
    __device__ int step_m0(int it) const { return (m_begin + it % n_mblocks) * BM; }
  };
  const auto tile_at = [&](int i) {
    const attn::TileCoords c(i, n_blocks, heads_kv, p.base.shape.batch, false);
    Tile t{attn::SeqInfo(p, c.batch), c.block * BN, c.head, 0, 0, 0, 0, group};
    t.diag = t.seq.nk - t.seq.nq;
    t.map_batch = t.seq.varlen ? 0 : t.seq.batch;
    attn::query_blocks<kHasMask>(t.n0, BN, BM, t.seq.nq, t.seq.nk, t.diag, wl, wr, t.m_begin,
                                 t.n_mblocks);
    return t;
  };
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    sm90::init_stage_barriers(kv_full, kv_empty, 1, 1, Traits::kConsumers);
    sm90::init_stage_barriers(full, empty, 2, 1, Traits::kConsumers);
  }
  __syncthreads();

  if (wg == Traits::kConsumers) { // producer
    sm90::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x % 128 == 0) {
      int stage = 0;
      uint32_t phase = 0, kv_phase = 0;
      for (int i = blockIdx.x; i < tiles; i += gridDim.x) {
        const Tile tl = tile_at(i);
        const int n_iters = tl.steps();
        if (n_iters == 0) continue; // nothing to load
        sm90::mbarrier_wait(kv_empty, kv_phase ^ 1); // the consumers are done with the last K, V
        sm90::mbarrier_arrive_expect_tx(kv_full, 2 * Traits::kTileKVBytes);
        const int key_row = tl.seq.k_start + tl.n0;
#pragma unroll
        for (int b = 0; b < Traits::kDBlocks; ++b) {
          sm90::tma_load_4d(sK + b * BN * 128, &map_k, kv_full, 64 * b, key_row, tl.kv_head,
                            tl.map_batch);
          sm90::tma_load_4d(sV + b * BN * 128, &map_v, kv_full, 64 * b, key_row, tl.kv_head,
                            tl.map_batch);
        }
        kv_phase ^= 1;
        for (int it = 0; it < n_iters; ++it) {
          sm90::mbarrier_wait(&empty[stage], phase ^ 1);
          sm90::mbarrier_arrive_expect_tx(&full[stage], 2 * Traits::kTileQBytes);
          unsigned char *q = sQ + stage * Traits::kTileQBytes;
          unsigned char *dout = sdO + stage * Traits::kTileQBytes;
          const int row = tl.seq.q_start + tl.step_m0(it), h = tl.step_head(it);
#pragma unroll
          for (int b = 0; b < Traits::kDBlocks; ++b) {
            sm90::tma_load_4d(q + b * BM * 128, &map_q, &full[stage], 64 * b, row, h, tl.map_batch);
            sm90::tma_load_4d(dout + b * BM * 128, &map_do, &full[stage], 64 * b, row, h,
                              tl.map_batch);
          }
          if (++stage == 2) stage = 0, phase ^= 1;
        }
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
    constexpr bool kOverlap = Traits::kOverlap;
    int stage = 0, step = 0; // step: every step of this block's tiles (the stats' parity)
    uint32_t phase = 0, kv_phase = 0;
    for (int i = blockIdx.x; i < tiles; i += gridDim.x) {
      const Tile tl = tile_at(i);
      if (tl.empty()) continue;
      const int n0 = tl.n0, nq = tl.seq.nq, nk = tl.seq.nk, diag = tl.diag;
      const int n_iters = tl.steps();
      float grad[kGrads][1][kOTiles][4]; // dV (where kDv) first, then dK
      float (&dvd)[D / 2] = reinterpret_cast<float (&)[D / 2]>(grad[0]);
      float (&dkd)[D / 2] = reinterpret_cast<float (&)[D / 2]>(grad[kGrads - 1]);
#pragma unroll
      for (int e = 0; e < D / 2; ++e) dvd[e] = dkd[e] = 0.f;

      // A tile no query sees reads no K, V (neither waits for them nor releases them).
      if (n_iters > 0) {
        sm90::mbarrier_wait(kv_full, kv_phase);
        kv_phase ^= 1;
      }
      // Overlap (kOverlap): one turn issues S^T and dP^T of step it and then the gradient
      // products of step it - 1; the softmax backward of step it runs while those are in
      // flight. The first turn issues no gradient product, one more turn the last. Without
      // it a turn issues its own step's products once P^T / dS^T are packed.
      uint32_t pf[BM / 16][4], af[BM / 16][4]; // P^T, dS^T: read by the products in flight
      uint32_t (&pfd)[BM / 4] = reinterpret_cast<uint32_t (&)[BM / 4]>(pf);
      uint32_t (&afd)[BM / 4] = reinterpret_cast<uint32_t (&)[BM / 4]>(af);
      // dV += P^T dO, dK += dS^T Q of the step whose Q and dO are in stage st: P^T, dS^T from
      // registers, dO and Q MN-major; then their retirement and the stage's release.
      const auto issue_grads = [&](int st) {
        sm90::wgmma_fence();
        if constexpr (kDv) {
          sm90::fence_registers(dvd);
          attn::wgmma_regs_x_rows<Element, D, BM>(dvd, pf, sdO + st * Traits::kTileQBytes);
        }
        if constexpr (kDk) {
          sm90::fence_registers(dkd);
          attn::wgmma_regs_x_rows<Element, D, BM>(dkd, af, sQ + st * Traits::kTileQBytes);
        }
        sm90::wgmma_commit();
      };
      const auto retire_grads = [&](int st) {
        sm90::wgmma_wait<0>();
        if constexpr (kDv) {
          sm90::fence_registers(dvd);
          sm90::fence_registers(pfd); // untouched until the product reading them retired
        }
        if constexpr (kDk) {
          sm90::fence_registers(dkd);
          sm90::fence_registers(afd);
        }
        if (tid == 0) sm90::mbarrier_arrive(&empty[st]);
      };
      int prev_stage = 0; // overlap: the stage of step it - 1's Q and dO
      // One turn: step it's score products and softmax backward (kS), step it - 1's
      // gradient products (kGrad, overlap only). Compile-time flags, as in dQ.
      const auto turn = [&](int it, auto has_s, auto has_grad) {
        constexpr bool kS = decltype(has_s)::value, kGrad = decltype(has_grad)::value;
        const int m0 = tl.step_m0(it);
        // This step's queries' LSE (log2) and Delta into the warpgroup's buffer of this
        // step's parity (the barrier of the step before ordered every read of it).
        float *lse_s = my_stats + (step & 1) * 2 * BM, *delta_s = lse_s + BM;
        if constexpr (kS) {
          if (tid < BM)
            attn::query_stats(p, tl.seq, tl.step_head(it), m0 + tid, lse_s[tid], delta_s[tid]);
          sm90::named_barrier_sync(2 + wg, 128);
          sm90::mbarrier_wait(&full[stage], phase);
        }

        // S^T = K Q^T (and for dK dP^T = V dO^T) for this warpgroup's 64 keys and the
        // step's BM queries.
        float s[1][kSTiles][4], dp[1][kSTiles][4];
        float (&sd)[BM / 2] = reinterpret_cast<float (&)[BM / 2]>(s);
        float (&dpd)[BM / 2] = reinterpret_cast<float (&)[BM / 2]>(dp);
        if constexpr (kS) {
#pragma unroll
          for (int e = 0; e < BM / 2; ++e) sd[e] = dpd[e] = 0.f;
          sm90::fence_registers(sd);
          if constexpr (kDk) sm90::fence_registers(dpd);
          sm90::wgmma_fence();
          attn::wgmma_rows_x_rows<Element, BM, D>(sd, sK + wg_key0 * 128, BN,
                                                  sQ + stage * Traits::kTileQBytes);
          if constexpr (kDk)
            attn::wgmma_rows_x_rows<Element, BM, D>(dpd, sV + wg_key0 * 128, BN,
                                                    sdO + stage * Traits::kTileQBytes);
          sm90::wgmma_commit();
        }
        if constexpr (kGrad) issue_grads(prev_stage);
        if constexpr (kS) {
          sm90::wgmma_wait<kGrad ? 1 : 0>(); // S^T (dP^T) retired (groups retire in order)
          sm90::fence_registers(sd);
          if constexpr (kDk) sm90::fence_registers(dpd);
          // The last step's S^T and dP^T were the last reads of K and V.
          if (it + 1 == n_iters && tid == 0) sm90::mbarrier_arrive(kv_empty);
          if (attn::tile_needs_mask<kHasMask>(m0, BM, n0, BN, nq, nk, diag, wl, wr)) {
            attn::band_key_rows<kHasMask>(s[0], n0 + warp_row0 + g, m0 + 2 * t, nq, nk, diag, wl,
                                          wr);
          }
          attn::probs_cols(s[0], lse_s, scale_log2, t); // P^T
          if constexpr (kDk) attn::ds_cols(dp[0], s[0], delta_s, t); // dS^T = P^T (dP^T - Delta)
        }
        if constexpr (kGrad) retire_grads(prev_stage);
        if constexpr (kS) {
          if constexpr (kDv) attn::pack_a<Element>(s[0], pf);
          if constexpr (kDk) attn::pack_a<Element>(dp[0], af);
          if constexpr (kOverlap) {
            prev_stage = stage;
          } else {
            issue_grads(stage);
            retire_grads(stage);
          }
          if (++stage == 2) stage = 0, phase ^= 1;
          ++step;
        }
      };
      if constexpr (kOverlap) {
        if (n_iters > 0) {
          turn(0, std::true_type(), std::false_type());
          for (int it = 1; it < n_iters; ++it) turn(it, std::true_type(), std::true_type());
          turn(n_iters, std::false_type(), std::true_type());
        }
      } else {
        for (int it = 0; it < n_iters; ++it) turn(it, std::true_type(), std::false_type());
      }

      // Epilogue: dK = scale dS^T Q, dV straight from the accumulators (keys no query sees
      // get zeros; keys past nk and columns past head_dim are not stored).
      Element *dkp =
          static_cast<Element *>(p.dk) +
          tl.seq.k_offset(p.dk_stride.batch, p.dk_stride.row, p.dk_stride.head, tl.kv_head);
      Element *dvp =
          static_cast<Element *>(p.dv) +
          tl.seq.k_offset(p.dv_stride.batch, p.dv_stride.row, p.dv_stride.head, tl.kv_head);
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
  // Persistent grids: one block per multiprocessor at most (the kernels count tiles in int).
  unsigned blocks;
  const int64_t kv_tiles =
      int64_t((s.seqlen_k + KV::kBlockN - 1) / KV::kBlockN) * s.heads_kv * s.batch;
  if ((err = persistent_blocks(kv_tiles, s.device, blocks))) return err;
  if (blocks > 0) {
    if ((err = maps(KV::kBlockM, KV::kBlockN))) return err;
    err = launch_kernel_sm90(dense_bwd_dkdv_sm90_kernel<KV, kHasMask>, dim3(blocks),
                             dim3(KV::kLaunchThreads), KV::kSmemBytes, stream, mq, mdo, mk, mv, p);
    if (err != cudaSuccess) return err;
  }
  const int64_t q_tiles = int64_t((s.seqlen_q + Q::kBlockM - 1) / Q::kBlockM) * s.heads * s.batch;
  if ((err = persistent_blocks(q_tiles, s.device, blocks)) || blocks == 0) return err;
  if ((err = maps(Q::kBlockM, Q::kBlockN))) return err;
  return launch_kernel_sm90(dense_bwd_dq_sm90_kernel<Q, kHasMask>, dim3(blocks),
                            dim3(Q::kLaunchThreads), Q::kSmemBytes, stream, mq, mdo, mk, mv, p);
}

} // namespace fk
