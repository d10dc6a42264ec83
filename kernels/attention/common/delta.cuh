// The first kernel of every attention backward, Delta_i = sum_d dO_id O_id (f32, laid out
// like LSE), memory-bound: the shape (128 threads, 8 lanes per row, 64 rows per block) and
// the row loop. Used by the dense (dense_bwd_delta_kernel) and the Longformer
// (longformer_bwd_delta_kernel) backward, which only locate the rows.
#pragma once

#include "../../common/numeric.cuh"

namespace fk {
namespace attn {

constexpr int kDeltaThreads = 128;
constexpr int kDeltaRows = 64;

// Delta of rows [m0, m0 + kDeltaRows) of one (sequence, head): o, dout and delta point at
// its row 0, p's base.o_stride.row and do_stride.row step through them. Rows i < n_rows with
// active(i) are summed, the others of them get 0; rows >= n_rows are not written. Called
// by all kDeltaThreads threads of the block.
template <typename Element, class Params, class Active>
__device__ __forceinline__ void delta_rows(const Params &p, const Element *o, const Element *dout,
                                           float *delta, int m0, int n_rows, int head_dim,
                                           const Active &active) {
  constexpr int kLanesPerRow = 8;
  constexpr int kRowsPerPass = kDeltaThreads / kLanesPerRow;
  const int sub = threadIdx.x % kLanesPerRow;
  const int chunks = head_dim / 8;
  for (int r = threadIdx.x / kLanesPerRow; r < kDeltaRows; r += kRowsPerPass) {
    const int i = m0 + r;
    float acc = 0.f;
    if (i < n_rows && active(i)) {
      for (int c = sub; c < chunks; c += kLanesPerRow) {
        const uint4 ov =
            *reinterpret_cast<const uint4 *>(o + int64_t(i) * p.base.o_stride.row + c * 8);
        const uint4 dv =
            *reinterpret_cast<const uint4 *>(dout + int64_t(i) * p.do_stride.row + c * 8);
        const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w};
        const uint32_t dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float2 a = unpack2<Element>(ow[w]);
          const float2 b = unpack2<Element>(dw[w]);
          acc = fmaf(a.x, b.x, acc);
          acc = fmaf(a.y, b.y, acc);
        }
      }
    }
    // Every lane runs the same number of passes, so the shuffles are warp-uniform.
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    if (sub == 0 && i < n_rows) delta[i] = acc;
  }
}

} // namespace attn
} // namespace fk
