// Linformer's sequence projection, forward and backward, on the tile GEMM core
// (kernels/common/gemm_sm80.cuh). Per batch b and K/V head h (he = h or 0 for E's head):
//
//   forward   kp = E_he[:, :N] K~          M = k_proj, N = head_dim, reduction over the
//                                          sequence (long: split-K into f32 partials, then
//                                          a fixed-order reduction that rounds once)
//   backward  dK = E_heᵀ dkp                M = N, N = head_dim, reduction over k_proj;
//                                          rows of padded keys are zero rows of E_heᵀ
//             dE_he = Σ_(b, h) dkp K~ᵀ      M = k_proj, N = n_max, reduction over
//                                          (b, h, d) [+ the same over dvp, V~ when F is E]
//
// K~ is K with the rows of padded keys zero: the loaders mask them (the core's KeyMask on
// the forward's Kᵀ columns and the backward's Eᵀ rows; the op's ProjGradLoader for dE,
// where the batch a key belongs to comes from the reduction column). Groups (blockIdx.z)
// are (b, h[, split]) through the core's group maps. No atomics: every output element is
// one thread's f32 sum over its whole reduction (or over the splits' partials, in order),
// rounded once.
//
// Known performance gap: Kᵀ (forward) and dkpᵀ (backward dK) are transposed operands, the
// reduction running along K's rows; the core reads them with its element gather (correct
// first). The fix is an ldmatrix.trans path for B: load K's (64 positions x 64 d) tile
// row-major with cp.async and transpose it at the fragment load.
#pragma once

#include "../common/gemm_sm80.cuh"
#include "linformer.h"

namespace fk {
namespace linformer {

using gemm::IndexMap3;
using gemm::KeyMask;

// 128 x 64 x 64 tiles, 4 warps of 64 x 32 (the convolution family's configuration).
template <typename Element>
using ProjGemmTraits = gemm::TileGemmTraitsSm80<Element, 128, 64, 2, 2, 2>;

inline bool aligned16(const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- dE's operands: dkp (rows j) and K (rows i, the keys), reduction columns c = (b, h, d)
// over the batches and the heads that use E's head; with key-value sharing a second
// segment of columns [seg_cols, 2 seg_cols) runs over dvp and V. A chunk of 8 columns
// never straddles a (b, h) or the segments (head_dim and seg_cols are multiples of 8), so
// its 8 elements are contiguous (unit head-dim stride) and belong to one batch b, which
// decides the key mask of the K / V operand: element (i, c) is zero when key i of batch b
// is padded.
template <typename Element> struct ProjGradOperand {
  const Element *base[2];  // segment 1 unused when cols == seg_cols
  int64_t row_stride[2];   // between rows (j of dkp / dvp; i of K / V)
  int64_t group_stride[2]; // group z = E's head: the first K/V head using it, 0 if shared
  IndexMap3 col_map[2];    // c (within its segment) -> (b, h, d) offset
  int rows, cols, seg_cols;
  int cols_per_batch;   // heads per group x head_dim
  const uint8_t *mask;  // (batch, mask_ld) or null (the dkp / dvp operand, no padding)
  int64_t mask_ld;
  bool vec;             // 16-byte cp.async allowed (host-checked: strides, alignment)
};

// Fills ROWS x kBlockK tiles of a ProjGradOperand; the thread layout of the core's
// StridedLoader (one 16-byte chunk column, ROWS / (threads / 8) rows per thread).
template <class Traits, int ROWS> struct ProjGradLoader {
  using Element = typename Traits::Element;
  using Operand = ProjGradOperand<Element>;
  static constexpr int kRowsPerPass = Traits::kNThreads / Traits::Tile::kChunksPerRow;
  static constexpr int kPasses = ROWS / kRowsPerPass;
  static_assert(kPasses * kRowsPerPass == ROWS, "tile rows must split evenly over threads");

  const Operand &op;
  int chunk, row_first; // this thread's first row

  __device__ ProjGradLoader(const Operand &op_, int row0, int tid)
      : op(op_), chunk(tid % Traits::Tile::kChunksPerRow),
        row_first(row0 + tid / Traits::Tile::kChunksPerRow) {}

  __device__ void load(Element *tile, int k0) const {
    const int col = k0 + chunk * 8;
    const int row_in_pass = row_first % kRowsPerPass;
    const bool col_in = col < op.cols;
    const int seg = col_in && col >= op.seg_cols ? 1 : 0;
    const int c = col - seg * op.seg_cols;
    const Element *src =
        col_in ? op.base[seg] + blockIdx.z * op.group_stride[seg] + op.col_map[seg].offset(c)
               : op.base[0];
    const uint8_t *mask = col_in && op.mask != nullptr
                              ? op.mask + int64_t(c / op.cols_per_batch) * op.mask_ld
                              : nullptr;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int row = row_first + i * kRowsPerPass;
      Element *dst = tile + Traits::Tile::offset(i * kRowsPerPass + row_in_pass, chunk);
      if (!col_in || row >= op.rows || (mask != nullptr && mask[row] != 0)) {
        cp_async_16(smem_addr(dst), op.base[0], 0);
      } else if (op.vec) {
        cp_async_16(smem_addr(dst), src + row * op.row_stride[seg], 16);
      } else {
        alignas(16) Element v[8];
        const Element *s = src + row * op.row_stride[seg];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = s[e];
        *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(v);
      }
    }
  }
};

// ---- The forward's fixed-order reduction of the split partials: out[b, m, h, n] = the
// sum over s = 0, 1, ... of ws[((b H + h) splits + s), m, n], rounded once.
template <typename T>
__global__ void __launch_bounds__(256)
    proj_split_reduce_kernel(const float *ws, T *out, fk_strides os, int heads, int splits,
                             int rows, int cols, int64_t total) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int n = int(i % cols);
    const int64_t mi = i / cols;
    const int m = int(mi % rows);
    const int64_t bh = mi / rows;
    const int b = int(bh / heads), h = int(bh % heads);
    const int64_t part = int64_t(rows) * cols;
    const float *src = ws + bh * splits * part + int64_t(m) * cols + n;
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += src[s * part];
    out[b * os.batch + m * os.row + h * os.head + n] = from_float<T>(sum);
  }
}

