// FlashAttention-2-style dense attention forward for sm_80+.
//
// One thread block computes BLOCK_M query rows of one (sequence, head); each warp owns 16
// or 32 of those rows for the whole kernel, so softmax statistics never leave registers.
// Per key block: S = Q K^T on tensor cores, masking (sequence end, causal / sliding
// window), online softmax in the exp2 domain, O += P V with P reused straight from the S
// accumulators as an MMA operand. K and V tiles are double-buffered with cp.async so the
// next block's loads overlap this block's math. Nothing of size Nq x Nk is ever stored.
// Key blocks wholly outside the causal / window band are never visited, so a window of
// width W costs O(N * W). Sequences come from a dense batch or from cu_seqlens (varlen);
// GQA maps query head h to kv head h / (H / H_kv). The head dim is padded up to the
// compiled kHeadDim: padded columns are zero-filled on load and never stored.
// Built from the attention building blocks of common/ (traits, fragment loops, online
// softmax) and the tile I/O of ../common/tile_io.cuh.
#pragma once

#include "../common/launch.cuh"
#include "../common/mma_sm80.cuh"
#include "../common/tile_io.cuh"
#include "common/block_info.cuh"
#include "common/gemm.cuh"
#include "common/kernel_traits.cuh"
#include "common/softmax.cuh"
#include "dense_fwd.h"

