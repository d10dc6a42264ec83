// Dense attention forward for Hopper (sm_90a): TMA, mbarriers, wgmma and a producer
// warpgroup, with dense_fwd_sm80.cuh's rules (masks aligned bottom-right, windows, GQA, LSE,
// head dims padded up to the compiled one).
//
// A persistent grid (one block per multiprocessor) walks the tiles of 128 query rows of one
// (batch, head), heaviest first under causal masking (the last query blocks of every head
// before any earlier one). A block has three warpgroups:
// - the producer (setmaxnreg.dec) whose elected thread loads each tile's Q (once the
//   consumers have released the last one: q_full / q_empty) and the K and V tiles of every
//   visible key block by TMA (128-byte swizzle, zero fill past the sequence and past
//   head_dim) into two stages, each with a `full` mbarrier (bytes) and an `empty` one (one
//   arrival per consumer), running ahead into the next tile;
// - two consumers (setmaxnreg.inc) of 64 query rows each: S = Q K^T by wgmma from shared
//   memory (both K-major), the masks and FlashAttention-2's online softmax on the
//   accumulators (per warp mma.sync's m16n8 fragment layout, so common/softmax.cuh runs on
//   them unchanged), then O += P V by wgmma with P from registers (the S fragments packed as
//   mma.sync A fragments) and V MN-major from shared memory; the stage is released once
//   that wgmma has retired.
// K and V of block n + 1 stream in while block n is computed. The epilogue writes O and
// LSE straight from the accumulators. Taken where every operand is TMA-describable
// (dense_fwd_sm90_eligible); otherwise, and off Hopper, the sm80 kernel.
// The consumers take turns issuing S = Q K^T (ping-pong on named barriers 2, 3) so that
// one's softmax overlaps the other's wgmma, and within a consumer the softmax of key block
// n overlaps the P V of block n - 1. Head dims padded to 64 and 128 (128 x 128 tiles) and
// 256 (128 x 64). Varlen batches: the tensor maps span the packed rows (total_q, total_k of
// the C ABI) and each tile starts at its sequence's first row; rows of a box past the
// sequence's end are the next sequence's (or zero fill past the last): their scores are
// masked like keys past nk, their P is exactly 0, and query rows past nq are not stored
// (a non-finite V there would still reach P V as 0 x inf = NaN; the sm80 kernel's
// predicated loads have no such caveat).
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
#include "dense_fwd.h"

