// FlashAttention-2-style dense attention backward for sm_80+, deterministic.
//
// Three kernels, in stream order:
// 1. delta: Delta_i = sum_d dO_id O_id (f32, laid out like LSE), memory-bound.
// 2. dK/dV: one thread block per (key block, kv head, batch) keeps K_j, V_j in shared
//    memory and walks every query block (of every query head of the GQA group) that can
//    see it. It works on TRANSPOSED score tiles, S^T = K_j Q_i^T, so a warp owns 16 key
//    rows exactly as a forward warp owns 16 query rows: P^T, dP^T = V_j dO_i^T and
//    dS^T = P^T (dP^T - Delta) stay in registers and feed dV += P^T dO_i and
//    dK += dS^T Q_i directly as MMA A operands, like P in the forward's O += P V.
// 3. dQ: one thread block per (query block, query head, batch) walks the visible key
//    blocks: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K, all in registers.
// Why two passes instead of FA2's single pass with atomicAdd on dQ: every gradient row is
// owned and summed by one thread block in a fixed order, so the result is bitwise
// reproducible, and GQA's sum over a group's query heads needs no atomics either (it is a
// loop inside the dK/dV block). The price is computing S and P twice (once per pass):
// 7 matmuls of Nq x Nk x D instead of 5. Under a window or causal mask each pass visits
// only the block ranges that intersect the visible band, so the cost is O(N * window).
//
// Notation for MMA fragments (m16n8k16, lane = 4 g + t) is that of mma_sm80.cuh; the
// shared-memory tile / ldmatrix idioms are the ones of dense_fwd_sm80.cuh:
// - A operand from a row-major tile (rows = M, contiguous K): ldmatrix_x4 at row
//   (lane % 8) + ((lane / 8) & 1) * 8, chunk 2 ks + lane / 16 (the forward's Q).
// - B operand from a tile whose rows are N, contiguous along K: ldmatrix_x4 at row
//   (j + lane / 16) * 8 + lane % 8, chunk 2 ks + ((lane / 8) & 1), giving the b0, b1 of
//   8-column tiles j and j + 1 (the forward's K).
// - B operand from a tile whose rows are K, contiguous along N: ldmatrix_x4_trans at row
//   kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8, chunk 2 np + lane / 16, giving the b0, b1
//   of 8-column tiles 2 np and 2 np + 1 (the forward's V).
// - The f32 accumulators of 8-column tiles 2 kk and 2 kk + 1 packed pairwise are the A
//   operand of k-step kk (the forward's P).
#pragma once

#include "../common/launch.cuh"
#include "../common/mma_sm80.cuh"
#include "dense_bwd.h"

namespace fk {
namespace dense_bwd_detail {

constexpr float kLog2e = 1.4426950408889634f;

// Rows of one sequence (batch entry). Dense: the batch strides locate it; varlen: the
// packed row offsets do (and the batch strides are ignored).
struct SeqInfo {
  int nq, nk;        // lengths
  int q_start;       // first packed row of Q / O / dO / dQ (0 for dense)
  int k_start;       // first packed row of K / V / dK / dV (0 for dense)
  bool varlen;
  int batch;

