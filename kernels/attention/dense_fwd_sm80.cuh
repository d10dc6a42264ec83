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
#pragma once

#include "../common/launch.cuh"
#include "../common/mma_sm80.cuh"
#include "dense_fwd.h"

namespace fk {

// Tile configuration. kMTiles is the number of 16-row MMA tiles a warp owns: with 2,
// every K/V fragment read from shared memory (ldmatrix) feeds two MMAs, halving the
// shared-memory traffic per FLOP, which is what bounds the 1-tile version; the cost is
// twice the accumulator registers, so Q is then re-read from shared memory each key block
// instead of living in registers.
template <int kHeadDim_, typename Element_, int kMTiles_, int kNWarps_, int kBlockN_,
          int kMinBlocksPerSm_, bool kQInRegs_>
struct DenseFwdTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kNWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr bool kQInRegs = kQInRegs_;
  static_assert(!kQInRegs || kMTiles == 1, "Q lives in registers only with one m-tile");
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  using Tile = SwizzledTile<kHeadDim>;
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements, one K or V stage
  static constexpr size_t kSmemBytes = size_t(kSmemQ + 4 * kSmemKV) * sizeof(Element);
};

// Cooperative cp.async of a ROWS x kHeadDim tile; rows >= rows_valid and 16-byte chunks
// >= chunks_valid (the head dim's padding) become zeros.
template <class Traits, int ROWS>
__device__ __forceinline__ void load_tile(typename Traits::Element *smem,
                                          const typename Traits::Element *gmem,
                                          int64_t row_stride, int rows_valid, int chunks_valid,
                                          int tid) {
  using Tile = typename Traits::Tile;
  constexpr int kChunks = ROWS * Tile::kChunksPerRow;
  static_assert(kChunks % Traits::kNThreads == 0, "tile must split evenly over threads");
#pragma unroll
  for (int i = 0; i < kChunks / Traits::kNThreads; ++i) {
    const int idx = i * Traits::kNThreads + tid;
    const int row = idx / Tile::kChunksPerRow;
    const int chunk = idx % Tile::kChunksPerRow;
    const bool valid = row < rows_valid && chunk < chunks_valid;
    // Out-of-range rows still need a legal address: use the tile's first row.
    const auto *src = gmem + (valid ? row * row_stride + chunk * 8 : 0);
    cp_async_16(smem_addr(smem + Tile::offset(row, chunk)), src, valid ? 16 : 0);
  }
}