namespace fk {

template <int kHeadDim_, typename Element_>
struct AttnFwdTraitsSm90 : attn::WarpgroupTraitsSm90<kHeadDim_, Element_> {
  using Base = attn::WarpgroupTraitsSm90<kHeadDim_, Element_>;
  using Base::kHeadDim, Base::kConsumers;
  // D 256: 64-key blocks (S = 32 accumulators, O = 128 per thread; 192 KB of stages).
  static constexpr int kBlockM = 128, kBlockN = kHeadDim == 256 ? 64 : 128, kStages = 2;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2; // one K or V stage
  static constexpr size_t kBarrierOffset = size_t(kTileQBytes) + 4 * size_t(kTileKVBytes);
  static constexpr size_t kSmemBytes = kBarrierOffset + 8 * (2 + 2 * kStages) + 1024;
};

template <class Traits, bool kHasMask>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1)
    dense_fwd_sm90_kernel(const __grid_constant__ CUtensorMap map_q,
                          const __grid_constant__ CUtensorMap map_k,
                          const __grid_constant__ CUtensorMap map_v,
                          const fk_attention_fwd_params p) {
#ifdef FK_SM90_DEVICE_CODE
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM, BN = Traits::kBlockN;
  constexpr int kSTiles = BN / 8, kOTiles = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char *base = sm90::align_1024(smem_raw);
  unsigned char *sQ = base;
  unsigned char *sK = sQ + Traits::kTileQBytes;
  unsigned char *sV = sK + 2 * Traits::kTileKVBytes;
  uint64_t *q_full = reinterpret_cast<uint64_t *>(base + Traits::kBarrierOffset);
  uint64_t *q_empty = q_full + 1, *kv_full = q_full + 2, *kv_empty = kv_full + 2;

  const bool has_left = kHasMask && p.window_left >= 0;
  const bool has_right = kHasMask && p.window_right >= 0;
  const int heads = p.base.shape.heads, group = heads / p.base.shape.heads_kv;
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
        if (!tl.any_keys()) continue; // no Q or K / V to load
        const int head_kv = tl.head / group;
        sm90::mbarrier_wait(q_empty, q_phase ^ 1); // the consumers are done with the last Q
        sm90::mbarrier_arrive_expect_tx(q_full, Traits::kTileQBytes);
#pragma unroll
        for (int b = 0; b < Traits::kDBlocks; ++b)
          sm90::tma_load_4d(sQ + b * BM * 128, &map_q, q_full, 64 * b, tl.seq.q_start + tl.m0,
                            tl.head, tl.map_batch);
        q_phase ^= 1;
        for (int n = tl.n_begin; n < tl.n_end; ++n) {
          sm90::mbarrier_wait(&kv_empty[stage], phase ^ 1);
          sm90::mbarrier_arrive_expect_tx(&kv_full[stage], 2 * Traits::kTileKVBytes);
          unsigned char *k = sK + stage * Traits::kTileKVBytes;
          unsigned char *v = sV + stage * Traits::kTileKVBytes;
#pragma unroll
          for (int b = 0; b < Traits::kDBlocks; ++b) {
            sm90::tma_load_4d(k + b * BN * 128, &map_k, &kv_full[stage], 64 * b,
                              tl.seq.k_start + n * BN, head_kv, tl.map_batch);
            sm90::tma_load_4d(v + b * BN * 128, &map_v, &kv_full[stage], 64 * b,
                              tl.seq.k_start + n * BN, head_kv, tl.map_batch);
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
  // Ping-pong (FlashAttention-3): the consumers take turns issuing S = Q K^T, so that one's
  // softmax runs while the other's wgmma does. Warpgroup w waits for its turn at named
  // barrier 2 + w and hands it over at the other's; warpgroup 0 goes first.
  constexpr int kTurn = 2, kTurnThreads = 2 * 128;
  if (wg == 1) sm90::named_barrier_arrive(kTurn + 0, kTurnThreads);
  int stage = 0;
  uint32_t phase = 0, q_phase = 0;
  for (int i = blockIdx.x; i < tiles; i += gridDim.x) {
    const attn::QueryTile tl = tile_at(i);
    if (tl.empty()) continue;
    const int m0 = tl.m0, nq = tl.seq.nq, nk = tl.seq.nk, diag = tl.diag;
    float o[1][kOTiles][4];
    float (&od)[D / 2] = reinterpret_cast<float (&)[D / 2]>(o);
#pragma unroll
    for (int e = 0; e < D / 2; ++e) od[e] = 0.f;
    attn::OnlineSoftmax<1> softmax;

    // A tile without visible keys reads no Q: it neither waits for one nor releases it (a
    // release before the warpgroup's every thread had seen this Q land could let the next
    // Q's phase complete first, and a late thread would then wait for a parity that had
    // already come and gone).
    if (tl.any_keys()) {
      sm90::mbarrier_wait(q_full, q_phase);
      q_phase ^= 1;
    }
    // Intra-warpgroup overlap (FlashAttention-3): one turn issues S_n = Q K_n^T and then
    // O += P_{n-1} V_{n-1}; the softmax of S_n runs while that P V is in flight, and O is
    // rescaled once it has retired. The first turn issues S only, one more the last P V.
    // Which products a turn issues is a compile-time property of the turn (kS, kPV): with
    // run-time flags ptxas cannot pair each wgmma with its wait and serializes them all
    // (C7514).
    uint32_t pf[BN / 16][4]; // P_{n-1} as mma.sync A fragments: read by the P V in flight
    uint32_t (&pd)[BN / 4] = reinterpret_cast<uint32_t (&)[BN / 4]>(pf);
    int prev_stage = 0; // the stage of P_{n-1}'s V
    const auto turn = [&](int n, auto has_s, auto has_pv) {
      constexpr bool kS = decltype(has_s)::value, kPV = decltype(has_pv)::value;
      if constexpr (kS) sm90::mbarrier_wait(&kv_full[stage], phase);
      const unsigned char *k = sK + stage * Traits::kTileKVBytes;

      float s[1][kSTiles][4];
      float (&sd)[BN / 2] = reinterpret_cast<float (&)[BN / 2]>(s);
#pragma unroll
      for (int e = 0; e < BN / 2; ++e) sd[e] = 0.f;
      sm90::fence_registers(sd);
      sm90::named_barrier_sync(kTurn + wg, kTurnThreads);
      sm90::wgmma_fence();
      if constexpr (kS) { // S = Q K^T for this warpgroup's 64 rows and the block's BN keys
        attn::wgmma_rows_x_rows<Element, BN, D>(sd, sQ + wg * 64 * 128, BM, k);
        sm90::wgmma_commit();
      }
      if constexpr (kPV) { // O += P V with V MN-major
        sm90::fence_registers(od);
        attn::wgmma_regs_x_rows<Element, D, BN>(od, pf, sV + prev_stage * Traits::kTileKVBytes);
        sm90::wgmma_commit();
      }
      sm90::named_barrier_arrive(kTurn + 1 - wg, kTurnThreads);

      float alpha[1][2] = {{1.f, 1.f}};
      if constexpr (kS) {
        sm90::wgmma_wait<kPV ? 1 : 0>(); // S has retired (groups retire in issue order)
        sm90::fence_registers(sd);
        // The last key block's S was the last read of Q: the producer may load the next one.
        if (n + 1 == tl.n_end && threadIdx.x % 128 == 0) sm90::mbarrier_arrive(q_empty);
        const int k0 = n * BN;
        const bool need_mask =
            (k0 + BN > nk) ||
            (has_right && int64_t(k0) + BN - 1 > int64_t(m0) + diag + p.window_right) ||
            (has_left && int64_t(k0) < int64_t(m0) + BM - 1 + diag - p.window_left);
        if (need_mask) {
#pragma unroll
          for (int j = 0; j < kSTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = k0 + j * 8 + 2 * t + (e & 1);
              const int rel = col - (m0 + warp_row0 + g + (e >= 2 ? 8 : 0)) - diag;
              if (col >= nk || (has_right && rel > p.window_right) ||
                  (has_left && rel < -p.window_left))
                s[0][j][e] = -INFINITY;
            }
        }
        softmax.update_probs(s, scale_log2, alpha); // overlaps the P V in flight
      }
      if constexpr (kPV) {
        sm90::wgmma_wait<0>();
        sm90::fence_registers(od);
        sm90::fence_registers(pd); // P_{n-1}'s registers stay untouched until here
        if (threadIdx.x % 128 == 0) sm90::mbarrier_arrive(&kv_empty[prev_stage]);
      }
      if constexpr (kS) {
        attn::OnlineSoftmax<1>::rescale(o, alpha);
        attn::pack_a<Element>(s[0], pf);
        prev_stage = stage;
        if (++stage == 2) stage = 0, phase ^= 1;
      }
    };
    if (tl.any_keys()) {
      turn(tl.n_begin, std::true_type(), std::false_type());
      for (int n = tl.n_begin + 1; n < tl.n_end; ++n) turn(n, std::true_type(), std::true_type());
      turn(tl.n_end, std::false_type(), std::true_type());
    }

    // Epilogue: O and LSE straight from the accumulators (rows past nq and columns past
    // head_dim are not stored).
    Element *out =
        static_cast<Element *>(p.o) +
        tl.seq.q_offset(p.base.o_stride.batch, p.base.o_stride.row, p.base.o_stride.head, tl.head);
    float *lse_out = p.lse + tl.seq.lse_offset(p, tl.head);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lse;
      const float inv_sum = softmax.finalize(0, r, lse);
      const int row = m0 + warp_row0 + g + 8 * r;
      if (row >= nq) continue;
      attn::store_row_pairs(out + int64_t(row) * p.base.o_stride.row, o[0], r, inv_sum,
                            p.base.shape.head_dim, t);
      if (t == 0) lse_out[row] = lse;
    }
  }
#endif
}

template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_fwd_sm90(const fk_attention_fwd_params &p, cudaStream_t stream) {
  using Traits = AttnFwdTraitsSm90<kHeadDim, Element>;
  constexpr bool kBf16 = std::is_same<Element, __nv_bfloat16>::value;
  const fk_attention_shape &s = p.base.shape;
  // Varlen: one batch of the packed rows; the tiles find their sequence's rows on the device.
  const MapExtent e(p);
  CUtensorMap mq, mk, mv;
  cudaError_t err;
  if ((err = attention_map(&mq, p.base.q, p.base.q_stride, e.rows_q, s.heads, e.batch, s.head_dim,
                           Traits::kBlockM, kBf16)) ||
      (err = attention_map(&mk, p.base.k, p.base.k_stride, e.rows_k, s.heads_kv, e.batch,
                           s.head_dim, Traits::kBlockN, kBf16)) ||
      (err = attention_map(&mv, p.base.v, p.base.v_stride, e.rows_k, s.heads_kv, e.batch,
                           s.head_dim, Traits::kBlockN, kBf16)))
    return err;
  // Persistent: one block per multiprocessor at most (the kernel counts tiles in int).
  const int64_t tiles =
      int64_t((s.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM) * s.heads * s.batch;
  unsigned blocks;
  if ((err = persistent_blocks(tiles, s.device, blocks)) || blocks == 0) return err;
  const dim3 grid(blocks);
  return launch_kernel_sm90(dense_fwd_sm90_kernel<Traits, kHasMask>, grid,
                            dim3(Traits::kLaunchThreads), Traits::kSmemBytes, stream, mq, mk, mv,
                            p);
}

} // namespace fk
