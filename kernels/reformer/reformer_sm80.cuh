// Reformer's LSH attention forward (issue 16): five stages (the sort is three kernels) on the
// caller's stream, per batch b and head h (R = n_hashes, L = R N positions, nb' = nb (+ 1 with
// padding)):
//
//   pad_flag   whether any token of the whole batch is padded (one block; hashed calls
//              with key_padding only), into the workspace: decides nb' and the padding
//              bucket, as HF does, without the host reading the mask.
//   hash       the first argmax of [x R_r ; -x R_r], + r nb' (skipped when buckets are
//              given). On tensor cores when qk's rows are 16-byte chunks: R split into
//              16-bit hi + lo (rot_split, in the workspace) so x R = x hi + x lo keeps f32
//              accuracy, an 8-warp block per 128 tokens of (b, h) for all rounds
//              (reformer_hash_tc_kernel); else one thread per (b, h, r, i) on CUDA cores
//              (f32, sums over d in order). This GEMM is the forward's largest: at the
//              issue's shape (N 16384, 4 rounds, 512 buckets, D 64, 8 heads) it is 4x the
//              attention's FLOPs.
//   sort       (reformer_sort.cuh) per (b, h, r), a stable sort of round r's N tokens by
//              bucket (round r's values all precede round r + 1's, so the sorted order of
//              the concatenation is the rounds' sorted orders one after the other), out of
//              range values clamped into their round's range: three atomic-free kernels
//              over segments of 1024 tokens, B H R ceil(N / 1024) blocks (a bitonic sort of
//              each segment in shared memory with its per-bucket counts, a scan of the
//              counts per (b, h, r), a scatter), deterministic. perm[s] = token at sorted
//              position s.
//   attn       per (b, h, 64 sorted queries of one chunk), on tensor cores when rows are
//              16-byte chunks (reformer_attn_tc_kernel: the dense forward's tiles, mma.sync
//              and online softmax over the window gathered by token, the key normalisation
//              a per-column scale of S), else on CUDA cores (reformer_attn_kernel: one
//              thread per query, f32, keys and values streamed through shared memory 16 at
//              a time); masks replace scores; per round lse (written in token order: the
//              unsort) and o_r (f32 workspace, or the output itself for one round).
//   combine    (R > 1) out = sum_r exp(lse_r - logsumexp_r lse_r) o_r, rounded once.
//
// The fallback N <= C is attn alone with one chunk of N queries, no look-back, identity
// order, one round.
//
// Known performance gaps (correctness first; nothing here has run on a GPU yet): the
// tensor-core attn computes each key's scale once per query block that loads it (a
// per-token pass would do it once), and P is rounded to the dtype before P V as in the
// dense kernels (the emulator's bound allows for it). The sort's count scan is one block per
// (b, h, r) (reformer_sort.cuh: it grows with n_buckets); the combine could be fused into
// attn for R = 1 (done) or with a second pass, and the per-round O is f32 (R B H N D 4 bytes
// written and read again); every 64-token hash block reads its rounds' rotations (hi and lo)
// from L2 again (a larger token block would halve it). The backward is on CUDA cores.
#pragma once

#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "../attention/common/gemm.cuh"
#include "../attention/common/kernel_traits.cuh"
#include "../attention/common/softmax.cuh"
#include "../common/launch.cuh"
#include "../common/numeric.cuh"
#include "../common/tile_io.cuh"
#include "reformer.h"
#include "reformer_sort.cuh"

