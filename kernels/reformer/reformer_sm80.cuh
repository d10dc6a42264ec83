// Reformer's LSH attention forward (issue 16): five kernels on the caller's stream, per
// batch b and head h (R = n_hashes, L = R N positions, nb' = nb (+ 1 with padding)):
//
//   pad_flag   whether any token of the whole batch is padded (one block; hashed calls
//              with key_padding only), into the workspace: decides nb' and the padding
//              bucket, as HF does, without the host reading the mask.
//   hash       one thread per (b, h, r, i): the first argmax of [x R_r ; -x R_r] (f32,
//              sums over d in order), + r nb' (skipped when buckets are given).
//   sort       one block per (b, h, r): a stable counting sort of round r's N tokens by
//              bucket (round r's values all precede round r + 1's, so the sorted order of
//              the concatenation is the rounds' sorted orders one after the other).
//              Deterministic and atomic-free: thread t owns the buckets v with
//              v % threads == t, counts them in one pass over the round in index order,
//              a block scan gives each bucket its first sorted position, and a second pass
//              in index order scatters (stable by construction). perm[s] = token at sorted
//              position s. Work O(N threads) per round (every thread reads every bucket;
//              broadcast loads), memory O(N + nb).
//   attn       one block of 64 threads per (b, h, 64 sorted queries of one chunk): the
//              query rows and their f32 accumulators in shared memory (one thread per
//              query), the window's keys (normalised on load) and values streamed through
//              shared memory 16 at a time, masks that replace scores, online softmax; per
//              round lse (written in token order: the unsort) and o_r (f32 workspace, or
//              the output itself when there is one round).
//   combine    (R > 1) out = sum_r exp(lse_r - logsumexp_r lse_r) o_r, rounded once.
//
// The fallback N <= C is attn alone with one chunk of N queries, no look-back, identity
// order, one round.
//
// Known performance gaps (correctness first): attn is a CUDA-core f32 kernel. The faster
// version is FlashAttention's: a 4-warp block per (chunk, 64 queries) gathering the
// window's rows with cp.async into swizzled f16/bf16 tiles, QK^T and PV on mma.sync
// (mma_sm80.cuh) with the row-wise online softmax of attention/common/softmax.cuh, the
// masks applied on the accumulator fragments from the tokens' positions, and the key
// normalisation folded in as a per-column scale of the score tile (k_j = g_j qk_j: scale
// column j of S by g_j, computed once per token by the hash kernel). The sort's every-thread
// pass over the round would become a CUB-style radix pass (per-warp histograms in shared
// memory, a decoupled look-back scan across blocks) once the emulator has atomics and
// ballots; the combine could be fused into attn for R = 1 (done) or with a second pass.
#pragma once

#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "../common/launch.cuh"
#include "../common/numeric.cuh"
#include "reformer.h"