// One projection of the forward: out = P_hp[:, :N] X~ for every (b, h).
template <typename T>
cudaError_t proj_fwd_one(const fk_linformer_proj_params &p, const void *x, fk_strides xs,
                         const void *e, fk_proj_strides es, int e_heads, void *out, fk_strides os,
                         float *ws, cudaStream_t stream) {
  using Traits = ProjGemmTraits<T>;
  const int H = p.heads_kv, splits = p.splits;
  // A = E_he (k_proj x N), groups z = (b, h, s): E depends on h only (per-head E).
  gemm::MappedOperand<T> a{};
  a.base = static_cast<const T *>(e);
  a.row_map = IndexMap3::linear(es.row), a.col_map = IndexMap3::linear(es.col);
  a.rows = p.k_proj, a.cols = p.seqlen;
  a.group_map = IndexMap3{H, splits, 0, e_heads > 1 ? es.head : 0, 0};
  a.vec = es.col == 1 && es.row % 8 == 0 && (e_heads == 1 || es.head % 8 == 0) && aligned16(e);
  // B = X~ᵀ (head_dim x N): rows d, reduction columns the keys, padded ones masked. X's
  // rows are the reduction: the element gather (see the top).
  gemm::MappedOperand<T, KeyMask::kCols> b{};
  b.base = static_cast<const T *>(x);
  b.row_map = IndexMap3::linear(1), b.col_map = IndexMap3::linear(xs.row);
  b.rows = p.head_dim, b.cols = p.seqlen;
  b.group_map = IndexMap3{H, splits, xs.batch, xs.head, 0};
  b.mask = p.key_padding;
  b.mask_map = IndexMap3{H, splits, p.seqlen, 0, 0};
  b.vec = false;
  using ALoader = gemm::MappedLoader<Traits, Traits::kBlockM>;
  using BLoader = gemm::MappedLoader<Traits, Traits::kBlockN, KeyMask::kCols>;
  if (splits == 1) {
    gemm::MappedEpilogueParams<T> ep{};
    ep.out = static_cast<T *>(out);
    ep.row_map = IndexMap3::linear(os.row), ep.col_map = IndexMap3::linear(1);
    ep.rows = p.k_proj, ep.cols = p.head_dim;
    ep.group_map = IndexMap3{H, 1, os.batch, os.head, 0};
    ep.activation = 0;
    ep.vec = os.row % 8 == 0 && os.batch % 8 == 0 && os.head % 8 == 0 && aligned16(out);
    return gemm::launch_tile_gemm<Traits, ALoader, BLoader, gemm::MappedStagedEpilogue<Traits>>(
        a, b, ep, p.seqlen, p.batch * H, stream);
  }
  // Splits of whole 64-position blocks; none left empty (fewer than asked when they would
  // be: the workspace was sized for `splits`).
  const int k_split = proj_k_split(p.seqlen, splits);
  const int used = proj_used_splits(p.seqlen, splits);
  const gemm::F32MatrixParams ep{ws, p.head_dim, int64_t(p.k_proj) * p.head_dim, p.k_proj,
                                 p.head_dim};
  a.group_map.div2 = b.group_map.div2 = b.mask_map.div2 = FastDiv(used);
  cudaError_t err =
      gemm::launch_tile_gemm_split<Traits, ALoader, BLoader, gemm::F32Epilogue<Traits>>(
          a, b, ep, k_split, used, p.batch * H, stream);
  if (err != cudaSuccess) return err;
  const int64_t total = int64_t(p.batch) * H * p.k_proj * p.head_dim;
  const int blocks = int(total / 256 + 1 < (int64_t(1) << 20) ? total / 256 + 1 : 1 << 20);
  return launch_kernel(proj_split_reduce_kernel<T>, dim3(blocks), dim3(256), 0, stream,
                       static_cast<const float *>(ws), static_cast<T *>(out), os, H, used, p.k_proj,
                       p.head_dim, total);
}