namespace fk {

// kHasMask: causal or a sliding window (bounds in p.window_left / p.window_right).
template <class Traits, bool kHasMask>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSm)
    dense_fwd_kernel(const fk_attention_fwd_params p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int MT = Traits::kMTiles;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kKSteps = D / 16; // k-steps of S = Q K^T
  constexpr int kSTiles = BN / 8; // 8-wide column tiles of S
  constexpr int kOTiles = D / 8;  // 8-wide column tiles of O

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sQ = reinterpret_cast<Element *>(smem_raw);
  Element *sK = sQ + Traits::kSmemQ;      // two stages
  Element *sV = sK + 2 * Traits::kSmemKV; // two stages

  // Reverse order: under causal masking the last query blocks have the most work, so
  // they start first and the tail of the grid is short.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int head_kv = head / (p.base.shape.heads / p.base.shape.heads_kv);
  const int batch = blockIdx.z;
  // This sequence's lengths and first rows (varlen: packed rows, no batch stride).
  const attn::SeqInfo seq(p, batch);
  const int strided_batch = seq.varlen ? 0 : batch; // varlen ignores the batch strides
  const int q_start = seq.q_start, k_start = seq.k_start;
  const int nq = seq.nq, nk = seq.nk;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4; // row within the 8-row half of an MMA fragment
  const int t = lane % 4; // column pair within an 8-wide fragment
  const int m0 = m_block * BM;
  if (m0 >= nq) return; // a varlen grid is sized for the longest sequence
  const int warp_row0 = warp * Traits::kWarpRows; // first row of this warp in the tile
  const int d_chunks = p.base.shape.head_dim / 8;             // valid 16-byte chunks of a row

  const Element *q = static_cast<const Element *>(p.base.q) +
                     strided_batch * p.base.q_stride.batch + head * p.base.q_stride.head +
                     int64_t(q_start + m0) * p.base.q_stride.row;
  const Element *k = static_cast<const Element *>(p.base.k) +
                     strided_batch * p.base.k_stride.batch + head_kv * p.base.k_stride.head +
                     int64_t(k_start) * p.base.k_stride.row;
  const Element *v = static_cast<const Element *>(p.base.v) +
                     strided_batch * p.base.v_stride.batch + head_kv * p.base.v_stride.head +
                     int64_t(k_start) * p.base.v_stride.row;

  // Masks, aligned bottom-right: query row i sees keys
  // i + diag - window_left <= j <= i + diag + window_right (a negative bound = none). The
  // band of common/mask.cuh in the forward's own form: rows past nq are not masked (never
  // stored), the element test is on the key's offset from the diagonal, the block ranges
  // in 64-bit; the shared functions measured 4 more registers (D = 128) and up to 64 bytes
  // of spills (D = 64) here.
  const int diag = nk - nq;
  const bool has_left = kHasMask && p.window_left >= 0;
  const bool has_right = kHasMask && p.window_right >= 0;
  int n_begin = 0;
  int n_end = (nk + BN - 1) / BN;
  if (has_right) {
    // Last key any row of this block sees; 64-bit so huge windows cannot overflow.
    const int64_t last_key = int64_t(m0) + BM - 1 + diag + p.window_right;
    n_end = int(min(int64_t(n_end), max(int64_t(0), (last_key + BN) / BN)));
  }
  if (has_left) {
    const int64_t first_key = int64_t(m0) + diag - p.window_left; // first key row m0 sees
    n_begin = int(min(int64_t(n_end), max(int64_t(0), first_key) / BN));
  }

  load_tile<kNThreads, D, BM>(FirstRows{nq - m0}, d_chunks, tid,
                              tile_source(sQ, q, p.base.q_stride.row));
  cp_async_commit();
  if (n_begin < n_end) {
    const int64_t first = int64_t(n_begin) * BN;
    const FirstRows rows{nk - n_begin * BN};
    load_tile<kNThreads, D, BN>(rows, d_chunks, tid,
                                tile_source(sK + (n_begin & 1) * Traits::kSmemKV,
                                            k + first * p.base.k_stride.row, p.base.k_stride.row),
                                tile_source(sV + (n_begin & 1) * Traits::kSmemKV,
                                            v + first * p.base.v_stride.row, p.base.v_stride.row));
  }
  cp_async_commit();

  cp_async_wait<1>(); // Q has landed
  __syncthreads();
  // Q fragments: in registers (one m-tile) or read from shared memory at every key block.
  uint32_t qf[Traits::kQInRegs ? kKSteps : 1][4];
  if constexpr (Traits::kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) attn::load_a<D>(qf[ks], sQ, warp_row0, ks, lane);
  }
  const auto q_src = [&] {
    if constexpr (Traits::kQInRegs)
      return attn::RegA<kKSteps>{qf};
    else
      return attn::SmemA<D, Element>{sQ, warp_row0};
  }();

  float acc[MT][kOTiles][4];
  attn::zero(acc);
  attn::OnlineSoftmax<MT> softmax;
  const float scale_log2 = p.base.shape.softmax_scale * attn::kLog2e;

  // The loop's bound as a key row: key blocks n_begin <= n < n_end are those with
  // n BN < k_end. Without a right bound that is nk itself, which the masking holds anyway:
  // one register fewer through the loop (at D = 256 the one that spilled).
  const int k_end = has_right ? min(n_end * BN, nk) : nk;
  for (int n = n_begin; n * BN < k_end; ++n) {
    const int stage = n & 1;
    if ((n + 1) * BN < k_end) {
      const int64_t next = int64_t(n + 1) * BN;
      const FirstRows rows{nk - (n + 1) * BN};
      load_tile<kNThreads, D, BN>(rows, d_chunks, tid,
                                  tile_source(sK + (stage ^ 1) * Traits::kSmemKV,
                                              k + next * p.base.k_stride.row, p.base.k_stride.row),
                                  tile_source(sV + (stage ^ 1) * Traits::kSmemKV,
                                              v + next * p.base.v_stride.row, p.base.v_stride.row));
      cp_async_commit();
      cp_async_wait<1>(); // block n has landed, block n + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sKs = sK + stage * Traits::kSmemKV;
    const Element *sVs = sV + stage * Traits::kSmemKV;

    // S = Q K^T for this warp's rows and the block's BN keys.
    float s[MT][kSTiles][4];
    attn::zero(s);
    attn::gemm_abt<D>(s, q_src, sKs, lane);

    const int k0 = n * BN;
    // Offset of key k0 from the diagonal of row m0. 32-bit is exact since sequences are
    // < 2^30 (k0 - diag < nq), and so are the tests below (no 64-bit bounds held through
    // the key loop: 1 to 6 registers fewer in the masked kernels, measured).
    const int rel0 = k0 - m0 - diag;
    // Per-element masking only on blocks that cross the sequence end or a band edge.
    const bool need_mask = (k0 + BN > nk) || (has_right && rel0 + BN - 1 > p.window_right) ||
                           (has_left && rel0 < BM - 1 - p.window_left);
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int dcol = j * 8 + 2 * t + (e & 1);
            // The key's offset from the diagonal of this element's row.
            const int rel = rel0 + dcol - (warp_row0 + mt * 16 + g + (e >= 2 ? 8 : 0));
            if (k0 + dcol >= nk || (has_right && rel > p.window_right) ||
                (has_left && rel < -p.window_left))
              s[mt][j][e] = -INFINITY;
          }
    }

    softmax.update(s, acc, scale_log2);
    // O += P V: P straight from the S accumulators.
    attn::gemm_xb<D>(acc, s, sVs, lane);
    __syncthreads(); // everyone is done with this stage before it is refilled
  }

  // Epilogue: O is staged in this warp's Q rows of shared memory for 16-byte stores. No
  // cp.async wait or barrier is needed first (the emulator's race check agrees): nothing
  // is in flight (the last key block waited with wait<0>; with no key block the second
  // group is empty), Q landed before the barrier after its wait, and only this warp ever
  // read these rows.
  Element *sO = sQ;
  float lse[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float inv_sum = softmax.finalize(mt, r, lse[mt][r]);
      stage_row<D>(sO, warp_row0 + mt * 16 + g + 8 * r, acc[mt], r, inv_sum, t);
    }
  __syncwarp();

  // The batch read anew: held through the key loop it was the spilled register (D = 256).
  const unsigned o_batch = p.cu_seqlens_q != nullptr ? 0 : attn::fresh_block_idx_z();
  Element *o = static_cast<Element *>(p.o) + o_batch * p.base.o_stride.batch +
               head * p.base.o_stride.head + int64_t(q_start) * p.base.o_stride.row;
  store_rows<D, Traits::kWarpRows>(
      o, p.base.o_stride.row, sO, warp_row0,
      [&](int row, ChunkOk chunk_ok, int &grow) {
        grow = m0 + row;
        return grow < nq && chunk_ok();
      },
      d_chunks, lane);
  if (t == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int grow = m0 + warp_row0 + mt * 16 + g + 8 * r;
        if (grow < nq)
          p.lse[o_batch * p.base.lse_stride.batch + head * p.base.lse_stride.head + q_start +
                grow] = lse[mt][r];
      }
  }
}