namespace fk {
namespace reformer {

constexpr int kFlagThreads = 256;
constexpr int kHashThreads = 128;
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

// (mask, self) values that replace scores: HF's fp16 values for f16, fp32's otherwise.
template <typename T> struct MaskValues {
  static constexpr float kMask = std::is_same<T, __half>::value ? -1e4f : -1e9f;
  static constexpr float kSelf = std::is_same<T, __half>::value ? -1e3f : -1e5f;
};

// The score rule every kernel (forward and backward) applies, in HF's order: the query's
// own token is replaced by kSelf, causal (qi < kj) and padded keys by kMask. Returns
// whether the score of query token qi with key token kj is replaced, and by what.
template <typename T>
__device__ __forceinline__ bool replaced_score(int qi, int kj, int causal, const uint8_t *pad,
                                               float &value) {
  if (kj == qi) {
    value = MaskValues<T>::kSelf;
    return true;
  }
  if ((causal && qi < kj) || (pad != nullptr && pad[kj] != 0)) {
    value = MaskValues<T>::kMask;
    return true;
  }
  return false;
}

// The key normalisation's scale from sum(x^2): k = g x, g = (sum(x^2) + 1e-6 D)^(-1/2), i.e.
// HF's x (mean(x^2) + 1e-6)^(-1/2) / sqrt(D).
__device__ __forceinline__ float key_scale(float sum_sq, int d_head) {
  return 1.f / sqrtf(sum_sq + 1e-6f * float(d_head));
}

// Normalises f32 rows [0, nk) of x (stride ld, D = dh) in place by key_scale, a row per
// thread t (the CUDA-core kernels' key tiles).
__device__ __forceinline__ void normalise_rows(float *x, int ld, int nk, int dh, int t) {
  if (t >= nk) return;
  float s2 = 0.f;
  for (int d = 0; d < dh; ++d) s2 += x[t * ld + d] * x[t * ld + d];
  const float g = key_scale(s2, dh);
  for (int d = 0; d < dh; ++d) x[t * ld + d] *= g;
}

// The first chunk of chunk c's window, (c - before) mod nc (HF's look-adjacent order).
__device__ __forceinline__ int64_t window_first(int64_t c, int64_t nc, int before) {
  return (c + nc - before % nc) % nc;
}

// Whether a tensor-core kernel can read (or write) a (B, N, H, D) tensor's rows as 16-byte
// chunks: its pointer and strides 16-byte aligned (and D % 8 == 0, checked by the caller).
inline bool tc_eligible(const void *ptr, fk_strides s) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s.batch % 8 == 0 && s.row % 8 == 0 &&
         s.head % 8 == 0;
}

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

// The rotations split for the tensor-core hash: hi[h, r, k, d] = R[h, d, r, k] rounded to
// T, lo = (R - hi) rounded to T, each (H, R, half, D) (grid-stride over its elements).
template <typename T>
__global__ void __launch_bounds__(kHashThreads)
    reformer_rot_split_kernel(const float *rot, T *hi, T *lo, int heads, int d_head, int n_hashes,
                              int half) {
  const int64_t total = int64_t(heads) * n_hashes * half * d_head;
  for (int64_t e = int64_t(blockIdx.x) * kHashThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kHashThreads) {
    const int d = int(e % d_head);
    const int64_t hrk = e / d_head; // (h, r, k)
    const int k = int(hrk % half), r = int(hrk / half % n_hashes), h = int(hrk / half / n_hashes);
    const float x = rot[((int64_t(h) * d_head + d) * n_hashes + r) * half + k];
    const T xh = from_float<T>(x);
    hi[e] = xh;
    lo[e] = from_float<T>(x - to_float(xh));
  }
}

// The hash on tensor cores: a block of 8 warps owns 128 tokens of (b, h) (16 a warp, rows in
// registers) for every round; per round the rotations' columns are visited 64 at a time
// (hi and lo tiles through shared memory), S = x hi^T + x lo^T on mma.sync, and each row
// keeps the first maximum and the first minimum of S over its columns (per thread in
// column order, then across the row's four threads, ties to the lower column): the same
// first argmax of [x R ; -x R] as reformer_hash_kernel, in f32 with other roundings.
template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    reformer_hash_tc_kernel(const typename Traits::Element *qk, fk_strides qs,
                            const typename Traits::Element *rot_hi,
                            const typename Traits::Element *rot_lo, const uint8_t *pad,
                            const int32_t *flag, int32_t *buckets, int n, int d_head, int n_hashes,
                            int n_buckets) {
  using T = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM, BN = Traits::kBlockN;
  constexpr int kNThreads = Traits::kNThreads, kKSteps = D / 16, kSTiles = BN / 8;
  static_assert(Traits::kMTiles == 1 && BM == 16 * Traits::kNWarps, "a warp owns 16 token rows");
  T *sX = reinterpret_cast<T *>(reformer_smem());
  T *sHi = sX + Traits::kSmemQ;
  T *sLo = sHi + Traits::kSmemKV;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int h = blockIdx.y, b = blockIdx.z, i0 = blockIdx.x * BM;
  const int half = n_buckets / 2, d_chunks = d_head / 8;
  load_tile<kNThreads, D, BM>(
      FirstRows{n - i0}, d_chunks, tid,
      tile_source(sX, qk + b * qs.batch + h * qs.head + int64_t(i0) * qs.row, qs.row));
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t xf[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) attn::load_a<D>(xf[ks], sX, warp * 16, ks, lane);
  const attn::RegA<kKSteps> x_src{xf};
  const int pad_any = flag != nullptr && *flag != 0 ? 1 : 0;
  for (int r = 0; r < n_hashes; ++r) {
    const int64_t rows0 = (int64_t(h) * n_hashes + r) * half; // (h, r, k = 0)
    float hi[2] = {-INFINITY, -INFINITY}, lo[2] = {INFINITY, INFINITY};
    int khi[2] = {0, 0}, klo[2] = {0, 0};
    for (int k0 = 0; k0 < half; k0 += BN) {
      __syncthreads(); // the previous tiles are read
      load_tile<kNThreads, D, BN>(FirstRows{half - k0}, d_chunks, tid,
                                  tile_source(sHi, rot_hi + (rows0 + k0) * d_head, d_head),
                                  tile_source(sLo, rot_lo + (rows0 + k0) * d_head, d_head));
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float s[1][kSTiles][4];
      attn::zero(s);
      attn::gemm_abt<D>(s, x_src, sHi, lane);
      attn::gemm_abt<D>(s, x_src, sLo, lane);
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int k = k0 + j * 8 + 2 * t + (e & 1), rr = e >> 1;
          const float v = s[0][j][e];
          if (k < half && v > hi[rr]) hi[rr] = v, khi[rr] = k;
          if (k < half && v < lo[rr]) lo[rr] = v, klo[rr] = k;
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
      for (int m = 1; m <= 2; m *= 2) { // the row's four threads
        const float oh = __shfl_xor_sync(0xffffffffu, hi[rr], m);
        const int okh = __shfl_xor_sync(0xffffffffu, khi[rr], m);
        const float ol = __shfl_xor_sync(0xffffffffu, lo[rr], m);
        const int okl = __shfl_xor_sync(0xffffffffu, klo[rr], m);
        if (oh > hi[rr] || (oh == hi[rr] && okh < khi[rr])) hi[rr] = oh, khi[rr] = okh;
        if (ol < lo[rr] || (ol == lo[rr] && okl < klo[rr])) lo[rr] = ol, klo[rr] = okl;
      }
      const int i = i0 + warp * 16 + g + 8 * rr;
      if (t == 0 && i < n) {
        const int bucket = pad_any && pad[int64_t(b) * n + i] != 0 ? n_buckets
                           : -lo[rr] > hi[rr]                      ? half + klo[rr]
                                                                   : khi[rr];
        buckets[((int64_t(b) * gridDim.y + h) * n_hashes + r) * n + i] =
            bucket + r * (n_buckets + pad_any);
      }
    }
  }
}

// The tensor-core hash's configuration per padded head dim: 8 warps (128 tokens, so each
// round's rotations are read from L2 once per 128 tokens), 64 rotation columns
// a step (only kSmemQ and one kSmemKV-sized hi and lo tile are used).
template <int D, typename T> using HashTcTraits = AttnFwdTraitsSm80<D, T, 1, 8, 64, 1, true>;

template <int D, typename T> size_t hash_tc_smem_bytes() {
  using Tr = HashTcTraits<D, T>;
  return size_t(Tr::kSmemQ + 2 * Tr::kSmemKV) * sizeof(T);
}

// Hashes into p.buckets: on tensor cores when qk's rows are 16-byte chunks (the rotations
// split into the workspace first), else on CUDA cores.
template <typename T>
cudaError_t launch_hash(const fk_reformer_fwd_params &p, T *rot_split, const int32_t *flag,
                        dim3 heads_batch, cudaStream_t stream) {
  const T *qk = static_cast<const T *>(p.qk);
  const int n = p.seqlen, nh = p.n_hashes, half = p.n_buckets / 2;
  if (rot_split != nullptr && p.head_dim <= 128 && tc_eligible(p.qk, p.qk_stride)) {
    T *hi = rot_split, *lo = rot_split + int64_t(p.heads) * nh * half * p.head_dim;
    const int64_t total = int64_t(p.heads) * nh * half * p.head_dim;
    cudaError_t err = launch_kernel(
        reformer_rot_split_kernel<T>,
        dim3(unsigned(std::min<int64_t>((total + kHashThreads - 1) / kHashThreads, 1 << 16))),
        dim3(kHashThreads), 0, stream, p.rotations, hi, lo, p.heads, p.head_dim, nh, half);
    if (err != cudaSuccess) return err;
    constexpr int kTokens = HashTcTraits<64, T>::kBlockM;
    static_assert(kTokens == HashTcTraits<128, T>::kBlockM, "one grid for both head dims");
    const dim3 grid(unsigned((n + kTokens - 1) / kTokens), heads_batch.y, heads_batch.z);
    if (p.head_dim <= 64)
      return launch_kernel(reformer_hash_tc_kernel<HashTcTraits<64, T>>, grid,
                           dim3(HashTcTraits<64, T>::kNThreads), hash_tc_smem_bytes<64, T>(),
                           stream, qk, p.qk_stride, hi, lo, p.key_padding, flag, p.buckets, n,
                           p.head_dim, nh, p.n_buckets);
    return launch_kernel(reformer_hash_tc_kernel<HashTcTraits<128, T>>, grid,
                         dim3(HashTcTraits<128, T>::kNThreads), hash_tc_smem_bytes<128, T>(),
                         stream, qk, p.qk_stride, hi, lo, p.key_padding, flag, p.buckets, n,
                         p.head_dim, nh, p.n_buckets);
  }
  const int64_t rows = int64_t(nh) * n;
  return launch_kernel(
      reformer_hash_kernel<T>,
      dim3(unsigned((rows + kHashThreads - 1) / kHashThreads), heads_batch.y, heads_batch.z),
      dim3(kHashThreads), 0, stream, qk, p.qk_stride, p.rotations, p.key_padding, flag, p.buckets,
      n, p.head_dim, nh, p.n_buckets);
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
  const float *myq = sq + t * ld;
  float *myo = so + t * ld, *mys = ss + t * (kKeys + 1);
  float m = -INFINITY, l = 0.f;
  // The window: chunks (c - before + w) mod nc, w = 0 .. before + after (as HF's
  // look-adjacent, in its order).
  const int64_t first = window_first(c, nc, a.before);
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
      normalise_rows(sk, dh, nk, dh, t);
      __syncthreads();
      if (active) {
        float mt = m;
        for (int j = 0; j < nk; ++j) {
          float sc;
          if (!replaced_score<T>(qi, stok[j], a.causal, pad, sc)) {
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

// attn on tensor cores (the dense forward's building blocks, attention/common): a block of
// 4 warps owns BM = 64 sorted queries of one chunk (16 a warp, Q in registers); the window,
// the sorted positions [w0, w0 + (before + 1 + after) C) modulo L (chunks (c - before ..
// c + after) mod nc, in HF's order, wrapping duplicates and all), is visited in 64-key
// blocks gathered by token with cp.async (double-buffered), S = Q X^T and O += P V on
// mma.sync, the online softmax of attention/common/softmax.cuh in the exp2 domain. The key
// normalisation is a per-column scale of S (k_j = g_j x_j, g_j = (|x_j|^2 + 1e-6 D)^-1/2,
// from the key tile in shared memory: two threads a row); masked scores are replaced
// (HF's values) after it, keys past the window are -inf. Needs D % 8 == 0 and 16-byte
// aligned rows (tc_eligible); otherwise the CUDA-core kernel above runs.
template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSm)
    reformer_attn_tc_kernel(const AttnArgs<typename Traits::Element> a) {
  using T = typename Traits::Element;
  using Tile = typename Traits::Tile;
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM, BN = Traits::kBlockN;
  constexpr int kNThreads = Traits::kNThreads, kKSteps = D / 16, kSTiles = BN / 8;
  static_assert(Traits::kMTiles == 1 && Traits::kQInRegs, "a warp owns 16 rows, Q in registers");
  static_assert(kNThreads == 2 * BN, "two threads per key row compute its scale");
  T *sQ = reinterpret_cast<T *>(reformer_smem());
  T *sK = sQ + Traits::kSmemQ;                                    // two stages
  T *sV = sK + 2 * Traits::kSmemKV;                               // two stages
  int *sTok = reinterpret_cast<int *>(sV + 2 * Traits::kSmemKV); // two stages x BN tokens
  float *sG = reinterpret_cast<float *>(sTok + 2 * BN);           // two stages x BN scales
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int h = blockIdx.y, b = blockIdx.z;
  const int tiles = (a.chunk + BM - 1) / BM;
  const int64_t c = blockIdx.x / tiles;
  const int q0 = int(blockIdx.x % tiles) * BM;
  const int nq = min(BM, a.chunk - q0);
  const int64_t bh = int64_t(b) * a.heads + h;
  const int64_t nc = a.n_chunks, L = nc * a.chunk;
  const int32_t *perm = a.perm != nullptr ? a.perm + bh * L : nullptr;
  const T *qk = a.qk + b * a.qs.batch + h * a.qs.head;
  const T *v = a.v + b * a.vs.batch + h * a.vs.head;
  const uint8_t *pad = a.pad != nullptr ? a.pad + int64_t(b) * a.n : nullptr;
  const int64_t s0 = c * a.chunk + q0; // first sorted position of the block
  const int d_chunks = a.d_head / 8;
  const int warp_row0 = warp * 16;
  // The block's query rows: tokens at its sorted positions, none past the chunk's end.
  auto query_tok = [&](int row) { return row < nq ? token_at(perm, s0 + row) : -1; };
  load_tile<kNThreads, D, BM>(token_rows(query_tok), d_chunks, tid, tile_source(sQ, qk, a.qs.row));
  cp_async_commit();
  const int64_t w0 = window_first(c, nc, a.before) * a.chunk;
  const int64_t wlen = int64_t(a.before + 1 + a.after) * a.chunk;
  const int n_blocks = int((wlen + BN - 1) / BN);
  auto load_kv = [&](int kb, int stage) {
    const int64_t k0 = int64_t(kb) * BN;
    auto tok = [&](int row) { return k0 + row < wlen ? token_at(perm, (w0 + k0 + row) % L) : -1; };
    load_tile<kNThreads, D, BN>(token_rows(tok), d_chunks, tid,
                                tile_source(sK + stage * Traits::kSmemKV, qk, a.qs.row),
                                tile_source(sV + stage * Traits::kSmemKV, v, a.vs.row));
    if (tid < BN) sTok[stage * BN + tid] = tok(tid); // read after the loop's barrier
  };
  load_kv(0, 0);
  cp_async_commit();
  int qtok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) qtok[r] = query_tok(warp_row0 + g + 8 * r);
  cp_async_wait<1>(); // Q has landed
  __syncthreads();
  uint32_t qf[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) attn::load_a<D>(qf[ks], sQ, warp_row0, ks, lane);
  const attn::RegA<kKSteps> q_src{qf};
  float acc[1][D / 8][4];
  attn::zero(acc);
  attn::OnlineSoftmax<1> softmax;
  for (int kb = 0; kb < n_blocks; ++kb) {
    const int stage = kb & 1;
    if (kb + 1 < n_blocks) {
      load_kv(kb + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>(); // block kb has landed, kb + 1 may be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T *sKs = sK + stage * Traits::kSmemKV;
    const int *tok = sTok + stage * BN;
    float *gs = sG + stage * BN;
    { // g of key row tid / 2: each of its two threads sums half its 16-byte chunks.
      const int row = tid / 2;
      float s2 = 0.f;
      for (int ch = tid % 2; ch < d_chunks; ch += 2) {
        const T *x = sKs + Tile::offset(row, ch);
#pragma unroll
        for (int e = 0; e < 8; ++e) s2 += to_float(x[e]) * to_float(x[e]);
      }
      s2 += __shfl_xor_sync(0xffffffffu, s2, 1);
      if (tid % 2 == 0) gs[row] = key_scale(s2, a.d_head);
    }
    __syncthreads();
    float s[1][kSTiles][4];
    attn::zero(s);
    attn::gemm_abt<D>(s, q_src, sKs, lane);
#pragma unroll
    for (int j = 0; j < kSTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1);
        const int kj = tok[col], qi = qtok[e >> 1];
        // replaced_score's rule, written out: the helper call measured a 4-byte spill
        // here (sm_90a, D 64).
        float x = s[0][j][e] * gs[col];
        if (kj < 0)
          x = -INFINITY; // past the window
        else if (kj == qi)
          x = MaskValues<T>::kSelf;
        else if ((a.causal && qi < kj) || (pad != nullptr && pad[kj] != 0))
          x = MaskValues<T>::kMask;
        s[0][j][e] = x;
      }
    softmax.update(s, acc, attn::kLog2e);
    attn::gemm_xb<D>(acc, s, sV + stage * Traits::kSmemKV, lane);
    __syncthreads(); // everyone is done with this stage before it is refilled
  }
  // Epilogue: per round LSE and O in token order (the unsort). One round: O is staged in
  // this warp's Q rows (read into registers before the loop's first barrier) and stored 16
  // bytes at a time; more: f32 rows of the rounds' workspace.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lse;
    const float inv = softmax.finalize(0, r, lse);
    const int row = warp_row0 + g + 8 * r, qi = qtok[r];
    if (qi >= 0) {
      const int64_t rd = (s0 + row) / a.n;
      if (t == 0) a.lse[(bh * a.rounds + rd) * a.n + qi] = lse;
      if (a.o_rounds != nullptr) {
        float *o = a.o_rounds + ((bh * a.rounds + rd) * a.n + qi) * a.d_head;
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
          if (8 * i + 2 * t < a.d_head)
            *reinterpret_cast<float2 *>(o + 8 * i + 2 * t) =
                make_float2(acc[0][i][2 * r] * inv, acc[0][i][2 * r + 1] * inv);
      }
    }
    if (a.o_rounds == nullptr) stage_row<D>(sQ, row, acc[0], r, inv, t);
  }
  if (a.o_rounds == nullptr) {
    __syncwarp();
    store_rows<D, 16>(
        a.out + b * a.os.batch + h * a.os.head, a.os.row, sQ, warp_row0,
        [&](int row, ChunkOk chunk_ok) { return chunk_ok() ? query_tok(row) : -1; }, d_chunks,
        lane);
  }
}

// The tensor-core attn's configuration per padded head dim: 4 warps, 64-key blocks.
template <int D, typename T>
using AttnTcTraits = AttnFwdTraitsSm80<D, T, 1, 4, 64, D == 64 ? 3 : 2, true>;

template <int D, typename T> size_t attn_tc_smem_bytes() {
  using Tr = AttnTcTraits<D, T>;
  return Tr::kSmemBytes + size_t(2 * Tr::kBlockN) * (sizeof(int) + sizeof(float));
}

// grid: (n_chunks * ceil(C / 64), H, B) either way (kQueries = BM = 64 queries a block).
template <typename T>
cudaError_t launch_attn(const AttnArgs<T> &a, dim3 heads_batch, cudaStream_t stream) {
  static_assert(kQueries == AttnTcTraits<64, T>::kBlockM, "one grid for both kernels");
  const dim3 grid(unsigned(int64_t(a.n_chunks) * ((a.chunk + kQueries - 1) / kQueries)),
                  heads_batch.y, heads_batch.z);
  const bool tc = a.d_head % 8 == 0 && a.d_head <= 128 && tc_eligible(a.qk, a.qs) &&
                  tc_eligible(a.v, a.vs) && tc_eligible(a.out, a.os);
  if (tc && a.d_head <= 64)
    return launch_kernel(reformer_attn_tc_kernel<AttnTcTraits<64, T>>, grid,
                         dim3(AttnTcTraits<64, T>::kNThreads), attn_tc_smem_bytes<64, T>(), stream,
                         a);
  if (tc)
    return launch_kernel(reformer_attn_tc_kernel<AttnTcTraits<128, T>>, grid,
                         dim3(AttnTcTraits<128, T>::kNThreads), attn_tc_smem_bytes<128, T>(),
                         stream, a);
  return launch_kernel(reformer_attn_kernel<T>, grid, dim3(kQueries), attn_smem_bytes(a.d_head),
                       stream, a);
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
  uint32_t *keys = ws.keys >= 0 ? reinterpret_cast<uint32_t *>(w + ws.keys) : nullptr;
  int32_t *counts = ws.counts >= 0 ? reinterpret_cast<int32_t *>(w + ws.counts) : nullptr;
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
      T *rot_split = ws.rot_split >= 0 ? reinterpret_cast<T *>(w + ws.rot_split) : nullptr;
      err = launch_hash(p, rot_split, flag, heads_batch, stream);
      if (err != cudaSuccess) return err;
      bk = p.buckets;
    }
    err =
        sort_rounds<T>(bk, flag, keys, counts, perm, p.batch, p.heads, n, nh, p.n_buckets, stream);
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
  err = launch_attn(a, heads_batch, stream);
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
