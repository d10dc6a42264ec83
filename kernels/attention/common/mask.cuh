// Who sees whom: the masks of the attention kernels, once.
// - The dense band (visible, band_query_rows / band_key_rows, tile_needs_mask, key_blocks,
//   query_blocks): the causal /
//   sliding-window mask of flashkernels.h for one sequence (aligned bottom-right: query i
//   sees key j iff i + diag - window_left <= j <= i + diag + window_right, a side of -1
//   unbounded): per element, per tile (whether any element needs the per-element test) and
//   as the ranges of key blocks a query block sees and of query blocks a key block is seen
//   by. Used by the dense backward and the Hopper forward's key ranges (the forwards keep
//   an equivalent per-element form that needs fewer registers there). The C entries have made a
//   side that masks nothing unbounded (check_window), so 32-bit index arithmetic cannot overflow
//   here.
// - LongformerRule: THE RULE of fk_longformer.h for one (sequence, head). Used by the
//   Longformer forward and backward.
#pragma once

#include <stdint.h>

#include "../../include/fk_longformer.h"

namespace fk {
namespace attn {

// The dense band, for one sequence of lengths nq, nk with diag = nk - nq and window sides
// wl, wr (-1: unbounded). kHasMask: some side may be bounded (else only the sequence ends
// mask). Plain functions of values: kernels pass the locals they keep anyway.

// Query i sees key j (i, j relative to the sequence); queries past nq see nothing.
template <bool kHasMask>
__device__ __forceinline__ bool visible(int i, int j, int nq, int nk, int diag, int wl, int wr) {
  bool ok = i < nq && j < nk;
  if (kHasMask) {
    if (wl >= 0) ok = ok && j >= i + diag - wl;
    if (wr >= 0) ok = ok && j <= i + diag + wr;
  }
  return ok;
}

// The band over an accumulator tile in mma.sync's m16n8 fragment layout, hidden entries
// set to -inf: this thread's rows are `row` and row + 8, its columns col0 + 8 j (+ 1).
// Rows are queries (band_query_rows: S, dP) or keys (band_key_rows: S^T, dP^T of the
// dK / dV kernels). Callers apply it to the tiles tile_needs_mask flags.
template <bool kHasMask, int NT>
__device__ __forceinline__ void band_query_rows(float (&s)[NT][4], int row, int col0, int nq,
                                                int nk, int diag, int wl, int wr) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (!visible<kHasMask>(row + (e >= 2 ? 8 : 0), col0 + j * 8 + (e & 1), nq, nk, diag, wl, wr))
        s[j][e] = -INFINITY;
}
template <bool kHasMask, int NT>
__device__ __forceinline__ void band_key_rows(float (&s)[NT][4], int row, int col0, int nq, int nk,
                                              int diag, int wl, int wr) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (!visible<kHasMask>(col0 + j * 8 + (e & 1), row + (e >= 2 ? 8 : 0), nq, nk, diag, wl, wr))
        s[j][e] = -INFINITY;
}

// Whether some (query, key) of the tile [m0, m0 + bm) x [n0, n0 + bn) is not visible.
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

// Key blocks [begin, end) of size bn that some query of [m0, min(m0 + bm, nq)) sees.
template <bool kHasMask>
__device__ __forceinline__ void key_blocks(int m0, int bm, int bn, int nq, int nk, int diag, int wl,
                                           int wr, int &begin, int &end) {
  const int last_q = min(m0 + bm, nq) - 1;
  int j_lo = 0, j_hi = nk - 1;
  if (kHasMask) {
    if (wl >= 0) j_lo = max(j_lo, m0 + diag - wl);
    if (wr >= 0) j_hi = min(j_hi, last_q + diag + wr);
  }
  begin = j_lo / bn;
  end = j_hi >= j_lo ? j_hi / bn + 1 : begin;
}

// Query blocks [begin, begin + count) of size bm that see some key of [n0, min(n0 + bn,
// nk)): j <= i + diag + wr gives i >= n0 - diag - wr, j >= i + diag - wl gives
// i <= last_key - diag + wl.
template <bool kHasMask>
__device__ __forceinline__ void query_blocks(int n0, int bn, int bm, int nq, int nk, int diag,
                                             int wl, int wr, int &begin, int &count) {
  const int last_key = min(n0 + bn, nk) - 1;
  int i_lo = 0, i_hi = nq - 1;
  if (kHasMask) {
    if (wr >= 0) i_lo = max(i_lo, n0 - diag - wr);
    if (wl >= 0) i_hi = min(i_hi, last_key - diag + wl);
  }
  begin = i_lo / bm;
  count = i_hi >= i_lo ? i_hi / bm + 1 - begin : 0;
}