  __device__ __forceinline__ SeqInfo(const fk_attention_bwd_params &p, int b) : batch(b) {
    varlen = p.cu_seqlens_q != nullptr;
    if (varlen) {
      q_start = p.cu_seqlens_q[b];
      nq = p.cu_seqlens_q[b + 1] - q_start;
      k_start = p.cu_seqlens_k[b];
      nk = p.cu_seqlens_k[b + 1] - k_start;
    } else {
      q_start = 0;
      k_start = 0;
      nq = p.seqlen_q;
      nk = p.seqlen_k;
    }
  }
  // Element offset of row 0 of this sequence, head `head`, of a Q-like tensor.
  __device__ __forceinline__ int64_t q_offset(int64_t batch_stride, int64_t row_stride,
                                              int64_t head_stride, int head) const {
    return (varlen ? int64_t(q_start) * row_stride : int64_t(batch) * batch_stride) +
           int64_t(head) * head_stride;
  }
  __device__ __forceinline__ int64_t k_offset(int64_t batch_stride, int64_t row_stride,
                                              int64_t head_stride, int head) const {
    return (varlen ? int64_t(k_start) * row_stride : int64_t(batch) * batch_stride) +
           int64_t(head) * head_stride;
  }
  // Index of row 0 of this sequence, head `head`, in LSE / Delta.
  __device__ __forceinline__ int64_t lse_offset(const fk_attention_bwd_params &p,
                                                int head) const {
    return (varlen ? int64_t(q_start) : int64_t(batch) * p.lse_batch_stride) +
           int64_t(head) * p.lse_head_stride;
  }
};

// Query i sees key j (contract in flashkernels.h; i, j relative to the sequence).
template <bool kHasMask>
__device__ __forceinline__ bool visible(int i, int j, int nq, int nk, int diag, int wl,
                                        int wr) {
  bool ok = i < nq && j < nk;
  if (kHasMask) {
    if (wl >= 0) ok = ok && j >= i + diag - wl;
    if (wr >= 0) ok = ok && j <= i + diag + wr;
  }
  return ok;
}

// Whether some (query, key) of the tile [m0, m0 + BM) x [n0, n0 + BN) is not visible.
template <bool kHasMask>
__device__ __forceinline__ bool tile_needs_mask(int m0, int bm, int n0, int bn, int nq, int nk,
                                                int diag, int wl, int wr) {
  bool need = m0 + bm > nq || n0 + bn > nk;
  if (kHasMask) {
    if (wr >= 0) need = need || n0 + bn - 1 > m0 + diag + wr;
    if (wl >= 0) need = need || n0 < m0 + bm - 1 + diag - wl;
  }
  return need;
}

// LSE in the log2 domain for P = exp2(s * scale * log2e - lse2). A row without any
// visible key has LSE -inf; +inf makes every P of that row exp2(-inf) = 0 (instead of
// NaN from -inf - -inf). Rows past the sequence end get the same treatment.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// Cooperative cp.async of a ROWS x COLS tile (COLS = the padded head dim). Rows >=
// rows_valid and 16-byte chunks >= chunks_valid (the padded head-dim columns) become
// zeros. rows_valid must be >= 1 so that the tile's first row is a legal address.
template <int kNThreads, int COLS, int ROWS, typename Element>
__device__ __forceinline__ void load_tile(Element *smem, const Element *gmem,
                                          int64_t row_stride, int rows_valid,
                                          int chunks_valid, int tid) {
  using Tile = SwizzledTile<COLS>;
  constexpr int kChunks = ROWS * Tile::kChunksPerRow;
  static_assert(kChunks % kNThreads == 0, "tile must split evenly over threads");
#pragma unroll
  for (int i = 0; i < kChunks / kNThreads; ++i) {
    const int idx = i * kNThreads + tid;
    const int row = idx / Tile::kChunksPerRow;
    const int chunk = idx % Tile::kChunksPerRow;
    const bool valid = row < rows_valid && chunk < chunks_valid;
    const Element *src = gmem + (valid ? int64_t(row) * row_stride + chunk * 8 : 0);
    cp_async_16(smem_addr(smem + Tile::offset(row, chunk)), src, valid ? 16 : 0);
  }
}

// A fragment (16 rows from row0, k-step ks) of a row-major tile: the forward's Q.
template <int COLS, typename Element>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Element *tile, int row0, int ks,
                                       int lane) {
  const int row = row0 + (lane % 8) + ((lane / 8) & 1) * 8;
  ldmatrix_x4(a, smem_addr(tile + SwizzledTile<COLS>::offset(row, 2 * ks + lane / 16)));
}

// acc (16 x 8 NT) += A B^T over K = COLS, the forward's S = Q K^T: A is rows
// [a_row0, a_row0 + 16) of the row-major tile `a_tile` (16 x COLS), B is the tile `b_tile`
// whose 8 NT rows are the N index and whose columns are the K index.
template <int COLS, int NT, typename Element>
__device__ __forceinline__ void gemm_abt(float (&acc)[NT][4], const Element *a_tile, int a_row0,
                                         const Element *b_tile, int lane) {
  static_assert(NT % 2 == 0, "column tiles come in pairs");
#pragma unroll
  for (int ks = 0; ks < COLS / 16; ++ks) {
    uint32_t a[4];
    load_a<COLS>(a, a_tile, a_row0, ks, lane);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      const int row = (j + lane / 16) * 8 + (lane % 8);
      const int chunk = 2 * ks + ((lane / 8) & 1);
      ldmatrix_x4(b, smem_addr(b_tile + SwizzledTile<COLS>::offset(row, chunk)));
      mma_16x8x16<Element>(acc[j], a, b[0], b[1]);
      mma_16x8x16<Element>(acc[j + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x COLS) += X B over K = 8 KT, the forward's O += P V: X is held as f32
// accumulators x[KT] (16 x 8 each) and packed into A fragments; B is the row-major tile
// `b_tile` whose 8 KT rows are the K index, contiguous along N = COLS, read with
// ldmatrix trans.
template <int COLS, int KT, typename Element>
__device__ __forceinline__ void gemm_xb(float (&acc)[COLS / 8][4], const float (&x)[KT][4],
                                        const Element *b_tile, int lane) {
  using ET = ElemTraits<Element>;
  static_assert(KT % 2 == 0, "k-steps are 16 wide");
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    uint32_t a[4];
    a[0] = ET::pack(x[2 * kk][0], x[2 * kk][1]);
    a[1] = ET::pack(x[2 * kk][2], x[2 * kk][3]);
    a[2] = ET::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[3] = ET::pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
#pragma unroll
    for (int np = 0; np < COLS / 16; ++np) {
      uint32_t b[4];
      const int row = kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
      ldmatrix_x4_trans(b, smem_addr(b_tile + SwizzledTile<COLS>::offset(row, 2 * np + lane / 16)));
      mma_16x8x16<Element>(acc[2 * np], a, b[0], b[1]);
      mma_16x8x16<Element>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

template <int NT> __device__ __forceinline__ void zero(float (&x)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[j][e] = 0.f;
}

// Writes a warp's 16 x COLS f32 accumulator tile (times `mul`) to rows [row0, row0 + 16) of
// a swizzled smem tile as Element (the forward's O staging).
template <int COLS, typename Element>
__device__ __forceinline__ void stage_rows(Element *tile, int row0, const float (&acc)[COLS / 8][4],
                                           float mul, int lane) {
  using ET = ElemTraits<Element>;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
#pragma unroll
    for (int i = 0; i < COLS / 8; ++i)
      *reinterpret_cast<uint32_t *>(tile + SwizzledTile<COLS>::offset(row, i) + 2 * t) =
          ET::pack(acc[i][2 * r] * mul, acc[i][2 * r + 1] * mul);
  }
}

// 16-byte stores of rows [row0, row0 + 16) of a staged tile by one warp; global rows
// >= rows_valid and chunks >= chunks_valid are skipped.
template <int COLS, typename Element>
__device__ __forceinline__ void store_rows(Element *gmem, int64_t row_stride, const Element *tile,
                                           int row0, int rows_valid, int chunks_valid, int lane) {
  using Tile = SwizzledTile<COLS>;
#pragma unroll
  for (int i = lane; i < 16 * Tile::kChunksPerRow; i += 32) {
    const int r = i / Tile::kChunksPerRow;
    const int chunk = i % Tile::kChunksPerRow;
    const int row = row0 + r;
    if (row < rows_valid && chunk < chunks_valid)
      *reinterpret_cast<uint4 *>(gmem + int64_t(row) * row_stride + chunk * 8) =
          *reinterpret_cast<const uint4 *>(tile + Tile::offset(row, chunk));
  }
}

template <typename Element> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2 *>(&v));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&v));
}

// ---------------------------------------------------------------------------------------
// Kernel 1: Delta = rowsum(dO * O). 128 threads, 8 lanes per row, 64 rows per block.
constexpr int kDeltaThreads = 128;
constexpr int kDeltaRows = 64;

template <typename Element>
__global__ void __launch_bounds__(kDeltaThreads)
    dense_bwd_delta_kernel(const fk_attention_bwd_params p) {
  constexpr int kLanesPerRow = 8;
  constexpr int kRowsPerPass = kDeltaThreads / kLanesPerRow;
  const int head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  const int m0 = blockIdx.x * kDeltaRows;
  if (m0 >= seq.nq) return;
  const Element *o = static_cast<const Element *>(p.o) +
                     seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, head);
  const Element *dout = static_cast<const Element *>(p.dout) +
                        seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, head);
  float *delta = p.delta + seq.lse_offset(p, head);
  const int sub = threadIdx.x % kLanesPerRow;
  const int chunks = p.head_dim / 8;
  for (int r = threadIdx.x / kLanesPerRow; r < kDeltaRows; r += kRowsPerPass) {
    const int i = m0 + r;
    float acc = 0.f;
    if (i < seq.nq) {
      for (int c = sub; c < chunks; c += kLanesPerRow) {
        const uint4 ov = *reinterpret_cast<const uint4 *>(o + int64_t(i) * p.o_row_stride + c * 8);
        const uint4 dv =
            *reinterpret_cast<const uint4 *>(dout + int64_t(i) * p.do_row_stride + c * 8);
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
    if (sub == 0 && i < seq.nq) delta[i] = acc;
  }
}

// ---------------------------------------------------------------------------------------
// Kernel 2: dK, dV.
//
// kBlockN key rows per block, 16 per row group of warps; kBlockM queries per step.
// kSplitRoles: two warps per row group, both compute S^T and P^T, one then accumulates
// dV (all of D), the other computes dP^T, dS^T and accumulates dK; this halves the
// accumulator registers per thread (needed at D = 256) for 5 instead of 4 matmuls.
template <int kHeadDim_, typename Element_, int kBlockN_, int kBlockM_, bool kSplitRoles_,
          int kMinBlocksPerSm_>
struct DenseBwdKVTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr bool kSplitRoles = kSplitRoles_;
  static constexpr int kRowGroups = kBlockN / 16;
  static constexpr int kNWarps = kRowGroups * (kSplitRoles ? 2 : 1);
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static_assert(kBlockN % 16 == 0 && kBlockM % 16 == 0, "MMA tiles are 16 rows");
  static_assert(kNThreads >= kBlockM, "one thread per query loads LSE / Delta");
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements of K or V
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements of one Q or dO stage
  // K, V; two stages of Q and of dO; two stages of LSE (log2) and of Delta.
  static constexpr size_t kSmemBytes =
      size_t(2 * kSmemKV + 4 * kSmemQ) * sizeof(Element) + 4 * kBlockM * sizeof(float);
};