namespace fk {

// The dynamic shared memory, declared in namespace fk (the emulator binds fk::smem_raw).
__device__ __forceinline__ unsigned char *reformer_smem() {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  return smem_raw;
}

namespace reformer {

constexpr int kFlagThreads = 256;
constexpr int kHashThreads = 128;
constexpr int kSortThreads = 128;
constexpr int kQueries = 64; // attn: queries (threads) per block
constexpr int kKeys = 16;    // attn: keys per shared-memory tile (<= kQueries)
constexpr int kCombineThreads = 256;

// attn's shared memory: queries and accumulators (64 x (D + 1) f32 each, odd row stride:
// one thread per row, conflict-free), a key and a value tile (16 x D f32), the scores
// (64 x 17 f32) and the tile's tokens.
inline size_t attn_smem_bytes(int head_dim) {
  return size_t(2 * kQueries * (head_dim + 1) + 2 * kKeys * head_dim + kQueries * (kKeys + 1)) * 4 +
         kKeys * 4;
}
inline size_t sort_smem_bytes(int n_buckets) { return size_t(n_buckets + 1 + kSortThreads) * 4; }

// (mask, self) values that replace scores: HF's fp16 values for f16, fp32's otherwise.
template <typename T> struct MaskValues {
  static constexpr float kMask = std::is_same<T, __half>::value ? -1e4f : -1e9f;
  static constexpr float kSelf = std::is_same<T, __half>::value ? -1e3f : -1e5f;
};

// flag = 1 when some key_padding[0 .. n) is non-zero, else 0. One block.
template <typename T>
__global__ void __launch_bounds__(kFlagThreads)
    reformer_pad_flag_kernel(const uint8_t *pad, int64_t n, int32_t *flag) {
  int *red = reinterpret_cast<int *>(reformer_smem());
  const int t = threadIdx.x;
  int any = 0;
  for (int64_t i = t; i < n; i += kFlagThreads) any |= pad[i] != 0;
  red[t] = any;
  __syncthreads();
  for (int s = kFlagThreads / 2; s > 0; s /= 2) {
    if (t < s) red[t] |= red[t + s];
    __syncthreads();
  }
  if (t == 0) *flag = red[0];
}

// buckets[b, h, r, i] (grid: (ceil(R N / 128), H, B)); thread index -> (r, i), i fastest.
template <typename T>
__global__ void __launch_bounds__(kHashThreads)
    reformer_hash_kernel(const T *qk, fk_strides qs, const float *rot, const uint8_t *pad,
                         const int32_t *flag, int32_t *buckets, int n, int d_head, int n_hashes,
                         int n_buckets) {
  const int64_t idx = int64_t(blockIdx.x) * kHashThreads + threadIdx.x;
  if (idx >= int64_t(n_hashes) * n) return;
  const int r = int(idx / n), i = int(idx % n), h = blockIdx.y, b = blockIdx.z;
  const int pad_any = flag != nullptr && *flag != 0 ? 1 : 0;
  int bucket;
  if (pad_any && pad[int64_t(b) * n + i] != 0) {
    bucket = n_buckets;
  } else {
    const T *x = qk + b * qs.batch + i * qs.row + h * qs.head;
    const int half = n_buckets / 2;
    // rot[h, d, r, k] = rot[((h D + d) R + r) half + k]
    const float *rr = rot + (int64_t(h) * d_head * n_hashes + r) * half;
    const int64_t rd = int64_t(n_hashes) * half; // stride of d
    // The first maximum of [p ; -p]: p's first maximum, or -p's (p's first minimum) when
    // strictly larger.
    float hi = 0.f, lo = 0.f;
    int khi = 0, klo = 0;
    for (int k = 0; k < half; ++k) {
      float s = 0.f;
      for (int d = 0; d < d_head; ++d) s += to_float(x[d]) * rr[d * rd + k];
      if (k == 0 || s > hi) hi = s, khi = k;
      if (k == 0 || s < lo) lo = s, klo = k;
    }
    bucket = -lo > hi ? half + klo : khi;
  }
  buckets[((int64_t(b) * gridDim.y + h) * n_hashes + r) * n + i] =
      bucket + r * (n_buckets + pad_any);
}

// perm[b, h, r N + s'] = the token at round r's sorted position s' (grid: (R, H, B)).
template <typename T>
__global__ void __launch_bounds__(kSortThreads)
    reformer_sort_kernel(const int32_t *buckets, const int32_t *flag, int32_t *perm, int n,
                         int n_hashes, int n_buckets) {
  int *cnt = reinterpret_cast<int *>(reformer_smem()); // nb' counters, then first positions
  int *part = cnt + n_buckets + 1;              // kSortThreads partial sums
  const int t = threadIdx.x, r = blockIdx.x;
  const int nbp = n_buckets + (flag != nullptr && *flag != 0 ? 1 : 0);
  const int64_t row = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * n_hashes + r;
  const int32_t *bk = buckets + row * n;
  int32_t *pm = perm + row * n;
  const int base = r * nbp;
  // Round r's local bucket, clamped (given buckets are the host's to check).
  auto local = [&](int i) { return min(max(bk[i] - base, 0), nbp - 1); };
  for (int v = t; v < nbp; v += kSortThreads) cnt[v] = 0;
  __syncthreads();
  for (int i = 0; i < n; ++i) {
    const int v = local(i);
    if (v % kSortThreads == t) ++cnt[v];
  }
  __syncthreads();
  // Exclusive scan of cnt: contiguous ranges per thread, the partials by thread 0.
  const int per = (nbp + kSortThreads - 1) / kSortThreads;
  const int lo = min(nbp, t * per), hi = min(nbp, lo + per);
  int sum = 0;
  for (int v = lo; v < hi; ++v) sum += cnt[v];
  part[t] = sum;
  __syncthreads();
  if (t == 0) {
    int run = 0;
    for (int k = 0; k < kSortThreads; ++k) {
      const int x = part[k];
      part[k] = run;
      run += x;
    }
  }
  __syncthreads();
  int run = part[t];
  for (int v = lo; v < hi; ++v) {
    const int x = cnt[v];
    cnt[v] = run;
    run += x;
  }
  __syncthreads();
  for (int i = 0; i < n; ++i) {
    const int v = local(i);
    if (v % kSortThreads == t) pm[cnt[v]++] = i;
  }
}

template <typename T> struct AttnArgs {
  const T *qk, *v;
  fk_strides qs, vs;
  const uint8_t *pad;   // (B, N) or null
  const int32_t *perm;  // (B, H, L) tokens in sorted order, or null (identity)
  T *out;               // written when rounds == 1
  fk_strides os;
  float *lse;           // (B, H, rounds, N)
  float *o_rounds;      // (B, H, rounds, N, D) when rounds > 1, else null
  int heads, n, d_head; // H, N, D
  int chunk, n_chunks;  // C and L / C (the fallback: N and 1)
  int before, after;    // look-back / look-ahead chunks (the fallback: 0, 0)
  int rounds, causal;
};

// The token at sorted position s (perm null: the identity).
__device__ __forceinline__ int token_at(const int32_t *perm, int64_t s) {
  return perm != nullptr ? int(perm[s]) : int(s);
}

// grid: (n_chunks * ceil(C / 64), H, B); block: 64 threads, one query each.
template <typename T>
__global__ void __launch_bounds__(kQueries, 4) reformer_attn_kernel(const AttnArgs<T> a) {
  const int dh = a.d_head, ld = dh + 1;
  float *sq = reinterpret_cast<float *>(reformer_smem()); // queries
  float *so = sq + kQueries * ld;                  // accumulators
  float *sk = so + kQueries * ld;                  // normalised keys
  float *sv = sk + kKeys * dh;                     // values
  float *ss = sv + kKeys * dh;                     // scores
  int *stok = reinterpret_cast<int *>(ss + kQueries * (kKeys + 1));
  const int t = threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tiles = (a.chunk + kQueries - 1) / kQueries;
  const int64_t c = blockIdx.x / tiles;
  const int q0 = int(blockIdx.x % tiles) * kQueries;
  const int nq = min(kQueries, a.chunk - q0);
  const int64_t bh = int64_t(b) * a.heads + h;
  const int64_t nc = a.n_chunks;
  const int32_t *perm = a.perm != nullptr ? a.perm + bh * nc * a.chunk : nullptr;
  const T *qk = a.qk + b * a.qs.batch + h * a.qs.head;
  const T *v = a.v + b * a.vs.batch + h * a.vs.head;
  const uint8_t *pad = a.pad != nullptr ? a.pad + int64_t(b) * a.n : nullptr;
  const int64_t s0 = c * a.chunk + q0; // first sorted position of the block
  for (int e = t; e < nq * dh; e += kQueries) {
    const int row = e / dh, d = e % dh;
    sq[row * ld + d] = to_float(qk[token_at(perm, s0 + row) * a.qs.row + d]);
    so[row * ld + d] = 0.f;
  }
  const bool active = t < nq;
  const int qi = active ? token_at(perm, s0 + t) : 0;
  const float mask = MaskValues<T>::kMask, self_mask = MaskValues<T>::kSelf;
  const float *myq = sq + t * ld;
  float *myo = so + t * ld, *mys = ss + t * (kKeys + 1);
  float m = -INFINITY, l = 0.f;
  // The window: chunks (c - before + w) mod nc, w = 0 .. before + after (as HF's
  // look-adjacent, in its order).
  const int64_t first = (c + nc - a.before % nc) % nc;
  const int nwin = a.before + 1 + a.after;
  for (int w = 0; w < nwin; ++w) {
    const int64_t k_first = ((first + w) % nc) * a.chunk;
    for (int k0 = 0; k0 < a.chunk; k0 += kKeys) {
      const int nk = min(kKeys, a.chunk - k0);
      __syncthreads(); // the previous tile (or the queries' load) is done
      if (t < nk) stok[t] = token_at(perm, k_first + k0 + t);
      __syncthreads();
      for (int e = t; e < nk * dh; e += kQueries) {
        const int j = e / dh, d = e % dh;
        const int64_t tok = stok[j];
        sk[j * dh + d] = to_float(qk[tok * a.qs.row + d]);
        sv[j * dh + d] = to_float(v[tok * a.vs.row + d]);
      }
      __syncthreads();
      if (t < nk) { // k = x (mean(x^2) + 1e-6)^(-1/2) / sqrt(D) = x / sqrt(sum(x^2) + 1e-6 D)
        float s2 = 0.f;
        for (int d = 0; d < dh; ++d) s2 += sk[t * dh + d] * sk[t * dh + d];
        const float g = 1.f / sqrtf(s2 + 1e-6f * float(dh));
        for (int d = 0; d < dh; ++d) sk[t * dh + d] *= g;
      }
      __syncthreads();
      if (active) {
        float mt = m;
        for (int j = 0; j < nk; ++j) {
          const int kj = stok[j];
          float sc;
          if (kj == qi) {
            sc = self_mask;
          } else if ((a.causal && qi < kj) || (pad != nullptr && pad[kj] != 0)) {
            sc = mask;
          } else {
            sc = 0.f;
            for (int d = 0; d < dh; ++d) sc += myq[d] * sk[j * dh + d];
          }
          mys[j] = sc;
          mt = fmaxf(mt, sc);
        }
        const float scale = __expf(m - mt); // 0 on the first tile (m = -inf, l = o = 0)
        l *= scale;
        for (int d = 0; d < dh; ++d) myo[d] *= scale;
        for (int j = 0; j < nk; ++j) {
          const float pj = __expf(mys[j] - mt);
          l += pj;
          for (int d = 0; d < dh; ++d) myo[d] += pj * sv[j * dh + d];
        }
        m = mt;
      }
    }
  }
  if (!active) return;
  // Every window holds the query's own token (its own chunk), so l >= 1.
  const float inv = 1.f / l;
  const int r = int((s0 + t) / a.n);
  a.lse[(bh * a.rounds + r) * a.n + qi] = m + __logf(l);
  if (a.o_rounds == nullptr) {
    T *o = a.out + b * a.os.batch + int64_t(qi) * a.os.row + h * a.os.head;
    for (int d = 0; d < dh; ++d) o[d] = from_float<T>(myo[d] * inv);
  } else {
    float *o = a.o_rounds + ((bh * a.rounds + r) * a.n + qi) * dh;
    for (int d = 0; d < dh; ++d) o[d] = myo[d] * inv;
  }
}

// out[b, i, h, d] = sum_r exp(lse_r - logsumexp_r lse_r) o_r[d]; e = ((b H + h) N + i) D + d.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    reformer_combine_kernel(const float *o_rounds, const float *lse, T *out, fk_strides os,
                            int heads, int n, int d_head, int rounds, int64_t total) {
  const int64_t step = int64_t(gridDim.x) * kCombineThreads;
  for (int64_t e = int64_t(blockIdx.x) * kCombineThreads + threadIdx.x; e < total; e += step) {
    const int d = int(e % d_head);
    const int64_t row = e / d_head;
    const int i = int(row % n);
    const int64_t bh = row / n;
    const int b = int(bh / heads), h = int(bh % heads);
    const float *l = lse + bh * rounds * n + i; // round r at l[r n]
    float mx = -INFINITY;
    for (int r = 0; r < rounds; ++r) mx = fmaxf(mx, l[int64_t(r) * n]);
    float sum = 0.f;
    for (int r = 0; r < rounds; ++r) sum += __expf(l[int64_t(r) * n] - mx);
    const float all = mx + __logf(sum);
    float acc = 0.f;
    for (int r = 0; r < rounds; ++r)
      acc += __expf(l[int64_t(r) * n] - all) * o_rounds[((bh * rounds + r) * n + i) * d_head + d];
    out[b * os.batch + int64_t(i) * os.row + h * os.head + d] = from_float<T>(acc);
  }
}

template <typename T> cudaError_t fwd(const fk_reformer_fwd_params &p, cudaStream_t stream) {
  const FwdWorkspace ws(p);
  char *w = static_cast<char *>(p.workspace);
  int32_t *flag = ws.flag >= 0 ? reinterpret_cast<int32_t *>(w + ws.flag) : nullptr;
  int32_t *perm = ws.perm >= 0 ? reinterpret_cast<int32_t *>(w + ws.perm) : nullptr;
  float *o_rounds = ws.o_rounds >= 0 ? reinterpret_cast<float *>(w + ws.o_rounds) : nullptr;
  const T *qk = static_cast<const T *>(p.qk);
  const int n = p.seqlen, nh = p.n_hashes, nr = rounds(p);
  const dim3 heads_batch(1, unsigned(p.heads), unsigned(p.batch));
  cudaError_t err = cudaSuccess;
  if (hashed(p)) {
    if (flag != nullptr) {
      err = launch_kernel(reformer_pad_flag_kernel<T>, dim3(1), dim3(kFlagThreads),
                          kFlagThreads * 4, stream, p.key_padding, int64_t(p.batch) * n, flag);
      if (err != cudaSuccess) return err;
    }
    const int32_t *bk = p.given_buckets;
    if (bk == nullptr) {
      const int64_t rows = int64_t(nh) * n;
      err = launch_kernel(
          reformer_hash_kernel<T>,
          dim3(unsigned((rows + kHashThreads - 1) / kHashThreads), heads_batch.y, heads_batch.z),
          dim3(kHashThreads), 0, stream, qk, p.qk_stride, p.rotations, p.key_padding, flag,
          p.buckets, n, p.head_dim, nh, p.n_buckets);
      if (err != cudaSuccess) return err;
      bk = p.buckets;
    }
    err = launch_kernel(reformer_sort_kernel<T>, dim3(unsigned(nh), heads_batch.y, heads_batch.z),
                        dim3(kSortThreads), sort_smem_bytes(p.n_buckets), stream, bk, flag, perm, n,
                        nh, p.n_buckets);
    if (err != cudaSuccess) return err;
  }
  AttnArgs<T> a;
  a.qk = qk, a.v = static_cast<const T *>(p.v), a.qs = p.qk_stride, a.vs = p.v_stride;
  a.pad = p.key_padding, a.perm = perm, a.out = static_cast<T *>(p.out), a.os = p.out_stride;
  a.lse = p.lse, a.o_rounds = nr > 1 ? o_rounds : nullptr;
  a.heads = p.heads, a.n = n, a.d_head = p.head_dim, a.rounds = nr, a.causal = p.causal;
  if (hashed(p)) {
    a.chunk = p.chunk_length, a.n_chunks = int(int64_t(nh) * n / p.chunk_length);
    a.before = p.chunks_before, a.after = p.chunks_after;
  } else {
    a.chunk = n, a.n_chunks = 1, a.before = 0, a.after = 0;
  }
  const int64_t blocks = int64_t(a.n_chunks) * ((a.chunk + kQueries - 1) / kQueries);
  err = launch_kernel(reformer_attn_kernel<T>, dim3(unsigned(blocks), heads_batch.y, heads_batch.z),
                      dim3(kQueries), attn_smem_bytes(p.head_dim), stream, a);
  if (err != cudaSuccess || nr == 1) return err;
  const int64_t total = int64_t(p.batch) * p.heads * n * p.head_dim;
  const int64_t cblocks =
      std::min<int64_t>((total + kCombineThreads - 1) / kCombineThreads, 1 << 20);
  return launch_kernel(reformer_combine_kernel<T>, dim3(unsigned(cblocks)), dim3(kCombineThreads),
                       0, stream, o_rounds, p.lse, a.out, p.out_stride, p.heads, n, p.head_dim, nr,
                       total);
}

} // namespace reformer
} // namespace fk