template <typename T> cudaError_t proj_fwd(const fk_linformer_proj_params &p, cudaStream_t stream) {
  const ProjFwdWorkspace w(p);
  auto *ws = static_cast<unsigned char *>(p.workspace);
  float *ws_k = ws != nullptr ? reinterpret_cast<float *>(ws + w.kp) : nullptr;
  float *ws_v = ws != nullptr ? reinterpret_cast<float *>(ws + w.vp) : nullptr;
  cudaError_t err = proj_fwd_one<T>(p, p.k, p.k_stride, p.e, p.e_stride, p.e_heads, p.kp,
                                    p.kp_stride, ws_k, stream);
  if (err != cudaSuccess) return err;
  return proj_fwd_one<T>(p, p.v, p.v_stride, p.f, p.f_stride, p.f_heads, p.vp, p.vp_stride, ws_v,
                         stream);
}

// dX[b, :, h, :] = P_hpᵀ dXp[b, :, h, :] (N x head_dim), padded rows 0.
template <typename T>
cudaError_t proj_bwd_dx(const fk_linformer_proj_bwd_params &p, const void *e, fk_proj_strides es,
                        int e_heads, const void *dxp, fk_strides dps, void *dx, fk_strides dxs,
                        cudaStream_t stream) {
  using Traits = ProjGemmTraits<T>;
  const int H = p.heads_kv;
  // A = E_heᵀ (N x k_proj): rows the keys (padded ones masked: zero rows, dX rows of 0).
  gemm::MappedOperand<T, KeyMask::kRows> a{};
  a.base = static_cast<const T *>(e);
  a.row_map = IndexMap3::linear(es.col), a.col_map = IndexMap3::linear(es.row);
  a.rows = p.seqlen, a.cols = p.k_proj;
  a.group_map = IndexMap3{H, 1, 0, e_heads > 1 ? es.head : 0, 0};
  a.mask = p.key_padding;
  a.mask_map = IndexMap3{H, 1, p.seqlen, 0, 0};
  a.vec = es.row == 1 && es.col % 8 == 0 && (e_heads == 1 || es.head % 8 == 0) && aligned16(e);
  // B = dXpᵀ (head_dim x k_proj): the element gather, as the forward's Xᵀ.
  gemm::MappedOperand<T> b{};
  b.base = static_cast<const T *>(dxp);
  b.row_map = IndexMap3::linear(1), b.col_map = IndexMap3::linear(dps.row);
  b.rows = p.head_dim, b.cols = p.k_proj;
  b.group_map = IndexMap3{H, 1, dps.batch, dps.head, 0};
  b.vec = false;
  gemm::MappedEpilogueParams<T> ep{};
  ep.out = static_cast<T *>(dx);
  ep.row_map = IndexMap3::linear(dxs.row), ep.col_map = IndexMap3::linear(1);
  ep.rows = p.seqlen, ep.cols = p.head_dim;
  ep.group_map = IndexMap3{H, 1, dxs.batch, dxs.head, 0};
  ep.activation = 0;
  ep.vec = dxs.row % 8 == 0 && dxs.batch % 8 == 0 && dxs.head % 8 == 0 && aligned16(dx);
  return gemm::launch_tile_gemm<Traits, gemm::MappedLoader<Traits, Traits::kBlockM, KeyMask::kRows>,
                                gemm::MappedLoader<Traits, Traits::kBlockN>,
                                gemm::MappedStagedEpilogue<Traits>>(a, b, ep, p.k_proj, p.batch * H,
                                                                    stream);
}

