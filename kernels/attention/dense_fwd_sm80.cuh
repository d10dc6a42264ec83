// FlashAttention-2-style dense attention forward for sm_80+.
//
// One thread block computes BLOCK_M query rows of one (batch, head); each warp owns 16 of
// those rows for the whole kernel, so softmax statistics never leave registers. Per key
// block: S = Q K^T on tensor cores, masking (sequence end, causal), online softmax in the
// exp2 domain, O += P V with P reused straight from the S accumulators as an MMA operand.
// K and V tiles are double-buffered with cp.async so the next block's loads overlap this
// block's math. Nothing of size Nq x Nk is ever stored.
#pragma once

#include "../common/mma_sm80.cuh"
#include "dense_fwd.h"

namespace fk {

template <int kHeadDim_, typename Element_> struct DenseFwdTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kBlockM = 16 * kNWarps; // 16 query rows per warp
  static constexpr int kBlockN = 64;
  // Register budget: 256 threads x 2 blocks caps a thread at 128 registers, which the
  // head-dim-128 accumulators (64 floats of O + 32 of S + 32 of Q) do not fit.
  static constexpr int kMinBlocksPerSm = kHeadDim <= 64 ? 2 : 1;
  using Tile = SwizzledTile<kHeadDim>;
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements, one K or V stage
  static constexpr size_t kSmemBytes = size_t(kSmemQ + 4 * kSmemKV) * sizeof(Element);
};

// Cooperative cp.async of a ROWS x kHeadDim tile; rows >= rows_valid become zeros.
template <class Traits, int ROWS>
__device__ __forceinline__ void load_tile(typename Traits::Element *smem,
                                          const typename Traits::Element *gmem,
                                          int64_t row_stride, int rows_valid, int tid) {
  using Tile = typename Traits::Tile;
  constexpr int kChunks = ROWS * Tile::kChunksPerRow;
  static_assert(kChunks % Traits::kNThreads == 0, "tile must split evenly over threads");
#pragma unroll
  for (int i = 0; i < kChunks / Traits::kNThreads; ++i) {
    const int idx = i * Traits::kNThreads + tid;
    const int row = idx / Tile::kChunksPerRow;
    const int chunk = idx % Tile::kChunksPerRow;
    const bool valid = row < rows_valid;
    // Out-of-range rows still need a legal address: use the tile's first row.
    const auto *src = gmem + (valid ? row * row_stride + chunk * 8 : 0);
    cp_async_16(smem_addr(smem + Tile::offset(row, chunk)), src, valid ? 16 : 0);
  }
}

template <class Traits, bool kCausal>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSm)
    dense_fwd_kernel(const fk_attention_fwd_params p) {
  using Element = typename Traits::Element;
  using Tile = typename Traits::Tile;
  using ET = ElemTraits<Element>;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
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
  const int batch = blockIdx.z;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4; // row within the 8-row half of an MMA fragment
  const int t = lane % 4; // column pair within an 8-wide fragment
  const int m0 = m_block * BM;

  const Element *q = static_cast<const Element *>(p.q) + batch * p.q_batch_stride +
                     head * p.q_head_stride + int64_t(m0) * p.q_row_stride;
  const Element *k =
      static_cast<const Element *>(p.k) + batch * p.k_batch_stride + head * p.k_head_stride;
  const Element *v =
      static_cast<const Element *>(p.v) + batch * p.v_batch_stride + head * p.v_head_stride;

  // Causal, aligned bottom-right: query row i sees keys j <= i + diag.
  const int diag = p.seqlen_k - p.seqlen_q;
  int n_blocks = (p.seqlen_k + BN - 1) / BN;
  if (kCausal) {
    const int last_key = m0 + BM - 1 + diag; // last key any row of this block sees
    n_blocks = min(n_blocks, max(0, (last_key + BN) / BN));
  }

  load_tile<Traits, BM>(sQ, q, p.q_row_stride, p.seqlen_q - m0, tid);
  cp_async_commit();
  if (n_blocks > 0) {
    load_tile<Traits, BN>(sK, k, p.k_row_stride, p.seqlen_k, tid);
    load_tile<Traits, BN>(sV, v, p.v_row_stride, p.seqlen_k, tid);
  }
  cp_async_commit();

  cp_async_wait<1>(); // Q has landed
  __syncthreads();
  uint32_t qf[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    const int row = warp * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
    ldmatrix_x4(qf[ks], smem_addr(sQ + Tile::offset(row, 2 * ks + lane / 16)));
  }

  float acc[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}; // log2 domain, scale applied
  float row_sum[2] = {0.f, 0.f};             // this thread's partial sums
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int n = 0; n < n_blocks; ++n) {
    const int stage = n & 1;
    if (n + 1 < n_blocks) {
      const int64_t next = int64_t(n + 1) * BN;
      const int rows_left = p.seqlen_k - (n + 1) * BN;
      load_tile<Traits, BN>(sK + (stage ^ 1) * Traits::kSmemKV, k + next * p.k_row_stride,
                            p.k_row_stride, rows_left, tid);
      load_tile<Traits, BN>(sV + (stage ^ 1) * Traits::kSmemKV, v + next * p.v_row_stride,
                            p.v_row_stride, rows_left, tid);
      cp_async_commit();
      cp_async_wait<1>(); // block n has landed, block n + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sKs = sK + stage * Traits::kSmemKV;
    const Element *sVs = sV + stage * Traits::kSmemKV;

    // S = Q K^T for this warp's 16 rows and the block's BN keys.
    float s[kSTiles][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int j = 0; j < kSTiles; j += 2) {
        uint32_t b[4];
        const int row = (j + lane / 16) * 8 + (lane % 8);
        ldmatrix_x4(b, smem_addr(sKs + Tile::offset(row, 2 * ks + ((lane / 8) & 1))));
        mma_16x8x16<Element>(s[j], qf[ks], b[0], b[1]);
        mma_16x8x16<Element>(s[j + 1], qf[ks], b[2], b[3]);
      }
    }

    const int k0 = n * BN;
    const bool need_mask = (k0 + BN > p.seqlen_k) || (kCausal && k0 + BN - 1 > m0 + diag);
    if (need_mask) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = k0 + j * 8 + 2 * t + (e & 1);
          const int row = m0 + warp * 16 + g + (e >= 2 ? 8 : 0);
          if (col >= p.seqlen_k || (kCausal && col > row + diag)) s[j][e] = -INFINITY;
        }
    }

    // Online softmax: new running max, rescale what was accumulated, exponentiate.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
        mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]) * scale_log2);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row that has seen only masked keys keeps max -inf; subtract 0 instead so the
      // exponentials below are exp2(-inf) = 0 rather than NaN.
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(row_max[r] - m_use);
      row_max[r] = mx;
      row_sum[r] *= alpha;
