// Dense attention backward for Hopper (sm_90a), first part: Delta and dK / dV are
// dense_bwd_sm80.cuh's kernels 1 and 2; dQ (kernel 3) runs on TMA, mbarriers and wgmma.
//
// dQ: one block per (query block of 128 rows, query head, batch), the last query blocks
// first (causal: the most work). Three warpgroups:
// - the producer (setmaxnreg.dec), whose elected thread loads Q and dO once and the K and V
//   tiles of every visible key block (64 keys) by TMA (128-byte swizzle, zero fill past the
//   tensor and past head_dim) into two stages, each with a `full` mbarrier (bytes) and an
//   `empty` one (one arrival per consumer);
// - two consumers (setmaxnreg.inc) of 64 query rows each: S = Q K^T and dP = dO V^T by
//   wgmma from shared memory (all K-major), then on the accumulators (mma.sync's m16n8
//   fragment layout per warp, so common/ runs on them unchanged) the band (mask.cuh),
//   P = exp2(S scale log2e - LSE log2e) and dS = P (dP - Delta) (softmax.cuh), then
//   dQ += dS K by wgmma with dS from registers and K MN-major (as P V in the forward);
//   the stage is released once that wgmma has retired.
// Every dQ row is summed by one block in key order: deterministic, like the sm80 path.
// Varlen batches: the maps span the packed rows (total_q / total_k); rows of a box past the
// sequence are masked (keys) or not stored (queries), as in dense_fwd_sm90.cuh.
// Head dims padded to 64 and 128 (Q, dO and two K / V stages: 128 KB at 128); 256 keeps the
// sm80 kernel. Not yet here (issue 17): dK / dV on wgmma, a persistent scheduler.
#pragma once

#include "../common/launch.cuh"
#include "../common/sm90.cuh"
#include "common/block_info.cuh"
#include "common/mask.cuh"
#include "common/softmax.cuh"
#include "common/tma_maps.cuh"
#include "dense_bwd_sm80.cuh"

namespace fk {

template <int kHeadDim_, typename Element_> struct AttnBwdDqTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "Q, dO and two K / V stages must fit");
  static constexpr int kBlockM = 128, kBlockN = 64;
  static constexpr int kDBlocks = kHeadDim / 64; // 64-column sub-tiles (one swizzle span)
  static constexpr int kConsumers = 2, kLaunchThreads = 384;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2;  // Q or dO
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
  unsigned char *base = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
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
    for (int s = 0; s < 2; ++s) {
      sm90::mbarrier_init(&kv_full[s], 1);
      sm90::mbarrier_init(&kv_empty[s], Traits::kConsumers);
    }
    sm90::fence_barrier_init();
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
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp_row0 + g + 8 * r;
    l2[r] = INFINITY;
    dl[r] = 0.f;
    if (i < nq) {
      const int64_t idx = seq.lse_offset(p, head) + i;
      l2[r] = attn::lse_log2(p.lse[idx]);
      dl[r] = p.delta[idx];
    }
  }
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
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int b = ks / 4, kb = 32 * (ks % 4);
      const uint64_t dk = sm90::advance_smem_desc(sm90::make_smem_desc_sw128(k + b * BN * 128), kb);
      const uint64_t dq = sm90::make_smem_desc_sw128(sQ + b * BM * 128 + wg * 64 * 128);
      sm90::wgmma_ss<Element, BN>(sd, sm90::advance_smem_desc(dq, kb), dk, 1);
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int b = ks / 4, kb = 32 * (ks % 4);
      const uint64_t dv = sm90::advance_smem_desc(sm90::make_smem_desc_sw128(v + b * BN * 128), kb);
      const uint64_t ddo = sm90::make_smem_desc_sw128(sdO + b * BM * 128 + wg * 64 * 128);
      sm90::wgmma_ss<Element, BN>(dpd, sm90::advance_smem_desc(ddo, kb), dv, 1);
    }
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
    attn::ds_rows(dp[0], s[0], dl);         // dS = P (dP - Delta)

    // dQ += dS K: dS as mma.sync A fragments (n-tiles 2 kk and 2 kk + 1), K MN-major.
    uint32_t af[BN / 16][4];
    uint32_t (&afd)[BN / 4] = reinterpret_cast<uint32_t (&)[BN / 4]>(af);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      af[kk][0] = ElemTraits<Element>::pack(dp[0][2 * kk][0], dp[0][2 * kk][1]);
      af[kk][1] = ElemTraits<Element>::pack(dp[0][2 * kk][2], dp[0][2 * kk][3]);
      af[kk][2] = ElemTraits<Element>::pack(dp[0][2 * kk + 1][0], dp[0][2 * kk + 1][1]);
      af[kk][3] = ElemTraits<Element>::pack(dp[0][2 * kk + 1][2], dp[0][2 * kk + 1][3]);
    }
    sm90::fence_registers(accd);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      sm90::wgmma_rs_tb<Element, D>(accd, af[kk],
                                    sm90::make_smem_desc_sw128_mn(k + kk * 16 * 128, BN * 128), 1);
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
    Element *drow = dq + int64_t(row) * p.dq_stride.row;
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) {
      const int col = 8 * j + 2 * t;
      if (col < p.base.shape.head_dim)
        *reinterpret_cast<uint32_t *>(drow + col) =
            ElemTraits<Element>::pack(acc[0][j][2 * r] * scale, acc[0][j][2 * r + 1] * scale);
    }
  }
#endif
}

template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_bwd_sm90(const fk_attention_bwd_params &p, cudaStream_t stream) {
  using Traits = AttnBwdDqTraitsSm90<kHeadDim, Element>;
  constexpr bool kBf16 = std::is_same<Element, __nv_bfloat16>::value;
  cudaError_t err = run_dense_bwd_delta_dkdv_sm80<kHeadDim, Element, kHasMask>(p, stream);
  const fk_attention_shape &s = p.base.shape;
  if (err != cudaSuccess || s.seqlen_q == 0) return err;
  const MapExtent e(p);
  CUtensorMap mq, mdo, mk, mv;
  if ((err = attention_map(&mq, p.base.q, p.base.q_stride, e.rows_q, s.heads, e.batch, s.head_dim,
                           Traits::kBlockM, kBf16)) ||
      (err = attention_map(&mdo, p.dout, p.do_stride, e.rows_q, s.heads, e.batch, s.head_dim,
                           Traits::kBlockM, kBf16)) ||
      (err = attention_map(&mk, p.base.k, p.base.k_stride, e.rows_k, s.heads_kv, e.batch,
                           s.head_dim, Traits::kBlockN, kBf16)) ||
      (err = attention_map(&mv, p.base.v, p.base.v_stride, e.rows_k, s.heads_kv, e.batch,
                           s.head_dim, Traits::kBlockN, kBf16)))
    return err;
  const dim3 grid((s.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, s.heads, s.batch);
  return launch_kernel_sm90(dense_bwd_dq_sm90_kernel<Traits, kHasMask>, grid,
                            dim3(Traits::kLaunchThreads), Traits::kSmemBytes, stream, mq, mdo, mk,
                            mv, p);
}

} // namespace fk
