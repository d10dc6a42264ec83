// Reformer's bucket sort (issue 16), used by the forward (reformer_sm80.cuh) and the backward
// (reformer_bwd_sm80.cuh): per (b, h, round r), a stable sort of round r's N tokens by
// bucket, perm[b, h, r N + s] = the token at round r's sorted position s. Round r's bucket
// values lie in [r nb', (r + 1) nb') (nb' = nb, + 1 when the padding flag is set), so the
// sorted order of the concatenated rounds is the rounds' orders one after the other. A value
// outside its round's range is clamped into it (given buckets are the host's to check).
//
// Why not one block per round scanning the round: that is O(N) serial latency per block on
// only B H R blocks (the issue's shape, B 1 H 8 N 16384 R 4, is 32 blocks); why not a
// CUB-style radix sort: the CPU emulator that tests these kernels has no atomics and no warp
// ballots. So a segmented sort on shared memory and barriers alone, in three kernels, with
// the rounds cut into segments of S = kSortSegment (1024) tokens (the last may be shorter):
//
//   seg      one block per (segment, r, h, b): the segment's keys (local bucket << 10 |
//            index in the segment) bitonic-sorted in shared memory (padded to a power of
//            two with ~0u), so the segment's tokens are in (bucket, index) order; writes
//            them to `keys` (workspace, in place of the segment's buckets' positions) and
//            the segment's count of every bucket v in [0, nb] (zeros included) to
//            counts[b, h, r][v][segment]: bucket-major, so that a scan in memory order
//            visits the buckets in order and, within a bucket, the segments in token order.
//            Counts come from run lengths (a bucket is one run of the sorted segment): its
//            last element writes the run's end, then (after a barrier) its first subtracts
//            the run's start; one writer per counter per phase.
//   scan     one block per (r, h, b): the exclusive scan of counts[b, h, r] in place, in
//            tiles of kScanTile with a running carry (each thread scans kScanItems
//            consecutive counters, a block scan of the threads' sums links them): offsets.
//   scatter  one block per (segment, r, h, b): the element at sorted segment position s,
//            bucket v, goes to round position offsets[v][segment] + (s - the first position
//            of v's run in the segment, a binary search in the segment's keys).
// Stable and deterministic by construction (segments in token order within a bucket,
// indices ascending within a segment), no atomics. Work O(N log^2 S) compare-exchanges per
// round for the bitonic sorts (55 barrier-separated passes per full segment), O(N + nb N / S)
// for the counts and their scan, O(N log S) for the scatter; B H R ceil(N / S) blocks for
// seg and scatter. The scan is one block per row, serial over (nb + 1) ceil(N / S) counters:
// small at the issue's shapes (nb ~ 512: ~8K counters, 5 tiles), the part that grows with
// nb (8192 buckets at N = 16384: ~131K counters, 65 tiles); a multi-block scan (tile sums,
// their scan, the tiles again) would be the next step there.
#pragma once

#include <stdint.h>

#include "../common/launch.cuh"
#include "reformer.h"