#pragma unroll
      for (int i = 0; i < kOTiles; ++i) {
        acc[i][2 * r] *= alpha;
        acc[i][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
        s[j][2 * r] = exp2f(fmaf(s[j][2 * r], scale_log2, -m_use));
        s[j][2 * r + 1] = exp2f(fmaf(s[j][2 * r + 1], scale_log2, -m_use));
        row_sum[r] += s[j][2 * r] + s[j][2 * r + 1];
      }
    }

    // O += P V. The S accumulators of two adjacent 8-key tiles are exactly the A
    // fragment of one 16-key k-step, so P never touches shared memory.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = ET::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = ET::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = ET::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = ET::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t b[4];
        const int row = kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
        ldmatrix_x4_trans(b, smem_addr(sVs + Tile::offset(row, 2 * np + lane / 16)));
        mma_16x8x16<Element>(acc[2 * np], a, b[0], b[1]);
        mma_16x8x16<Element>(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    __syncthreads(); // everyone is done with this stage before it is refilled
  }

  // Epilogue. Wait for any copy still in flight (there are some when n_blocks == 0)
  // before reusing this warp's Q rows in shared memory to stage O for 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();

  float inv_sum[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv_sum[r] = l > 0.f ? 1.f / l : 0.f;
    lse[r] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -INFINITY;
  }

  Element *sO = sQ;
#pragma unroll
  for (int i = 0; i < kOTiles; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      *reinterpret_cast<uint32_t *>(sO + Tile::offset(row, i) + 2 * t) =
          ET::pack(acc[i][2 * r] * inv_sum[r], acc[i][2 * r + 1] * inv_sum[r]);
    }
  __syncwarp();

  Element *o = static_cast<Element *>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
#pragma unroll
  for (int i = lane; i < 16 * Tile::kChunksPerRow; i += 32) {
    const int row = warp * 16 + i / Tile::kChunksPerRow;
    const int chunk = i % Tile::kChunksPerRow;
    const int grow = m0 + row;
    if (grow < p.seqlen_q)
      *reinterpret_cast<uint4 *>(o + int64_t(grow) * p.o_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4 *>(sO + Tile::offset(row, chunk));
  }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int grow = m0 + warp * 16 + g + 8 * r;
      if (grow < p.seqlen_q)
        p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + grow] = lse[r];
    }
  }
}

template <int kHeadDim, typename Element, bool kCausal>
cudaError_t run_dense_fwd_sm80(const fk_attention_fwd_params &p, cudaStream_t stream) {
  using Traits = DenseFwdTraitsSm80<kHeadDim, Element>;
  auto kernel = dense_fwd_kernel<Traits, kCausal>;
  constexpr size_t smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

} // namespace fk