template <class Tr, bool kHasMask>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocksPerSm)
    dense_bwd_dkdv_kernel(const fk_attention_bwd_params p) {
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim;
  constexpr int BN = Tr::kBlockN;
  constexpr int BM = Tr::kBlockM;
  constexpr int kSTiles = BM / 8; // 8-query column tiles of S^T
  constexpr int kOTiles = D / 8;  // 8-column tiles of dK, dV
  constexpr bool kSplit = Tr::kSplitRoles;
  // acc[kDv] accumulates dV, acc[kDk] dK; with split roles a warp holds only its own.
  constexpr int kNAcc = kSplit ? 1 : 2;
  constexpr int kDv = 0;
  constexpr int kDk = kSplit ? 0 : 1;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sK = reinterpret_cast<Element *>(smem_raw);
  Element *sV = sK + Tr::kSmemKV;
  Element *sQ = sV + Tr::kSmemKV;      // two stages
  Element *sdO = sQ + 2 * Tr::kSmemQ;  // two stages
  float *sLse = reinterpret_cast<float *>(sdO + 2 * Tr::kSmemQ); // two stages, log2 domain
  float *sDelta = sLse + 2 * BM;                                  // two stages

  const int n_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = (kSplit ? warp / 2 : warp) * 16; // this warp's 16 key rows
  const bool do_dv = !kSplit || warp % 2 == 0;
  const bool do_dk = !kSplit || warp % 2 == 1;

  const int nq = seq.nq, nk = seq.nk;
  const int n0 = n_block * BN;
  if (n0 >= nk) return; // past this sequence's keys (varlen): nothing to write
  const int diag = nk - nq;
  const int wl = p.window_left, wr = p.window_right;
  const int chunks_valid = p.head_dim / 8;
  const int group = p.heads / p.heads_kv;
  const int head0 = kv_head * group;

  // Queries that see some key of [n0, last_key]: j <= i + diag + wr gives
  // i >= n0 - diag - wr, j >= i + diag - wl gives i <= last_key - diag + wl.
  const int last_key = min(n0 + BN, nk) - 1;
  int i_lo = 0, i_hi = nq - 1;
  if (kHasMask) {
    if (wr >= 0) i_lo = max(i_lo, n0 - diag - wr);
    if (wl >= 0) i_hi = min(i_hi, last_key - diag + wl);
  }
  const int m_begin = i_lo / BM;
  const int n_mblocks = i_hi >= i_lo ? i_hi / BM + 1 - m_begin : 0;
  const int n_iters = group * n_mblocks; // (query head, query block) pairs, head-major

  const Element *q = static_cast<const Element *>(p.q) +
                     seq.q_offset(p.q_batch_stride, p.q_row_stride, 0, 0);
  const Element *dout = static_cast<const Element *>(p.dout) +
                        seq.q_offset(p.do_batch_stride, p.do_row_stride, 0, 0);
  const Element *k = static_cast<const Element *>(p.k) +
                     seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, kv_head) +
                     int64_t(n0) * p.k_row_stride;
  const Element *v = static_cast<const Element *>(p.v) +
                     seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, kv_head) +
                     int64_t(n0) * p.v_row_stride;

  auto iter_head = [&](int it) { return head0 + it / n_mblocks; };
  auto iter_m0 = [&](int it) { return (m_begin + it % n_mblocks) * BM; };
  auto load_q_do = [&](int it, int stage) {
    const int h = iter_head(it);
    const int m0 = iter_m0(it);
    load_tile<Tr::kNThreads, D, BM>(
        sQ + stage * Tr::kSmemQ,
        q + int64_t(h) * p.q_head_stride + int64_t(m0) * p.q_row_stride, p.q_row_stride,
        nq - m0, chunks_valid, tid);
    load_tile<Tr::kNThreads, D, BM>(
        sdO + stage * Tr::kSmemQ,
        dout + int64_t(h) * p.do_head_stride + int64_t(m0) * p.do_row_stride, p.do_row_stride,
        nq - m0, chunks_valid, tid);
  };
  // LSE (log2 domain) and Delta of query m0 + tid of iteration it (tid < BM).
  auto fetch_stats = [&](int it, float &l2, float &dl) {
    const int h = iter_head(it);
    const int i = iter_m0(it) + tid;
    l2 = INFINITY;
    dl = 0.f;
    if (i < nq) {
      const int64_t idx = seq.lse_offset(p, h) + i;
      l2 = lse_log2(p.lse[idx]);
      dl = p.delta[idx];
    }
  };

  if (n_iters > 0) {
    load_tile<Tr::kNThreads, D, BN>(sK, k, p.k_row_stride, nk - n0, chunks_valid, tid);
    load_tile<Tr::kNThreads, D, BN>(sV, v, p.v_row_stride, nk - n0, chunks_valid, tid);
    load_q_do(0, 0);
    if (tid < BM) fetch_stats(0, sLse[tid], sDelta[tid]);
  }
  cp_async_commit();

  float acc[kNAcc][kOTiles][4];
