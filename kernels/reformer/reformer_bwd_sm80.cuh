// Reformer's LSH attention backward (issue 16 item 3), the buckets held fixed: per batch b
// and head h, on the caller's stream (R = rounds, L = R N sorted positions, nc = L / C):
//
//   pad_flag, sort   the forward's kernels (reformer_sm80.cuh, reformer_sort.cuh) on the
//                    given buckets: the same stable order, hence the same chunks and
//                    windows (hashed only).
//   prep             one thread per (b, h, token): Delta = rowsum(dO o O) and the rounds'
//                    weights w_r = exp(lse_r - L), L = logsumexp_r lse_r (the rounds' one
//                    softmax), f32, into the workspace. P = exp(score - lse_r) w_r for a key
//                    in round r's window: L itself is never formed in f32 (a row whose
//                    window holds only masked scores has |lse_r| ~ 1e5 .. 1e9, where one f32
//                    ulp of L would be a relative error of 0.4% .. 100% in P; score - lse_r
//                    is exact there).
//   dq               one block of 32 threads per (b, h, 32 sorted queries of one chunk), one
//                    query each, the forward's window (chunks c - before .. c + after) of
//                    keys (normalised on load) and values streamed through shared memory
//                    16 at a time: dq_r = sum_j dS_ij k_j, per sorted position, i.e. per
//                    (round, token), into the workspace.
//   dkv              one block of 32 threads per (b, h, 32 sorted keys of one chunk), one
//                    key each, iterating the query chunks whose windows contain this chunk:
//                    query chunk q sees key chunk (q - before + w) mod nc at window slot w,
//                    so key chunk c is seen at slot w by query chunk (c + before - w) mod nc
//                    (w = 0 .. before + after: every (query chunk, slot) pair exactly once,
//                    a chunk reached twice counted twice, as in the forward). Queries,
//                    their dO, Delta and L streamed 16 at a time; dk_r (of the normalised
//                    key) = sum_i dS_ij q_i and dv_r = sum_i P_ij dO_i per (round, token).
//                    No partial buffers across blocks: every key's block owns its sums.
//   finish           one thread per (b, h, token): dv = sum_r dv_r, dqk = sum_r dq_r +
//                    the normalisation's Jacobian applied to sum_r dk_r, rounds in order,
//                    rounded once into the storage dtype.
// Deterministic and atomic-free: every sum has one owner thread and a fixed order.
// The fallback N <= C is the same with one chunk of N, no look-back, identity order, one
// round.
//
// Known performance gaps (correctness first): dq and dkv are CUDA-core f32 kernels that
// recompute the scores twice. The tensor-core version is FlashAttention-2's backward on
// the gathered rows: a 4-warp block per (key chunk, 64 keys) holding K and V as swizzled
// f16/bf16 tiles loaded with cp.async, iterating the (query chunk, slot) pairs above,
// S = Q K^T and dP = dO V^T on mma.sync (mma_sm80.cuh) with P = exp(S - L) and the masks
// applied on the accumulator fragments from the tokens' positions, dV += P^T dO and
// dK += dS^T Q in registers, and dQ from a second pass per query block (no atomics, as
// here), the key normalisation folded in as a per-column scale g_j of S and dS.
#pragma once

#include "reformer_sm80.cuh"
#include "reformer_sort.cuh"