namespace fk {

// The dynamic shared memory, declared in namespace fk (the emulator binds fk::smem_raw).
__device__ __forceinline__ unsigned char *reformer_smem() {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  return smem_raw;
}

namespace reformer {

constexpr int kSortThreads = 512;   // seg / scatter: at most S / 2 (one pair per pass each)
constexpr int kSortIdxBits = 10;    // log2(kSortSegment): the index in the key
constexpr uint32_t kSortPadKey = ~0u; // above every key (< 2^24: local buckets <= 8192)
constexpr int kScanThreads = 256;
constexpr int kScanItems = 8;       // consecutive counters per thread
constexpr int kScanTile = kScanThreads * kScanItems;
constexpr int kScanSlots = kScanTile + kScanTile / 32; // the tile, one pad word per 32
static_assert((1 << kSortIdxBits) == kSortSegment, "the key's index field holds S positions");

// The scan tile's shared-memory slot of counter e: one pad word per 32, so that a warp's
// threads (kScanItems counters apart) and its coalesced loads are both free of bank
// conflicts.
__device__ __forceinline__ int scan_slot(int e) { return e + (e >> 5); }

// The sort's span: segments (all but the last full) are sorted as span keys, the least power
// of two >= min(N, S). Seg's and scatter's threads: span / 2, at least one warp.
inline int sort_span(int n) {
  int span = 2;
  while (span < n && span < kSortSegment) span *= 2;
  return span;
}
inline int sort_threads(int span) { return span / 2 < 32 ? 32 : span / 2; }
inline size_t sort_seg_smem_bytes(int span, int n_buckets) {
  return size_t(span + n_buckets + 1) * 4;
}
inline size_t sort_scan_smem_bytes() { return size_t(kScanSlots + kScanThreads) * 4; }

// Row (b, h, r) of the (segment, r) x H x B grids, and the segment.
struct SortBlock {
  int64_t row;
  int r, seg, first, len; // first token of the segment and its length
  __device__ SortBlock(int n, int n_hashes) {
    const int segs = sort_segments(n);
    r = int(blockIdx.x / unsigned(segs)), seg = int(blockIdx.x % unsigned(segs));
    row = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * n_hashes + r;
    first = seg * kSortSegment;
    len = n - first < kSortSegment ? n - first : kSortSegment;
  }
};

// grid: (R ceil(N / S), H, B); block: sort_threads(span); smem: sort_seg_smem_bytes.
template <typename T>
__global__ void __launch_bounds__(kSortThreads)
    reformer_sort_seg_kernel(const int32_t *buckets, const int32_t *flag, uint32_t *keys,
                             int32_t *counts, int n, int n_hashes, int n_buckets, int span) {
  uint32_t *sk = reinterpret_cast<uint32_t *>(reformer_smem()); // span keys
  int *hist = reinterpret_cast<int *>(sk + span);               // nb + 1 counters
  const SortBlock blk(n, n_hashes);
  const int t = threadIdx.x, nt = blockDim.x;
  const int nbp = n_buckets + (flag != nullptr && *flag != 0 ? 1 : 0);
  const int32_t *bk = buckets + blk.row * n + blk.first;
  const int64_t base = int64_t(blk.r) * nbp;
  for (int s = t; s < span; s += nt) {
    uint32_t key = kSortPadKey;
    if (s < blk.len) { // round r's local bucket, clamped into [0, nb')
      const int64_t v = int64_t(bk[s]) - base;
      const int64_t c = v < 0 ? 0 : v > nbp - 1 ? nbp - 1 : v;
      key = uint32_t(c) << kSortIdxBits | uint32_t(s);
    }
    sk[s] = key;
  }
  for (int v = t; v <= n_buckets; v += nt) hist[v] = 0;
  __syncthreads();
  // Bitonic sort, ascending: pass (k, j) compares i and i + j, i's j bit clear (pair p).
  for (int k = 2; k <= span; k *= 2)
    for (int j = k / 2; j > 0; j /= 2) {
      for (int p = t; p < span / 2; p += nt) {
        const int i = 2 * p - (p & (j - 1));
        const uint32_t a = sk[i], b = sk[i + j];
        if ((a > b) == ((i & k) == 0)) sk[i] = b, sk[i + j] = a;
      }
      __syncthreads();
    }
  // Run lengths: each run's last element writes its end, then its first subtracts its start.
  for (int s = t; s < blk.len; s += nt) {
    const uint32_t v = sk[s] >> kSortIdxBits;
    if (s == blk.len - 1 || (sk[s + 1] >> kSortIdxBits) != v) hist[v] = s + 1;
  }
  uint32_t *kout = keys + blk.row * n + blk.first;
  for (int s = t; s < blk.len; s += nt) kout[s] = sk[s];
  __syncthreads();
  for (int s = t; s < blk.len; s += nt) {
    const uint32_t v = sk[s] >> kSortIdxBits;
    if (s == 0 || (sk[s - 1] >> kSortIdxBits) != v) hist[v] -= s;
  }
  __syncthreads();
  const int segs = sort_segments(n);
  int32_t *cnt = counts + blk.row * sort_counts_per_row(n, n_buckets) + blk.seg;
  for (int v = t; v <= n_buckets; v += nt) cnt[int64_t(v) * segs] = hist[v];
}

// Exclusive scan of each row's counters in place (grid: (R, H, B); block: kScanThreads).
template <typename T>
__global__ void __launch_bounds__(kScanThreads)
    reformer_sort_scan_kernel(int32_t *counts, int64_t per_row, int n_hashes) {
  int *tile = reinterpret_cast<int *>(reformer_smem()); // scan_slot(kScanTile) counters
  int *part = tile + kScanSlots;                 // the threads' sums
  const int t = threadIdx.x;
  const int64_t row = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * n_hashes + blockIdx.x;
  int32_t *c = counts + row * per_row;
  int carry = 0; // the counts before this tile (a round's total is N < 2^31)
  for (int64_t at = 0; at < per_row; at += kScanTile) {
    for (int e = t; e < kScanTile; e += kScanThreads)
      tile[scan_slot(e)] = at + e < per_row ? c[at + e] : 0;
    __syncthreads();
    int sum = 0;
    for (int k = 0; k < kScanItems; ++k) sum += tile[scan_slot(t * kScanItems + k)];
    part[t] = sum;
    __syncthreads();
    for (int off = 1; off < kScanThreads; off *= 2) { // inclusive scan of the sums
      const int x = t >= off ? part[t - off] : 0;
      __syncthreads();
      part[t] += x;
      __syncthreads();
    }
    int run = carry + part[t] - sum;
    for (int k = 0; k < kScanItems; ++k) {
      int *x = tile + scan_slot(t * kScanItems + k);
      const int here = *x;
      *x = run;
      run += here;
    }
    carry += part[kScanThreads - 1];
    __syncthreads();
    for (int e = t; e < kScanTile; e += kScanThreads)
      if (at + e < per_row) c[at + e] = tile[scan_slot(e)];
    __syncthreads(); // the tile and the sums are read before the next tile overwrites them
  }
}

// perm[row N + offsets[v][segment] + rank in the segment's run of v] = token (grid and block
// as seg's; smem: kSortSegment keys).
template <typename T>
__global__ void __launch_bounds__(kSortThreads)
    reformer_sort_scatter_kernel(const uint32_t *keys, const int32_t *offsets, int32_t *perm, int n,
                                 int n_hashes, int n_buckets) {
  uint32_t *sk = reinterpret_cast<uint32_t *>(reformer_smem());
  const SortBlock blk(n, n_hashes);
  const int t = threadIdx.x, nt = blockDim.x;
  const uint32_t *kin = keys + blk.row * n + blk.first;
  for (int s = t; s < blk.len; s += nt) sk[s] = kin[s];
  __syncthreads();
  const int segs = sort_segments(n);
  const int32_t *off = offsets + blk.row * sort_counts_per_row(n, n_buckets) + blk.seg;
  int32_t *pm = perm + blk.row * n;
  for (int s = t; s < blk.len; s += nt) {
    const uint32_t key = sk[s], v = key >> kSortIdxBits, lead = v << kSortIdxBits;
    int lo = 0, hi = s; // the first position of v's run: the first key >= lead in [0, s]
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (sk[mid] < lead)
        lo = mid + 1;
      else
        hi = mid;
    }
    pm[off[int64_t(v) * segs] + (s - lo)] = blk.first + int(key & (kSortSegment - 1));
  }
}

// Sorts every (b, h, round) row of `buckets` (B, H, R, N) into perm (same shape, tokens).
// keys: B H R N uint32 and counts: B H R sort_counts_per_row ints, both workspace. flag:
// the padding flag or null (nb' = nb).
template <typename T>
cudaError_t sort_rounds(const int32_t *buckets, const int32_t *flag, uint32_t *keys,
                        int32_t *counts, int32_t *perm, int batch, int heads, int n, int n_hashes,
                        int n_buckets, cudaStream_t stream) {
  const int span = sort_span(n);
  const dim3 seg_grid(unsigned(int64_t(n_hashes) * sort_segments(n)), unsigned(heads),
                      unsigned(batch));
  cudaError_t err = launch_kernel(reformer_sort_seg_kernel<T>, seg_grid, dim3(sort_threads(span)),
                                  sort_seg_smem_bytes(span, n_buckets), stream, buckets, flag, keys,
                                  counts, n, n_hashes, n_buckets, span);
  if (err != cudaSuccess) return err;
  err = launch_kernel(reformer_sort_scan_kernel<T>,
                      dim3(unsigned(n_hashes), unsigned(heads), unsigned(batch)),
                      dim3(kScanThreads), sort_scan_smem_bytes(), stream, counts,
                      sort_counts_per_row(n, n_buckets), n_hashes);
  if (err != cudaSuccess) return err;
  return launch_kernel(reformer_sort_scatter_kernel<T>, seg_grid, dim3(sort_threads(span)),
                       size_t(span) * 4, stream, keys, static_cast<const int32_t *>(counts), perm,
                       n, n_hashes, n_buckets);
}

} // namespace reformer
} // namespace fk