// THE RULE (fk_longformer.h) for one (sequence, head). query_ok / key_ok say whether a row
// takes part at all; pair() is the whole per-element rule, given those flags, the key's
// global flag and whether i and j have equal residues modulo d_h (residue(), computed once
// per row instead of a division per element). in_band() is the band of a distance |j - i|
// for callers that test per element.
struct LongformerRule {
  int n;         // N
  int dil;       // d_h clipped to N
  int64_t reach; // w * d_h, w clipped to N
  bool causal;
  const uint8_t *glob; // this sequence's (N) masks, or nullptr
  const uint8_t *pad;

  // The rule of every pass; pair() takes the pass. n_tokens: N (base.shape.seqlen_q).
  __device__ __forceinline__ LongformerRule(const fk_longformer_common &c, int n_tokens, int b,
                                            int h) {
    n = n_tokens;
    dil = min(c.dilation[h], max(n, 1));
    reach = int64_t(min(c.window, n)) * dil;
    causal = c.causal != 0;
    glob = c.global_mask ? c.global_mask + int64_t(b) * n : nullptr;
    pad = c.padding_mask ? c.padding_mask + int64_t(b) * n : nullptr;
  }
  // Rows pass (GLOBAL_ROWS) as LOCAL's rule: no global mask (every non-padded row is local,
  // no key is global) and a band that holds every pair (d = 1, reach N), which leaves
  // GLOBAL_ROWS' rule. (Clipping w and d to N changes no key and keeps w * d far from
  // overflow.)
  static __device__ __forceinline__ LongformerRule local_form(const fk_longformer_common &c,
                                                              int n_tokens, int b, int h,
                                                              bool rows_pass) {
    const int n = n_tokens;
    const uint8_t *glob = rows_pass       ? nullptr
                          : c.global_mask ? c.global_mask + int64_t(b) * n
                                          : nullptr;
    const uint8_t *pad = c.padding_mask ? c.padding_mask + int64_t(b) * n : nullptr;
    const int dil = rows_pass ? 1 : min(c.dilation[h], max(n, 1));
    const int win = rows_pass ? n : min(c.window, n);
    return LongformerRule(n, dil, int64_t(win) * dil, c.causal != 0, glob, pad);
  }
  __device__ __forceinline__ LongformerRule(int n_, int dil_, int64_t reach_, bool causal_,
                                            const uint8_t *glob_, const uint8_t *pad_)
      : n(n_), dil(dil_), reach(reach_), causal(causal_), glob(glob_), pad(pad_) {}
  __device__ __forceinline__ bool padded(int i) const { return pad != nullptr && pad[i] != 0; }
  __device__ __forceinline__ bool global(int i) const { return glob != nullptr && glob[i] != 0; }
  // Query token i (-1: none) is a row of `pass`: local for LOCAL, LOCAL_BAND, GLOBAL_COLS;
  // a listed row for GLOBAL_ROWS (i comes from q_rows then). A padded token never is.
  __device__ __forceinline__ bool query_ok(int pass, int i) const {
    return i >= 0 && !padded(i) && (pass == FK_LONGFORMER_GLOBAL_ROWS || !global(i));
  }
  // Key token j (-1: none) can be a key: in [0, N) and not padded. (For GLOBAL_COLS the key
  // is a listed one, j comes from k_rows.)
  __device__ __forceinline__ bool key_ok(int j) const { return j >= 0 && !padded(j); }
  // i mod d_h: (j - i) % d_h == 0 iff residue(i) == residue(j).
  __device__ __forceinline__ int residue(int i) const { return dil == 1 ? 0 : i % dil; }
  // |j - i| = dist is inside the band.
  __device__ __forceinline__ bool in_band(int dist) const {
    return dist <= reach && (dil == 1 || dist % dil == 0);
  }
  // Query i attends to key j in `pass`; congruent: residue(i) == residue(j).
  __device__ __forceinline__ bool pair(int pass, int i, int j, bool q_ok, bool k_ok, bool k_glob,
                                       bool congruent) const {
    if (!q_ok || !k_ok) return false;
    const int rel = j - i; // |rel| < N < 2^30
    if (causal && rel > 0) return false;
    if (pass == FK_LONGFORMER_GLOBAL_ROWS || pass == FK_LONGFORMER_GLOBAL_COLS) return true;
    const int dist = rel < 0 ? -rel : rel;
    const bool band = dist <= reach && congruent;
    return pass == FK_LONGFORMER_LOCAL ? (band || k_glob) : (band && !k_glob);
  }
};

} // namespace attn
} // namespace fk