#pragma unroll
  for (int a = 0; a < kNAcc; ++a) zero(acc[a]);
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int it = 0; it < n_iters; ++it) {
    const int stage = it & 1;
    const bool has_next = it + 1 < n_iters;
    float next_l2 = INFINITY, next_dl = 0.f;
    if (has_next) {
      load_q_do(it + 1, stage ^ 1);
      cp_async_commit();
      // Into registers now, into shared memory after this step's math (the global
      // load latency hides behind it).
      if (tid < BM) fetch_stats(it + 1, next_l2, next_dl);
      cp_async_wait<1>(); // step it has landed, step it + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sQs = sQ + stage * Tr::kSmemQ;
    const Element *sdOs = sdO + stage * Tr::kSmemQ;
    const float *lse_s = sLse + stage * BM;
    const float *delta_s = sDelta + stage * BM;
    const int m0 = iter_m0(it);

    // S^T = K_j Q_i^T: rows = this warp's keys, columns = the step's BM queries.
    float s[kSTiles][4];
    zero(s);
    gemm_abt<D>(s, sK, warp_row0, sQs, lane);

    if (tile_needs_mask<kHasMask>(m0, BM, n0, BN, nq, nk, diag, wl, wr)) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + warp_row0 + g + (e >= 2 ? 8 : 0);
          const int query = m0 + j * 8 + 2 * t + (e & 1);
          if (!visible<kHasMask>(query, key, nq, nk, diag, wl, wr)) s[j][e] = -INFINITY;
        }
    }
    // P^T = exp2(S^T scale log2e - lse2[query]); the query is the column: 2 t + (e & 1).
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
      const float2 l2 = *reinterpret_cast<const float2 *>(lse_s + j * 8 + 2 * t);
      s[j][0] = exp2f(fmaf(s[j][0], scale_log2, -l2.x));
      s[j][1] = exp2f(fmaf(s[j][1], scale_log2, -l2.y));
      s[j][2] = exp2f(fmaf(s[j][2], scale_log2, -l2.x));
      s[j][3] = exp2f(fmaf(s[j][3], scale_log2, -l2.y));
    }

    // dV += P^T dO_i (P^T straight from the accumulators, like P V in the forward).
    if (do_dv) gemm_xb<D>(acc[kDv], s, sdOs, lane);

    if (do_dk) {
      // dP^T = V_j dO_i^T, then dS^T = P^T (dP^T - Delta[query]).
      float dp[kSTiles][4];
      zero(dp);
      gemm_abt<D>(dp, sV, warp_row0, sdOs, lane);
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
        const float2 dl = *reinterpret_cast<const float2 *>(delta_s + j * 8 + 2 * t);
        dp[j][0] = s[j][0] * (dp[j][0] - dl.x);
        dp[j][1] = s[j][1] * (dp[j][1] - dl.y);
        dp[j][2] = s[j][2] * (dp[j][2] - dl.x);
        dp[j][3] = s[j][3] * (dp[j][3] - dl.y);
      }
      // dK += dS^T Q_i (scale applied at the end).
      gemm_xb<D>(acc[kDk], dp, sQs, lane);
    }

    if (has_next && tid < BM) {
      sLse[(stage ^ 1) * BM + tid] = next_l2;
      sDelta[(stage ^ 1) * BM + tid] = next_dl;
    }
    __syncthreads(); // everyone is done with this stage before it is refilled
  }

  // Epilogue: stage this warp's rows of dK (in sK) / dV (in sV) for 16-byte stores. Keys
  // that no query sees (n_iters == 0) get zeros, as they must. No cp.async wait or barrier
  // is needed first (the emulator's race check agrees): the last step waited with wait<0>
  // and its closing barrier orders every read of these rows (with split roles the row
  // group's other warp reads them too); with n_iters == 0 nothing was loaded or read.
  const int rows_valid = nk - n0;
  if (do_dk) {
    stage_rows<D>(sK, warp_row0, acc[kDk], p.softmax_scale, lane);
    __syncwarp();
    Element *dk = static_cast<Element *>(p.dk) +
                  seq.k_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, kv_head) +
                  int64_t(n0) * p.dk_row_stride;
    store_rows<D>(dk, p.dk_row_stride, sK, warp_row0, rows_valid, chunks_valid, lane);
  }
  if (do_dv) {
    stage_rows<D>(sV, warp_row0, acc[kDv], 1.f, lane);
    __syncwarp();
    Element *dv = static_cast<Element *>(p.dv) +
                  seq.k_offset(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, kv_head) +
                  int64_t(n0) * p.dv_row_stride;
    store_rows<D>(dv, p.dv_row_stride, sV, warp_row0, rows_valid, chunks_valid, lane);
  }
}

