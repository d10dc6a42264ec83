// The softmax of every attention kernel, in the exp2 domain (scores times scale * log2 e),
// on MMA accumulator fragments (lane = 4 g + t; element e of 8-column tile j is row g + 8
// (e >= 2), column 8 j + 2 t + (e & 1)):
// - OnlineSoftmax: FlashAttention-2's running max and sum over key blocks, for the MT
//   m-tiles a warp owns, rescaling the O accumulators; then 1 / sum and LSE per row. Used
//   by the dense and the Longformer forward.
// - The backward's recomputation from the forward's LSE, P = exp2(S scale log2e - LSE
//   log2e), and dS = P (dP - Delta), on row-major tiles (dQ: a row per query) and on
//   transposed ones (dK / dV: a column per query, LSE and Delta staged in shared memory).
//   Used by the dense and the Longformer backward.
#pragma once

#include <stdint.h>

namespace fk {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int MT> struct OnlineSoftmax {
  float row_max[MT][2]; // running max of the scaled scores (log2 domain), -inf before any key
  float row_sum[MT][2]; // this thread's partial sums (its columns), relative to row_max

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_max[mt][r] = -INFINITY;
        row_sum[mt][r] = 0.f;
      }
  }

  // A new key block: s holds raw scores Q K^T (masked ones -inf). Updates the running max,
  // rescales acc (O so far) and the sums, and turns s into P = exp2(s scale_log2 - max).
  template <int NT, int OT>
  __device__ __forceinline__ void update(float (&s)[MT][NT][4], float (&acc)[MT][OT][4],
                                         float scale_log2) {
    float alpha[MT][2];
    update_probs(s, scale_log2, alpha);
    rescale(acc, alpha);
  }

  // update() in two steps, for a caller whose O is still being written by an asynchronous
  // matmul (the Hopper forward overlaps this block's softmax with the previous block's
  // P V): the max, the sums and P now, alpha = the factor O must still be scaled by ...
  template <int NT>
  __device__ __forceinline__ void update_probs(float (&s)[MT][NT][4], float scale_log2,
                                               float (&alpha)[MT][2]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int j = 0; j < NT; ++j)
          mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]) * scale_log2);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row that has seen only masked keys keeps max -inf; subtract 0 instead so the
        // exponentials below are exp2(-inf) = 0 rather than NaN.
        const float m_use = mx == -INFINITY ? 0.f : mx;
        alpha[mt][r] = exp2f(row_max[mt][r] - m_use);
        row_max[mt][r] = mx;
        row_sum[mt][r] *= alpha[mt][r];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          s[mt][j][2 * r] = exp2f(fmaf(s[mt][j][2 * r], scale_log2, -m_use));
          s[mt][j][2 * r + 1] = exp2f(fmaf(s[mt][j][2 * r + 1], scale_log2, -m_use));
          row_sum[mt][r] += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
        }
      }
  }

  // ... and that scaling, once O may be written.
  template <int OT>
  static __device__ __forceinline__ void rescale(float (&acc)[MT][OT][4],
                                                 const float (&alpha)[MT][2]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int i = 0; i < OT; ++i) {
          acc[mt][i][2 * r] *= alpha[mt][r];
          acc[mt][i][2 * r + 1] *= alpha[mt][r];
        }
  }

  // Row r of m-tile mt, after the last key block: returns 1 / sum (0 for a row that saw no
  // key); lse := log sum exp of the row's scaled scores (natural log; -inf without a key).
  __device__ __forceinline__ float finalize(int mt, int r, float &lse) const {
    float l = row_sum[mt][r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv_sum = l > 0.f ? 1.f / l : 0.f;
    lse = l > 0.f ? (row_max[mt][r] + log2f(l)) * kLn2 : -INFINITY;
    return inv_sum;
  }
};

// The forward's LSE in the log2 domain, for P = exp2(s scale log2e - lse2). A row without
// any visible key has LSE -inf; +inf makes every P of that row exp2(-inf) = 0 (instead of
// NaN from -inf - -inf). Rows past the sequence end get the same treatment.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// The backward's statistics of query row i of a sequence (common/block_info.cuh's SeqInfo)
// and head: the forward's LSE in the log2 domain and Delta; rows past nq get +inf and 0, so
// their P and dS are exactly 0.
template <class Params, class Seq>
__device__ __forceinline__ void query_stats(const Params &p, const Seq &seq, int head, int i,
                                            float &l2, float &dl) {
  l2 = INFINITY;
  dl = 0.f;
  if (i < seq.nq) {
    const int64_t idx = seq.lse_offset(p, head) + i;
    l2 = lse_log2(p.lse[idx]);
    dl = p.delta[idx];
  }
}

// Row-major score tile (rows g, g + 8 with lse2 l2[0], l2[1]): s := P where bit 4 j + e of
// `allowed` is set, else 0.
template <int NT>
__device__ __forceinline__ void probs_rows(float (&s)[NT][4], const float (&l2)[2],
                                           float scale_log2, uint32_t allowed = ~0u) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      s[j][e] = (allowed >> (4 * j + e)) & 1u ? exp2f(fmaf(s[j][e], scale_log2, -l2[e >> 1])) : 0.f;
}

// Transposed score tile (query columns 8 j + 2 t + (e & 1), their lse2 in lse_s): s := P^T
// where bit 4 j + e of `allowed` is set, else 0.
template <int NT>
__device__ __forceinline__ void probs_cols(float (&s)[NT][4], const float *lse_s, float scale_log2,
                                           int t, uint32_t allowed = ~0u) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      s[j][e] = (allowed >> (4 * j + e)) & 1u
                    ? exp2f(fmaf(s[j][e], scale_log2, -lse_s[j * 8 + 2 * t + (e & 1)]))
                    : 0.f;
}

// Row-major: dp := dS = P (dP - Delta[row]) (Delta of rows g, g + 8 in dl).
template <int NT>
__device__ __forceinline__ void ds_rows(float (&dp)[NT][4], const float (&p)[NT][4],
                                        const float (&dl)[2]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[j][e] = p[j][e] * (dp[j][e] - dl[e >> 1]);
}

// Transposed: dp := dS^T = P^T (dP^T - Delta[query]) (the queries' Delta in delta_s).
template <int NT>
__device__ __forceinline__ void ds_cols(float (&dp)[NT][4], const float (&p)[NT][4],
                                        const float *delta_s, int t) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const float2 dl = *reinterpret_cast<const float2 *>(delta_s + j * 8 + 2 * t);
    dp[j][0] = p[j][0] * (dp[j][0] - dl.x);
    dp[j][1] = p[j][1] * (dp[j][1] - dl.y);
    dp[j][2] = p[j][2] * (dp[j][2] - dl.x);
    dp[j][3] = p[j][3] * (dp[j][3] - dl.y);
  }
}

} // namespace attn
} // namespace fk