// kHasMask: causal or a sliding window (bounds in p.window_left / p.window_right).
template <class Traits, bool kHasMask>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSm)
    dense_fwd_kernel(const fk_attention_fwd_params p) {
  using Element = typename Traits::Element;
  using Tile = typename Traits::Tile;
  using ET = ElemTraits<Element>;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int MT = Traits::kMTiles;
  constexpr int kKSteps = D / 16;  // k-steps of S = Q K^T
  constexpr int kSTiles = BN / 8;  // 8-wide column tiles of S
  constexpr int kOTiles = D / 8;   // 8-wide column tiles of O
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sQ = reinterpret_cast<Element *>(smem_raw);
  Element *sK = sQ + Traits::kSmemQ;      // two stages
  Element *sV = sK + 2 * Traits::kSmemKV; // two stages

  // Reverse order: under causal masking the last query blocks have the most work, so
  // they start first and the tail of the grid is short.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int head_kv = head / (p.heads / p.heads_kv);
  const int batch = blockIdx.z;
  // This sequence's lengths and first rows (varlen: packed rows, no batch stride).
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int strided_batch = varlen ? 0 : batch; // varlen ignores the batch strides
  const int q_start = varlen ? p.cu_seqlens_q[batch] : 0;
  const int k_start = varlen ? p.cu_seqlens_k[batch] : 0;
  const int nq = varlen ? p.cu_seqlens_q[batch + 1] - q_start : p.seqlen_q;
  const int nk = varlen ? p.cu_seqlens_k[batch + 1] - k_start : p.seqlen_k;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4; // row within the 8-row half of an MMA fragment
  const int t = lane % 4; // column pair within an 8-wide fragment
  const int m0 = m_block * BM;
  if (m0 >= nq) return; // a varlen grid is sized for the longest sequence
  const int warp_row0 = warp * Traits::kWarpRows; // first row of this warp in the tile
  const int d_chunks = p.head_dim / 8;             // valid 16-byte chunks of a row

  const Element *q = static_cast<const Element *>(p.q) + strided_batch * p.q_batch_stride +
                     head * p.q_head_stride + int64_t(q_start + m0) * p.q_row_stride;
  const Element *k = static_cast<const Element *>(p.k) + strided_batch * p.k_batch_stride +
                     head_kv * p.k_head_stride + int64_t(k_start) * p.k_row_stride;
  const Element *v = static_cast<const Element *>(p.v) + strided_batch * p.v_batch_stride +
                     head_kv * p.v_head_stride + int64_t(k_start) * p.v_row_stride;

  // Masks, aligned bottom-right: query row i sees keys
  // i + diag - window_left <= j <= i + diag + window_right (a negative bound = none).
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

  load_tile<Traits, BM>(sQ, q, p.q_row_stride, nq - m0, d_chunks, tid);
  cp_async_commit();
  if (n_begin < n_end) {
    const int64_t first = int64_t(n_begin) * BN;
    load_tile<Traits, BN>(sK + (n_begin & 1) * Traits::kSmemKV, k + first * p.k_row_stride,
                          p.k_row_stride, nk - n_begin * BN, d_chunks, tid);
    load_tile<Traits, BN>(sV + (n_begin & 1) * Traits::kSmemKV, v + first * p.v_row_stride,
                          p.v_row_stride, nk - n_begin * BN, d_chunks, tid);
  }
  cp_async_commit();

  // A fragment of Q for (m-tile, k-step): rows warp_row0 + 16 mt + [0, 16).
  auto load_q = [&](uint32_t(&a)[4], int mt, int ks) {
    const int row = warp_row0 + mt * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
    ldmatrix_x4(a, smem_addr(sQ + Tile::offset(row, 2 * ks + lane / 16)));
  };
  cp_async_wait<1>(); // Q has landed
  __syncthreads();
  uint32_t qf[Traits::kQInRegs ? kKSteps : 1][4];
  if constexpr (Traits::kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) load_q(qf[ks], 0, ks);
  }

  float acc[MT][kOTiles][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < kOTiles; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][i][e] = 0.f;
  float row_max[MT][2], row_sum[MT][2]; // max in the log2 domain, scale applied;
#pragma unroll                          // sums are this thread's partial sums
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[mt][r] = -INFINITY;
      row_sum[mt][r] = 0.f;
    }
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int n = n_begin; n < n_end; ++n) {
    const int stage = n & 1;
    if (n + 1 < n_end) {
      const int64_t next = int64_t(n + 1) * BN;
      const int rows_left = nk - (n + 1) * BN;
      load_tile<Traits, BN>(sK + (stage ^ 1) * Traits::kSmemKV, k + next * p.k_row_stride,
                            p.k_row_stride, rows_left, d_chunks, tid);
      load_tile<Traits, BN>(sV + (stage ^ 1) * Traits::kSmemKV, v + next * p.v_row_stride,
                            p.v_row_stride, rows_left, d_chunks, tid);
      cp_async_commit();
      cp_async_wait<1>(); // block n has landed, block n + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sKs = sK + stage * Traits::kSmemKV;
    const Element *sVs = sV + stage * Traits::kSmemKV;

    // S = Q K^T for this warp's rows and the block's BN keys. Each K fragment is loaded
    // once and used by all MT m-tiles.
    float s[MT][kSTiles][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Traits::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mt][e] = qf[ks][e];
        } else {
          load_q(a[mt], mt, ks);
        }
      }