// ---------------------------------------------------------------------------------------
// Kernel 3: dQ. kBlockM query rows per block (16 per warp), kBlockN keys per step.
template <int kHeadDim_, typename Element_, int kBlockM_, int kBlockN_, int kMinBlocksPerSm_>
struct DenseBwdQTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kBlockM / 16;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "MMA tiles are 16 rows");
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements of Q or dO
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements of one K or V stage
  // Q, dO; two stages of K and of V.
  static constexpr size_t kSmemBytes = size_t(2 * kSmemQ + 4 * kSmemKV) * sizeof(Element);
};

template <class Tr, bool kHasMask>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocksPerSm)
    dense_bwd_dq_kernel(const fk_attention_bwd_params p) {
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kSTiles = BN / 8; // 8-key column tiles of S
  constexpr int kOTiles = D / 8;  // 8-column tiles of dQ

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sQ = reinterpret_cast<Element *>(smem_raw);
  Element *sdO = sQ + Tr::kSmemQ;
  Element *sK = sdO + Tr::kSmemQ;      // two stages
  Element *sV = sK + 2 * Tr::kSmemKV;  // two stages

  // Reverse order: under causal masking the last query blocks have the most work.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = warp * 16;

  const int nq = seq.nq, nk = seq.nk;
  const int m0 = m_block * BM;
  if (m0 >= nq) return; // past this sequence's queries (varlen)
  const int diag = nk - nq;
  const int wl = p.window_left, wr = p.window_right;
  const int chunks_valid = p.head_dim / 8;
  const int kv_head = head / (p.heads / p.heads_kv);

  // Keys that some query of [m0, last_q] sees.
  const int last_q = min(m0 + BM, nq) - 1;
  int j_lo = 0, j_hi = nk - 1;
  if (kHasMask) {
    if (wl >= 0) j_lo = max(j_lo, m0 + diag - wl);
    if (wr >= 0) j_hi = min(j_hi, last_q + diag + wr);
  }
  const int n_begin = j_lo / BN;
  const int n_end = j_hi >= j_lo ? j_hi / BN + 1 : n_begin;

  const Element *q = static_cast<const Element *>(p.q) +
                     seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, head) +
                     int64_t(m0) * p.q_row_stride;
  const Element *dout = static_cast<const Element *>(p.dout) +
                        seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, head) +
                        int64_t(m0) * p.do_row_stride;
  const Element *k = static_cast<const Element *>(p.k) +
                     seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, kv_head);
  const Element *v = static_cast<const Element *>(p.v) +
                     seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, kv_head);

  auto load_kv = [&](int n, int stage) {
    const int n0 = n * BN;
    load_tile<Tr::kNThreads, D, BN>(sK + stage * Tr::kSmemKV, k + int64_t(n0) * p.k_row_stride,
                                    p.k_row_stride, nk - n0, chunks_valid, tid);
    load_tile<Tr::kNThreads, D, BN>(sV + stage * Tr::kSmemKV, v + int64_t(n0) * p.v_row_stride,
                                    p.v_row_stride, nk - n0, chunks_valid, tid);
  };

  const bool any_keys = n_end > n_begin;
  if (any_keys) {
    load_tile<Tr::kNThreads, D, BM>(sQ, q, p.q_row_stride, nq - m0, chunks_valid, tid);
    load_tile<Tr::kNThreads, D, BM>(sdO, dout, p.do_row_stride, nq - m0, chunks_valid, tid);
    load_kv(n_begin, 0);
  }
  cp_async_commit();

  // LSE (log2 domain) and Delta of this thread's rows g and g + 8.
  float l2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp_row0 + g + 8 * r;
    l2[r] = INFINITY;
    dl[r] = 0.f;
    if (i < nq) {
      const int64_t idx = seq.lse_offset(p, head) + i;
      l2[r] = lse_log2(p.lse[idx]);
      dl[r] = p.delta[idx];
    }
  }

  float acc[kOTiles][4];
  zero(acc);
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int n = n_begin; n < n_end; ++n) {
    const int stage = (n - n_begin) & 1;
    if (n + 1 < n_end) {
      load_kv(n + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>(); // block n has landed, block n + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sKs = sK + stage * Tr::kSmemKV;
    const Element *sVs = sV + stage * Tr::kSmemKV;
    const int n0 = n * BN;

    // S = Q K^T, exactly the forward's.
    float s[kSTiles][4];
    zero(s);
    gemm_abt<D>(s, sQ, warp_row0, sKs, lane);

    if (tile_needs_mask<kHasMask>(m0, BM, n0, BN, nq, nk, diag, wl, wr)) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int query = m0 + warp_row0 + g + (e >= 2 ? 8 : 0);
          const int key = n0 + j * 8 + 2 * t + (e & 1);
          if (!visible<kHasMask>(query, key, nq, nk, diag, wl, wr)) s[j][e] = -INFINITY;
        }
    }
    // P = exp2(S scale log2e - lse2[row]); the row is g + 8 (e >= 2).
#pragma unroll
    for (int j = 0; j < kSTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = exp2f(fmaf(s[j][e], scale_log2, -l2[e >> 1]));

    // dP = dO V^T (dO as the A operand like Q, V as the B operand like K).
    float dp[kSTiles][4];
    zero(dp);
    gemm_abt<D>(dp, sdO, warp_row0, sVs, lane);
    // dS = P (dP - Delta[row]).
#pragma unroll
    for (int j = 0; j < kSTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - dl[e >> 1]);

    // dQ += dS K (dS from the accumulators, K as the B operand like V in P V).
    gemm_xb<D>(acc, dp, sKs, lane);
    __syncthreads(); // everyone is done with this stage before it is refilled
  }

  // Epilogue: rows without any visible key get zeros. Stage this warp's rows in sQ (only
  // this warp ever read them) for 16-byte stores. No cp.async wait or barrier is needed
  // first (the emulator's race check agrees): nothing is in flight (the last key block
  // waited with wait<0>; with none, nothing was loaded) and Q landed before the first key
  // block's barrier.
  stage_rows<D>(sQ, warp_row0, acc, p.softmax_scale, lane);
  __syncwarp();
  Element *dq = static_cast<Element *>(p.dq) +
                seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, head) +
                int64_t(m0) * p.dq_row_stride;
  store_rows<D>(dq, p.dq_row_stride, sQ, warp_row0, nq - m0, chunks_valid, lane);
}

} // namespace dense_bwd_detail