namespace fk {
namespace reformer {

constexpr int kBwdRows = 32;     // dq / dkv: rows (threads) per block
constexpr int kBwdTile = 16;     // dq / dkv: streamed rows per shared-memory tile
constexpr int kBwdRowThreads = 128; // prep / finish

// dq: queries, dO, accumulators (32 x (D + 1) f32 each: one thread per row, odd stride),
// a key and a value tile (16 x D), the tile's tokens.
inline size_t bwd_dq_smem_bytes(int d) {
  return size_t(3 * kBwdRows * (d + 1) + 2 * kBwdTile * d) * 4 + kBwdTile * 4;
}
// dkv: keys, values, dk and dv accumulators (32 x (D + 1)), a query and a dO tile
// (16 x D), the tile's lse_r, w_r, Delta and tokens.
inline size_t bwd_dkv_smem_bytes(int d) {
  return size_t(4 * kBwdRows * (d + 1) + 2 * kBwdTile * d + 3 * kBwdTile) * 4 + kBwdTile * 4;
}

// delta[bh, i] = dO_i . O_i, w[bh, r, i] = exp(lse[bh, r, i] - logsumexp_r lse[bh, r, i]);
// row = bh N + i.
template <typename T>
__global__ void __launch_bounds__(kBwdRowThreads)
    reformer_bwd_prep_kernel(const T *out, fk_strides os, const T *dout, fk_strides ds,
                             const float *lse, float *delta, float *wts, int heads, int n,
                             int d_head, int rounds, int64_t total) {
  const int64_t step = int64_t(gridDim.x) * kBwdRowThreads;
  for (int64_t row = int64_t(blockIdx.x) * kBwdRowThreads + threadIdx.x; row < total; row += step) {
    const int i = int(row % n);
    const int64_t bh = row / n;
    const int b = int(bh / heads), h = int(bh % heads);
    const T *o = out + b * os.batch + int64_t(i) * os.row + h * os.head;
    const T *g = dout + b * ds.batch + int64_t(i) * ds.row + h * ds.head;
    float acc = 0.f;
    for (int d = 0; d < d_head; ++d) acc += to_float(o[d]) * to_float(g[d]);
    delta[row] = acc;
    const float *l = lse + bh * rounds * n + i;
    float mx = -INFINITY;
    for (int r = 0; r < rounds; ++r) mx = fmaxf(mx, l[int64_t(r) * n]);
    float sum = 0.f;
    for (int r = 0; r < rounds; ++r) sum += __expf(l[int64_t(r) * n] - mx);
    float *wr = wts + bh * rounds * n + i;
    for (int r = 0; r < rounds; ++r) wr[int64_t(r) * n] = __expf(l[int64_t(r) * n] - mx) / sum;
  }
}

template <typename T> struct BwdArgs {
  const T *qk, *v, *dout;
  fk_strides qs, vs, ds;
  const uint8_t *pad;          // (B, N) or null
  const int32_t *perm;         // (B, H, L) tokens in sorted order, or null (identity)
  const float *lse;            // (B, H, rounds, N): the forward's
  const float *delta;          // (B, H, N)
  const float *wts;            // (B, H, rounds, N): the rounds' weights
  float *dq, *dk, *dv;         // (B, H, rounds, N, D) partials
  int heads, n, d_head;
  int chunk, n_chunks, before, after;
  int rounds, causal;
};

// The score of query token qi (row q) with key token kj (normalised row k), and whether
// it was replaced by a mask value (the forward's rules, in its order).
template <typename T>
__device__ __forceinline__ float bwd_score(const BwdArgs<T> &a, const uint8_t *pad, int qi, int kj,
                                           const float *q, const float *k, bool &replaced) {
  float sc;
  replaced = replaced_score<T>(qi, kj, a.causal, pad, sc);
  if (replaced) return sc;
  sc = 0.f;
  for (int d = 0; d < a.d_head; ++d) sc += q[d] * k[d];
  return sc;
}

// grid: (n_chunks * ceil(C / 32), H, B); block: 32 threads, one query each.
template <typename T>
__global__ void __launch_bounds__(kBwdRows) reformer_bwd_dq_kernel(const BwdArgs<T> a) {
  const int dh = a.d_head, ld = dh + 1;
  float *sq = reinterpret_cast<float *>(reformer_smem()); // queries
  float *sdo = sq + kBwdRows * ld;                         // their dO
  float *sacc = sdo + kBwdRows * ld;                       // dq accumulators
  float *sk = sacc + kBwdRows * ld;                        // normalised keys
  float *sv = sk + kBwdTile * dh;                          // values
  int *stok = reinterpret_cast<int *>(sv + kBwdTile * dh);
  const int t = threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tiles = (a.chunk + kBwdRows - 1) / kBwdRows;
  const int64_t c = blockIdx.x / tiles;
  const int q0 = int(blockIdx.x % tiles) * kBwdRows;
  const int nq = min(kBwdRows, a.chunk - q0);
  const int64_t bh = int64_t(b) * a.heads + h;
  const int64_t nc = a.n_chunks;
  const int32_t *perm = a.perm != nullptr ? a.perm + bh * nc * a.chunk : nullptr;
  const T *qk = a.qk + b * a.qs.batch + h * a.qs.head;
  const T *v = a.v + b * a.vs.batch + h * a.vs.head;
  const T *dout = a.dout + b * a.ds.batch + h * a.ds.head;
  const uint8_t *pad = a.pad != nullptr ? a.pad + int64_t(b) * a.n : nullptr;
  const int64_t s0 = c * a.chunk + q0;
  for (int e = t; e < nq * dh; e += kBwdRows) {
    const int row = e / dh, d = e % dh;
    const int64_t tok = token_at(perm, s0 + row);
    sq[row * ld + d] = to_float(qk[tok * a.qs.row + d]);
    sdo[row * ld + d] = to_float(dout[tok * a.ds.row + d]);
    sacc[row * ld + d] = 0.f;
  }
  const bool active = t < nq;
  const int qi = active ? token_at(perm, s0 + t) : 0;
  const int64_t qrow = (bh * a.rounds + (s0 + t) / a.n) * a.n + qi; // (round, token)
  const float li = active ? a.lse[qrow] : 0.f, wi = active ? a.wts[qrow] : 0.f;
  const float di = active ? a.delta[bh * a.n + qi] : 0.f;
  const float *myq = sq + t * ld, *mydo = sdo + t * ld;
  float *myacc = sacc + t * ld;
  const int64_t first = window_first(c, nc, a.before);
  const int nwin = a.before + 1 + a.after;
  for (int w = 0; w < nwin; ++w) {
    const int64_t k_first = ((first + w) % nc) * a.chunk;
    for (int k0 = 0; k0 < a.chunk; k0 += kBwdTile) {
      const int nk = min(kBwdTile, a.chunk - k0);
      __syncthreads(); // the previous tile (or the queries' load) is done
      if (t < nk) stok[t] = token_at(perm, k_first + k0 + t);
      __syncthreads();
      for (int e = t; e < nk * dh; e += kBwdRows) {
        const int j = e / dh, d = e % dh;
        const int64_t tok = stok[j];
        sk[j * dh + d] = to_float(qk[tok * a.qs.row + d]);
        sv[j * dh + d] = to_float(v[tok * a.vs.row + d]);
      }
      __syncthreads();
      normalise_rows(sk, dh, nk, dh, t);
      __syncthreads();
      if (!active) continue;
      for (int j = 0; j < nk; ++j) {
        bool replaced;
        const float sc = bwd_score(a, pad, qi, stok[j], myq, sk + j * dh, replaced);
        if (replaced) continue; // a constant: no gradient
        const float p = __expf(sc - li) * wi;
        float dp = 0.f;
        for (int d = 0; d < dh; ++d) dp += mydo[d] * sv[j * dh + d];
        const float dsc = p * (dp - di);
        for (int d = 0; d < dh; ++d) myacc[d] += dsc * sk[j * dh + d];
      }
    }
  }
  if (!active) return;
  const int r = int((s0 + t) / a.n);
  float *o = a.dq + ((bh * a.rounds + r) * a.n + qi) * dh;
  for (int d = 0; d < dh; ++d) o[d] = myacc[d];
}

// grid: (n_chunks * ceil(C / 32), H, B); block: 32 threads, one key each.
template <typename T>
__global__ void __launch_bounds__(kBwdRows) reformer_bwd_dkv_kernel(const BwdArgs<T> a) {
  const int dh = a.d_head, ld = dh + 1;
  float *sk = reinterpret_cast<float *>(reformer_smem()); // normalised keys
  float *sv = sk + kBwdRows * ld;                          // values
  float *sdk = sv + kBwdRows * ld;                         // dk accumulators
  float *sdv = sdk + kBwdRows * ld;                        // dv accumulators
  float *sq = sdv + kBwdRows * ld;                         // query tile
  float *sdo = sq + kBwdTile * dh;                         // its dO
  float *sl = sdo + kBwdTile * dh;                         // its lse_r
  float *sw = sl + kBwdTile;                               // its w_r
  float *sdl = sw + kBwdTile;                              // its Delta
  int *stok = reinterpret_cast<int *>(sdl + kBwdTile);
  const int t = threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tiles = (a.chunk + kBwdRows - 1) / kBwdRows;
  const int64_t c = blockIdx.x / tiles;
  const int k0 = int(blockIdx.x % tiles) * kBwdRows;
  const int nk = min(kBwdRows, a.chunk - k0);
  const int64_t bh = int64_t(b) * a.heads + h;
  const int64_t nc = a.n_chunks;
  const int32_t *perm = a.perm != nullptr ? a.perm + bh * nc * a.chunk : nullptr;
  const T *qk = a.qk + b * a.qs.batch + h * a.qs.head;
  const T *v = a.v + b * a.vs.batch + h * a.vs.head;
  const T *dout = a.dout + b * a.ds.batch + h * a.ds.head;
  const uint8_t *pad = a.pad != nullptr ? a.pad + int64_t(b) * a.n : nullptr;
  const int64_t s0 = c * a.chunk + k0;
  for (int e = t; e < nk * dh; e += kBwdRows) {
    const int row = e / dh, d = e % dh;
    const int64_t tok = token_at(perm, s0 + row);
    sk[row * ld + d] = to_float(qk[tok * a.qs.row + d]);
    sv[row * ld + d] = to_float(v[tok * a.vs.row + d]);
    sdk[row * ld + d] = 0.f;
    sdv[row * ld + d] = 0.f;
  }
  __syncthreads();
  normalise_rows(sk, ld, nk, dh, t);
  const bool active = t < nk;
  const int kj = active ? token_at(perm, s0 + t) : 0;
  const float *myk = sk + t * ld, *myv = sv + t * ld;
  float *mydk = sdk + t * ld, *mydv = sdv + t * ld;
  const int nwin = a.before + 1 + a.after;
  for (int w = 0; w < nwin; ++w) {
    // The query chunk that sees this key chunk at window slot w.
    const int64_t off = ((int64_t(a.before) - w) % nc + nc) % nc;
    const int64_t q_first = ((c + off) % nc) * a.chunk;
    for (int i0 = 0; i0 < a.chunk; i0 += kBwdTile) {
      const int nq = min(kBwdTile, a.chunk - i0);
      __syncthreads(); // the previous tile (or the keys' normalisation) is done
      if (t < nq) {
        const int64_t pos = q_first + i0 + t;
        const int tok = token_at(perm, pos);
        const int64_t qrow = (bh * a.rounds + pos / a.n) * a.n + tok;
        stok[t] = tok;
        sl[t] = a.lse[qrow];
        sw[t] = a.wts[qrow];
        sdl[t] = a.delta[bh * a.n + tok];
      }
      __syncthreads();
      for (int e = t; e < nq * dh; e += kBwdRows) {
        const int i = e / dh, d = e % dh;
        const int64_t tok = stok[i];
        sq[i * dh + d] = to_float(qk[tok * a.qs.row + d]);
        sdo[i * dh + d] = to_float(dout[tok * a.ds.row + d]);
      }
      __syncthreads();
      if (!active) continue;
      for (int i = 0; i < nq; ++i) {
        bool replaced;
        const float *qrow = sq + i * dh, *dorow = sdo + i * dh;
        const float sc = bwd_score(a, pad, stok[i], kj, qrow, myk, replaced);
        const float p = __expf(sc - sl[i]) * sw[i];
        for (int d = 0; d < dh; ++d) mydv[d] += p * dorow[d]; // masked keys too
        if (replaced) continue;
        float dp = 0.f;
        for (int d = 0; d < dh; ++d) dp += dorow[d] * myv[d];
        const float dsc = p * (dp - sdl[i]);
        for (int d = 0; d < dh; ++d) mydk[d] += dsc * qrow[d];
      }
    }
  }
  if (!active) return;
  const int r = int((s0 + t) / a.n);
  const int64_t at = ((bh * a.rounds + r) * a.n + kj) * dh;
  for (int d = 0; d < dh; ++d) a.dk[at + d] = mydk[d], a.dv[at + d] = mydv[d];
}

// dv = sum_r dv_r; dqk = sum_r dq_r + gs dk - x (x . dk) gs^3, dk = sum_r dk_r,
// gs = 1 / sqrt(sum(x^2) + 1e-6 D) (k = x gs); row = bh N + i.
template <typename T>
__global__ void __launch_bounds__(kBwdRowThreads)
    reformer_bwd_finish_kernel(const T *qk, fk_strides qs, const float *dq, const float *dk,
                               const float *dvp, T *dqk, fk_strides dqs, T *dv, fk_strides dvs,
                               int heads, int n, int d_head, int rounds, int64_t total) {
  const int64_t step = int64_t(gridDim.x) * kBwdRowThreads;
  for (int64_t row = int64_t(blockIdx.x) * kBwdRowThreads + threadIdx.x; row < total; row += step) {
    const int i = int(row % n);
    const int64_t bh = row / n;
    const int b = int(bh / heads), h = int(bh % heads);
    const T *x = qk + b * qs.batch + int64_t(i) * qs.row + h * qs.head;
    T *gq = dqk + b * dqs.batch + int64_t(i) * dqs.row + h * dqs.head;
    T *gv = dv + b * dvs.batch + int64_t(i) * dvs.row + h * dvs.head;
    auto part = [&](const float *buf, int r, int d) {
      return buf[((bh * rounds + r) * n + i) * d_head + d];
    };
    float s2 = 0.f, xdk = 0.f;
    for (int d = 0; d < d_head; ++d) {
      const float xd = to_float(x[d]);
      float k = 0.f;
      for (int r = 0; r < rounds; ++r) k += part(dk, r, d);
      s2 += xd * xd;
      xdk += xd * k;
    }
    const float gs = key_scale(s2, d_head);
    const float c3 = xdk * gs * gs * gs;
    for (int d = 0; d < d_head; ++d) {
      float q = 0.f, k = 0.f, vv = 0.f;
      for (int r = 0; r < rounds; ++r) {
        q += part(dq, r, d);
        k += part(dk, r, d);
        vv += part(dvp, r, d);
      }
      gq[d] = from_float<T>(q + gs * k - to_float(x[d]) * c3);
      gv[d] = from_float<T>(vv);
    }
  }
}

template <typename T> cudaError_t bwd(const fk_reformer_bwd_params &p, cudaStream_t stream) {
  const BwdWorkspace ws(p);
  char *w = static_cast<char *>(p.workspace);
  auto f32 = [&](int64_t at) { return at >= 0 ? reinterpret_cast<float *>(w + at) : nullptr; };
  int32_t *flag = ws.flag >= 0 ? reinterpret_cast<int32_t *>(w + ws.flag) : nullptr;
  int32_t *perm = ws.perm >= 0 ? reinterpret_cast<int32_t *>(w + ws.perm) : nullptr;
  uint32_t *keys = ws.keys >= 0 ? reinterpret_cast<uint32_t *>(w + ws.keys) : nullptr;
  int32_t *counts = ws.counts >= 0 ? reinterpret_cast<int32_t *>(w + ws.counts) : nullptr;
  const int n = p.seqlen, nh = p.n_hashes, nr = rounds(p);
  const dim3 heads_batch(1, unsigned(p.heads), unsigned(p.batch));
  cudaError_t err = cudaSuccess;
  if (hashed(p)) {
    if (flag != nullptr) {
      err = launch_kernel(reformer_pad_flag_kernel<T>, dim3(1), dim3(kFlagThreads),
                          kFlagThreads * 4, stream, p.key_padding, int64_t(p.batch) * n, flag);
      if (err != cudaSuccess) return err;
    }
    err = sort_rounds<T>(p.buckets, flag, keys, counts, perm, p.batch, p.heads, n, nh, p.n_buckets,
                         stream);
    if (err != cudaSuccess) return err;
  }
  const int64_t total = int64_t(p.batch) * p.heads * n;
  const unsigned row_blocks =
      unsigned(std::min<int64_t>((total + kBwdRowThreads - 1) / kBwdRowThreads, 1 << 20));
  err = launch_kernel(reformer_bwd_prep_kernel<T>, dim3(row_blocks), dim3(kBwdRowThreads), 0,
                      stream, static_cast<const T *>(p.out), p.out_stride,
                      static_cast<const T *>(p.dout), p.dout_stride, p.lse, f32(ws.delta),
                      f32(ws.wts), p.heads, n, p.head_dim, nr, total);
  if (err != cudaSuccess) return err;
  BwdArgs<T> a;
  a.qk = static_cast<const T *>(p.qk), a.v = static_cast<const T *>(p.v);
  a.dout = static_cast<const T *>(p.dout);
  a.qs = p.qk_stride, a.vs = p.v_stride, a.ds = p.dout_stride;
  a.pad = p.key_padding, a.perm = perm, a.lse = p.lse, a.delta = f32(ws.delta), a.wts = f32(ws.wts);
  a.dq = f32(ws.dq), a.dk = f32(ws.dk), a.dv = f32(ws.dv);
  a.heads = p.heads, a.n = n, a.d_head = p.head_dim, a.rounds = nr, a.causal = p.causal;
  if (hashed(p)) {
    a.chunk = p.chunk_length, a.n_chunks = int(int64_t(nh) * n / p.chunk_length);
    a.before = p.chunks_before, a.after = p.chunks_after;
  } else {
    a.chunk = n, a.n_chunks = 1, a.before = 0, a.after = 0;
  }
  const int64_t blocks = int64_t(a.n_chunks) * ((a.chunk + kBwdRows - 1) / kBwdRows);
  const dim3 grid(unsigned(blocks), heads_batch.y, heads_batch.z);
  err = launch_kernel(reformer_bwd_dq_kernel<T>, grid, dim3(kBwdRows),
                      bwd_dq_smem_bytes(p.head_dim), stream, a);
  if (err != cudaSuccess) return err;
  err = launch_kernel(reformer_bwd_dkv_kernel<T>, grid, dim3(kBwdRows),
                      bwd_dkv_smem_bytes(p.head_dim), stream, a);
  if (err != cudaSuccess) return err;
  return launch_kernel(reformer_bwd_finish_kernel<T>, dim3(row_blocks), dim3(kBwdRowThreads), 0,
                       stream, a.qk, p.qk_stride, a.dq, a.dk, a.dv, static_cast<T *>(p.dqk),
                       p.dqk_stride, static_cast<T *>(p.dv), p.dv_stride, p.heads, n, p.head_dim,
                       nr, total);
}

} // namespace reformer
} // namespace fk