// One segment of dE's operands (see ProjGradOperand): X (B, rows, H, D) through xs.
template <typename T>
void grad_segment(ProjGradOperand<T> &o, int seg, const void *x, fk_strides xs, int e_heads,
                  const fk_linformer_proj_bwd_params &p) {
  const bool headwise = e_heads == 1;
  const int heads_per_group = headwise ? p.heads_kv : 1;
  o.base[seg] = static_cast<const T *>(x);
  o.row_stride[seg] = xs.row;
  o.group_stride[seg] = headwise ? 0 : xs.head;
  o.col_map[seg] = IndexMap3{heads_per_group, p.head_dim, xs.batch, xs.head, 1};
  o.vec = o.vec && xs.row % 8 == 0 && xs.batch % 8 == 0 && xs.head % 8 == 0 && aligned16(x);
}

// dP_hp = Σ dXp X~ᵀ [+ Σ dYp Y~ᵀ] (k_proj x n_max), one group per head of P.
template <typename T>
cudaError_t proj_bwd_dp(const fk_linformer_proj_bwd_params &p, int e_heads, const void *dxp,
                        fk_strides dps, const void *x, fk_strides xs, const void *dyp,
                        fk_strides dys, const void *y, fk_strides ys, void *dp,
                        fk_proj_strides dpst, cudaStream_t stream) {
  using Traits = ProjGemmTraits<T>;
  const int heads_per_group = e_heads == 1 ? p.heads_kv : 1;
  const int seg_cols = p.batch * heads_per_group * p.head_dim;
  const int segs = dyp != nullptr ? 2 : 1;
  ProjGradOperand<T> a{}, b{};
  a.vec = b.vec = true;
  grad_segment<T>(a, 0, dxp, dps, e_heads, p);
  grad_segment<T>(b, 0, x, xs, e_heads, p);
  if (segs == 2) {
    grad_segment<T>(a, 1, dyp, dys, e_heads, p);
    grad_segment<T>(b, 1, y, ys, e_heads, p);
  }
  a.rows = p.k_proj, b.rows = p.seqlen;
  a.cols = b.cols = segs * seg_cols;
  a.seg_cols = b.seg_cols = seg_cols;
  a.cols_per_batch = b.cols_per_batch = heads_per_group * p.head_dim;
  b.mask = p.key_padding, b.mask_ld = p.seqlen;
  gemm::EpilogueParams<T> ep{};
  ep.out = static_cast<T *>(dp);
  ep.row_map = IndexMap3::linear(dpst.row), ep.col_map = IndexMap3::linear(dpst.col);
  ep.rows = p.k_proj, ep.cols = p.n_max;
  ep.group_stride = dpst.head;
  ep.activation = 0;
  ep.vec =
      dpst.col == 1 && dpst.row % 8 == 0 && (e_heads == 1 || dpst.head % 8 == 0) && aligned16(dp);
  return gemm::launch_tile_gemm<Traits, ProjGradLoader<Traits, Traits::kBlockM>,
                                ProjGradLoader<Traits, Traits::kBlockN>>(a, b, ep, a.cols, e_heads,
                                                                         stream);
}

template <typename T>
cudaError_t proj_bwd(const fk_linformer_proj_bwd_params &p, cudaStream_t stream) {
  cudaError_t err =
      proj_bwd_dx<T>(p, p.e, p.e_stride, p.e_heads, p.dkp, p.dkp_stride, p.dk, p.dk_stride, stream);
  if (err != cudaSuccess) return err;
  err =
      proj_bwd_dx<T>(p, p.f, p.f_stride, p.f_heads, p.dvp, p.dvp_stride, p.dv, p.dv_stride, stream);
  if (err != cudaSuccess) return err;
  if (p.shared_kv)
    return proj_bwd_dp<T>(p, p.e_heads, p.dkp, p.dkp_stride, p.k, p.k_stride, p.dvp, p.dvp_stride,
                          p.v, p.v_stride, p.de, p.de_stride, stream);
  err = proj_bwd_dp<T>(p, p.e_heads, p.dkp, p.dkp_stride, p.k, p.k_stride, nullptr, {}, nullptr, {},
                       p.de, p.de_stride, stream);
  if (err != cudaSuccess) return err;
  return proj_bwd_dp<T>(p, p.f_heads, p.dvp, p.dvp_stride, p.v, p.v_stride, nullptr, {}, nullptr,
                        {}, p.df, p.df_stride, stream);
}

} // namespace linformer
} // namespace fk