// Tile configuration per padded head dim. Every configuration stays within 99 KB of
// dynamic shared memory (sm_86 / sm_89) and 4 warps per block.
// - dK/dV: kKVBlockN keys per block, kKVBlockM queries per step. D = 256 splits the dK
//   and dV accumulators over two warps per 16 keys (kKVSplitRoles).
// - dQ: kQBlockM queries per block, kQBlockN keys per step.
template <int kHeadDim> struct DenseBwdConfigSm80;
template <> struct DenseBwdConfigSm80<64> {
  static constexpr int kKVBlockN = 64, kKVBlockM = 64, kKVMinBlocks = 2;
  static constexpr bool kKVSplitRoles = false;
  static constexpr int kQBlockM = 64, kQBlockN = 64, kQMinBlocks = 2;
};
template <> struct DenseBwdConfigSm80<128> {
  static constexpr int kKVBlockN = 64, kKVBlockM = 32, kKVMinBlocks = 1;
  static constexpr bool kKVSplitRoles = false;
  static constexpr int kQBlockM = 64, kQBlockN = 64, kQMinBlocks = 1;
};
template <> struct DenseBwdConfigSm80<256> {
  static constexpr int kKVBlockN = 32, kKVBlockM = 32, kKVMinBlocks = 1;
  static constexpr bool kKVSplitRoles = true;
  static constexpr int kQBlockM = 64, kQBlockN = 16, kQMinBlocks = 1;
};