#pragma unroll
      for (int j = 0; j < kSTiles; j += 2) {
        uint32_t b[4];
        const int row = (j + lane / 16) * 8 + (lane % 8);
        ldmatrix_x4(b, smem_addr(sKs + Tile::offset(row, 2 * ks + ((lane / 8) & 1))));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<Element>(s[mt][j], a[mt], b[0], b[1]);
          mma_16x8x16<Element>(s[mt][j + 1], a[mt], b[2], b[3]);
        }
      }
    }

    const int k0 = n * BN;
    // Per-element masking only on blocks that cross the sequence end or a band edge.
    const bool need_mask =
        (k0 + BN > nk) ||
        (has_right && int64_t(k0) + BN - 1 > int64_t(m0) + diag + p.window_right) ||
        (has_left && int64_t(k0) < int64_t(m0) + BM - 1 + diag - p.window_left);
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = k0 + j * 8 + 2 * t + (e & 1);
            // Key offset from the diagonal; 32-bit is exact since sequences are < 2^30.
            const int rel = col - (m0 + warp_row0 + mt * 16 + g + (e >= 2 ? 8 : 0)) - diag;
            if (col >= nk || (has_right && rel > p.window_right) ||
                (has_left && rel < -p.window_left))
              s[mt][j][e] = -INFINITY;
          }
    }

    // Online softmax: new running max, rescale what was accumulated, exponentiate.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
          mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]) * scale_log2);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row that has seen only masked keys keeps max -inf; subtract 0 instead so the
        // exponentials below are exp2(-inf) = 0 rather than NaN.
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(row_max[mt][r] - m_use);
        row_max[mt][r] = mx;
        row_sum[mt][r] *= alpha;
#pragma unroll
        for (int i = 0; i < kOTiles; ++i) {
          acc[mt][i][2 * r] *= alpha;
          acc[mt][i][2 * r + 1] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) {
          s[mt][j][2 * r] = exp2f(fmaf(s[mt][j][2 * r], scale_log2, -m_use));
          s[mt][j][2 * r + 1] = exp2f(fmaf(s[mt][j][2 * r + 1], scale_log2, -m_use));
          row_sum[mt][r] += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
        }
      }

    // O += P V. The S accumulators of two adjacent 8-key tiles are exactly the A
    // fragment of one 16-key k-step, so P never touches shared memory.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = ET::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = ET::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = ET::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = ET::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t b[4];
        const int row = kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
        ldmatrix_x4_trans(b, smem_addr(sVs + Tile::offset(row, 2 * np + lane / 16)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<Element>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma_16x8x16<Element>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
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
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv_sum = l > 0.f ? 1.f / l : 0.f;
      lse[mt][r] = l > 0.f ? (row_max[mt][r] + log2f(l)) * kLn2 : -INFINITY;
      const int row = warp_row0 + mt * 16 + g + 8 * r;
#pragma unroll
      for (int i = 0; i < kOTiles; ++i)
        *reinterpret_cast<uint32_t *>(sO + Tile::offset(row, i) + 2 * t) =
            ET::pack(acc[mt][i][2 * r] * inv_sum, acc[mt][i][2 * r + 1] * inv_sum);
    }
  __syncwarp();

  Element *o = static_cast<Element *>(p.o) + strided_batch * p.o_batch_stride +
               head * p.o_head_stride + int64_t(q_start) * p.o_row_stride;
#pragma unroll
  for (int i = lane; i < Traits::kWarpRows * Tile::kChunksPerRow; i += 32) {
    const int row = warp_row0 + i / Tile::kChunksPerRow;
    const int chunk = i % Tile::kChunksPerRow;
    const int grow = m0 + row;
    if (grow < nq && chunk < d_chunks)
      *reinterpret_cast<uint4 *>(o + int64_t(grow) * p.o_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4 *>(sO + Tile::offset(row, chunk));
  }
  if (t == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int grow = m0 + warp_row0 + mt * 16 + g + 8 * r;
        if (grow < nq)
          p.lse[strided_batch * p.lse_batch_stride + head * p.lse_head_stride + q_start + grow] =
              lse[mt][r];
      }
  }
}

template <class Traits, bool kHasMask>
cudaError_t launch_dense_fwd(const fk_attention_fwd_params &p, cudaStream_t stream) {
  const dim3 grid((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, p.heads, p.batch);
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
  using Traits = DenseFwdTraitsSm80<kHeadDim, Element, C::kMTiles, C::kNWarps, C::kBlockN,
                                    C::kMinBlocksPerSm, C::kQInRegs>;
  return launch_dense_fwd<Traits, kHasMask>(p, stream);
}

} // namespace fk
