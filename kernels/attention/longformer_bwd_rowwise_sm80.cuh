// Longformer attention backward (longformer_bwd_sm80.cuh): the row-wise kernels, Delta
// (step 1) and the reduce of split passes, and what every backward kernel shares (the
// tile size kBlock).
#pragma once

#include "../common/numeric.cuh"
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
  const int n = p.base.shape.seqlen_q;
  const int m0 = blockIdx.x * kDeltaRows;
  const uint8_t *pad = p.c.padding_mask ? p.c.padding_mask + int64_t(batch) * n : nullptr;
  const Element *o = static_cast<const Element *>(p.o) + int64_t(batch) * p.base.o_stride.batch +
                     int64_t(head) * p.base.o_stride.head;
  const Element *dout = static_cast<const Element *>(p.dout) + int64_t(batch) * p.do_stride.batch +
                        int64_t(head) * p.do_stride.head;
  float *delta =
      p.delta + int64_t(batch) * p.base.lse_stride.batch + int64_t(head) * p.base.lse_stride.head;
  delta_rows(p, o, dout, delta, m0, n, p.base.shape.head_dim,
             [&](int i) { return !(pad && pad[i] != 0); });
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
  const fk_attention_shape &sh = p.base.shape;
  const int per_seq = kKV ? c.k_rows_per_seq : c.q_rows_per_seq;
  const int32_t *list = kKV ? c.k_rows : c.q_rows;
  const int64_t per_split = int64_t(sh.batch) * sh.heads * per_seq; // rows of one split
  const int64_t w = int64_t(blockIdx.x) * kReduceWarps + threadIdx.x / 32;
  if (w >= per_split) return;
  const int lane = threadIdx.x % 32;
  const int x = int(w % per_seq);
  const int head = int(w / per_seq % sh.heads);
  const int batch = int(w / per_seq / sh.heads);
  const int tok = list[int64_t(batch) * per_seq + x];
  if (tok < 0 || tok >= sh.seqlen_q) return;
  const int S = p.num_splits;
  const int dim = sh.head_dim;
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
      *reinterpret_cast<uint32_t *>(dq + d) =
          ET::pack(a0 * sh.softmax_scale, a1 * sh.softmax_scale);
    }
    return;
  }
  const bool padded = c.padding_mask && c.padding_mask[int64_t(batch) * sh.seqlen_q + tok] != 0;
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
      *pk = ET::pack(fmaf(k0, sh.softmax_scale, ok.x), fmaf(k1, sh.softmax_scale, ok.y));
      *pv = ET::pack(v0 + ov.x, v1 + ov.y);
    } else {
      *pk = ET::pack(k0 * sh.softmax_scale, k1 * sh.softmax_scale);
      *pv = ET::pack(v0, v1);
    }
  }
}

} // namespace longformer_bwd_detail
} // namespace fk