template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_bwd_sm80(const fk_attention_bwd_params &p, cudaStream_t stream) {
  using namespace dense_bwd_detail;
  using C = DenseBwdConfigSm80<kHeadDim>;
  using KV = DenseBwdKVTraitsSm80<kHeadDim, Element, C::kKVBlockN, C::kKVBlockM,
                                  C::kKVSplitRoles, C::kKVMinBlocks>;
  using Q = DenseBwdQTraitsSm80<kHeadDim, Element, C::kQBlockM, C::kQBlockN, C::kQMinBlocks>;
  static_assert(KV::kSmemBytes <= 99 * 1024 && Q::kSmemBytes <= 99 * 1024,
                "shared memory must fit sm_86 / sm_89 (99 KB per block)");
  cudaError_t err = cudaSuccess;
  // Grids are sized by the longest sequence; an empty one would be a launch error, and
  // has nothing to compute (seqlen_q == 0 still needs dK = dV = 0, kernel 2 writes them).
  if (p.seqlen_q > 0) {
    const dim3 grid((p.seqlen_q + kDeltaRows - 1) / kDeltaRows, p.heads, p.batch);
    err = launch_kernel(dense_bwd_delta_kernel<Element>, grid, dim3(kDeltaThreads), 0, stream,
                        p);
    if (err != cudaSuccess) return err;
  }
  if (p.seqlen_k > 0) {
    const dim3 grid((p.seqlen_k + KV::kBlockN - 1) / KV::kBlockN, p.heads_kv, p.batch);
    err = launch_kernel(dense_bwd_dkdv_kernel<KV, kHasMask>, grid, dim3(KV::kNThreads),
                        KV::kSmemBytes, stream, p);
    if (err != cudaSuccess) return err;
  }
  if (p.seqlen_q > 0) {
    const dim3 grid((p.seqlen_q + Q::kBlockM - 1) / Q::kBlockM, p.heads, p.batch);
    err = launch_kernel(dense_bwd_dq_kernel<Q, kHasMask>, grid, dim3(Q::kNThreads),
                        Q::kSmemBytes, stream, p);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

} // namespace fk