template <class Traits, bool kHasMask>
cudaError_t launch_dense_fwd(const fk_attention_fwd_params &p, cudaStream_t stream) {
  const dim3 grid((p.base.shape.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM,
                  p.base.shape.heads, p.base.shape.batch);
  return launch_kernel(dense_fwd_kernel<Traits, kHasMask>, grid, dim3(Traits::kNThreads),
                       Traits::kSmemBytes, stream, p);
}

// Per padded head dim, the configuration measured faster on an H200
// (benches/results/2026-11-26-h200-dense-fwd-mtiles): at D=64 two m-tiles per warp halve
// the shared-memory reads per MMA (+12%); at D=128 their 128 accumulator floats per
// thread spill at 255 registers, and one m-tile with Q in registers wins by 16%. D=256
// (not yet measured) keeps Q in shared memory (64 Q registers would spill next to 128
// accumulators) and halves the key block so shared memory stays at 96 KB, which sm_86
// and sm_89 (99 KB per block) can launch.
// FlashAttention-2's D=128 shape (2 m-tiles, 4 warps, Q re-read from shared memory, 2
// blocks per SM: 255 registers are allowed at 128 threads) re-measured with ptxas after
// the fragment addressing of common/gemm.cuh stopped spilling: kBlockN 64 still spills
// 68-204 bytes, 32 spills 4-16 bytes (masked, and unmasked on sm_90a), only 16 is free
// (236-245 registers); with 16 keys per block each Q fragment feeds as few MMAs as each K
// fragment, so it reads as much shared memory per MMA as the shape below, with four times
// the barriers. D=128 keeps one m-tile, Q in registers (232-247 registers, no spills).
template <int kHeadDim> struct DenseFwdConfigSm80;
template <> struct DenseFwdConfigSm80<64> {
  static constexpr int kMTiles = 2, kNWarps = 4, kBlockN = 64, kMinBlocksPerSm = 2;
  static constexpr bool kQInRegs = false;
};
template <> struct DenseFwdConfigSm80<128> {
  static constexpr int kMTiles = 1, kNWarps = 8, kBlockN = 64, kMinBlocksPerSm = 1;
  static constexpr bool kQInRegs = true;
};
template <> struct DenseFwdConfigSm80<256> {
  static constexpr int kMTiles = 1, kNWarps = 4, kBlockN = 32, kMinBlocksPerSm = 1;
  static constexpr bool kQInRegs = false;
};

template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_fwd_sm80(const fk_attention_fwd_params &p, cudaStream_t stream) {
  using C = DenseFwdConfigSm80<kHeadDim>;
  using Traits = AttnFwdTraitsSm80<kHeadDim, Element, C::kMTiles, C::kNWarps, C::kBlockN,
                                   C::kMinBlocksPerSm, C::kQInRegs>;
  return launch_dense_fwd<Traits, kHasMask>(p, stream);
}

} // namespace fk
