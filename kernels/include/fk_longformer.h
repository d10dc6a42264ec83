/* flashkernels C ABI: Longformer attention, forward and backward, as passes of one
 * block-sparse kernel family driven by host-built work lists.
 *
 * Conventions as in flashkernels.h (strides in elements, 64-bit, unit-stride head dim;
 * launchers take the caller's stream and return a cudaError_t value).
 *
 * THE RULE. Per (sequence b, head h), with one-sided window w and dilation d_h, token i is
 * "local" when it is neither padded nor global. Every pair (query i, key j) below also
 * needs: i, j in [0, N), key j not padded, and (when causal) j <= i. Then
 *   band(i, j)  := |j - i| <= w * d_h and (j - i) % d_h == 0   (w, d_h clipped to N)
 *   LOCAL       : local(i) and (band(i, j) or global(j))          -- a local row's keys
 *   GLOBAL_ROWS : i is a listed (global) row                       -- a global row's keys
 *   LOCAL_BAND  : local(i) and band(i, j) and not global(j)        -- dK/dV only
 *   GLOBAL_COLS : local(i) and j is a listed (global) key          -- dK/dV only
 * LOCAL = LOCAL_BAND + GLOBAL_COLS, disjointly: a global key inside the window counts once.
 * A global row uses Q_g, K_g, V_g; the caller passes those as q, k, v of GLOBAL_ROWS.
 *
 * ROWS. Query (or key) rows of a pass are either contiguous tiles (tile m = tokens
 * [m * BLOCK, (m + 1) * BLOCK)) or gathered: `q_rows` / `k_rows` is a device (B, per_seq)
 * int32 array of token indices, each sequence's valid entries first (increasing), then -1;
 * tile m of sequence b is entries [m * BLOCK, (m + 1) * BLOCK) of its row.
 *
 * WORK LIST (CSR). A thread block owns one tile of its "outer" rows (queries for the
 * forward and dQ, keys for dK/dV) of one (sequence b, head h) and visits exactly the
 * "inner" tiles tile_ids[tile_offsets[r] .. tile_offsets[r + 1]), r = (b * num_classes +
 * head_class[h]) * num_outer_tiles + m, where num_outer_tiles = ceil(N / BLOCK) for
 * contiguous outer rows, ceil(per_seq / BLOCK) for gathered ones. Inner tile ids index
 * contiguous tiles of N, or tiles of the gathered list when the inner rows are gathered.
 * Heads of equal dilation can share a class (the rule depends on h only through d_h).
 * The list must name every inner tile holding a pair of the pass's rule for some row of
 * the outer tile; extra tiles only cost time (the rule is applied per element inside
 * every visited tile); a tile listed twice is counted twice. Each of tile_offsets and
 * tile_ids must be non-NULL (an empty list is offsets of zeros).
 *
 * Padded tokens' Q, K, V rows are never read into a result (zero-filled on load). */
#ifndef FK_LONGFORMER_H
#define FK_LONGFORMER_H

#include <stdint.h>

#include "flashkernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FK_LONGFORMER_BLOCK_M 128  /* forward: query rows per tile (every head dim) */
#define FK_LONGFORMER_BLOCK_N 64   /* forward: keys per tile (every head dim) */
#define FK_LONGFORMER_BWD_BLOCK 64 /* backward: query and key tile size of dQ and dK/dV */

/* Passes (see THE RULE above). */
#define FK_LONGFORMER_LOCAL 0
#define FK_LONGFORMER_GLOBAL_ROWS 1
#define FK_LONGFORMER_LOCAL_BAND 2
#define FK_LONGFORMER_GLOBAL_COLS 3

/* What every pass shares besides base (fk_attention_base: its shape has batch B >= 1,
 * heads = heads_kv = H >= 1 (no GQA), seqlen_q = seqlen_k = N >= 0 (< 2^30), head_dim D: a
 * multiple of 8, <= 128): the rule's inputs, the schedule. */
typedef struct {
  int32_t window;   /* one-sided window w >= 0; values above N act as N */
  int32_t causal;   /* nonzero: t in [-w, 0] and no key after the query */
  const int32_t *dilation;     /* device, H entries, each >= 1 (values above N act as N) */
  const uint8_t *global_mask;  /* device (B, N) row-major, nonzero = global token; NULL = none */
  const uint8_t *padding_mask; /* device (B, N) row-major, nonzero = padded token; NULL = none */

  int32_t pass;              /* FK_LONGFORMER_* */
  const int32_t *q_rows;     /* device (B, q_rows_per_seq) gathered query rows, or NULL */
  int32_t q_rows_per_seq;
  const int32_t *k_rows;     /* device (B, k_rows_per_seq) gathered key rows, or NULL */
  int32_t k_rows_per_seq;
  const int32_t *head_class; /* device, H entries in [0, num_classes) */
  int32_t num_classes;       /* >= 1 */
  const int32_t *tile_offsets;
  const int32_t *tile_ids;
} fk_longformer_common;

/* ---- Forward ----
 * pass LOCAL: outer = contiguous query tiles (BLOCK_M), q_rows = NULL. Writes O and LSE of
 *   every local row and of every padded row (O = 0, LSE = -inf); global rows untouched.
 *   Inner tiles, with k_rows = NULL: contiguous key tiles (BLOCK_N), pairs per LOCAL.
 *   With k_rows (the gathered global tokens, k_rows_per_seq >= 1): an inner id t below
 *   ceil(N / BLOCK_N) is contiguous key tile t, whose pairs follow LOCAL_BAND (its global
 *   keys are skipped); an id t >= ceil(N / BLOCK_N) is tile t - ceil(N / BLOCK_N) of the
 *   gathered keys (BLOCK_N entries of k_rows), whose pairs follow GLOBAL_COLS. Together
 *   that is LOCAL again, with the global keys packed into few tiles instead of one
 *   mostly-empty contiguous tile per global token. k_rows must list exactly the tokens
 *   global_mask marks (increasing, as ROWS says), or keys are counted twice or never.
 * pass GLOBAL_ROWS: outer = gathered query tiles of q_rows (BLOCK_M), inner = contiguous
 *   key tiles (BLOCK_N), k_rows = NULL, q/k/v = Q_g/K_g/V_g. Writes O and LSE of the listed
 *   rows only.
 *   Split over keys (flash-decoding), for few global rows and long sequences: with
 *   num_splits > 1 each outer tile of each (b, h) runs as num_splits blocks; split s
 *   visits entries [len * s / num_splits, len * (s + 1) / num_splits) of its CSR row
 *   (len = the row's length) and writes its partial result to the workspace: partial_o
 *   (num_splits, B, H, q_rows_per_seq, D) f32, normalised by its own sum (0 when it saw
 *   no key), and partial_lse (num_splits, B, H, q_rows_per_seq) f32 (-inf when it saw no
 *   key), contiguous, entry x of the gathered row at index x; then a combine kernel,
 *   launched by the same call, writes O = sum_s exp(lse_s - lse) O_s and
 *   LSE = log sum_s exp(lse_s) of the listed rows (every split in a fixed order:
 *   deterministic). num_splits = 1: no workspace (both may be NULL). LOCAL requires
 *   num_splits = 1. */
typedef struct {
  fk_attention_base base; /* q, k, v: (B, N, H, D) through base.q_stride etc. */
  fk_longformer_common c;
  void *o;    /* (B, N, H, D) through base.o_stride */
  float *lse; /* (B, H, N) f32 through base.lse_stride, unit row stride; natural log */
  int32_t num_splits;  /* >= 1; GLOBAL_ROWS only */
  float *partial_o;    /* workspace, see above (num_splits > 1) */
  float *partial_lse;  /* workspace, see above (num_splits > 1) */
} fk_longformer_fwd_params;

int32_t fk_longformer_fwd(const fk_longformer_fwd_params *params, void *stream);

/* ---- Backward ----
 * Recomputation from O and LSE, FlashAttention-2 style, deterministic (no atomics): every
 * gradient row is summed by one thread block in the work list's order. Host order:
 *   1. fk_longformer_bwd_delta: delta = rowsum(dO * O) for every (b, h, i) (any pass value).
 *   2. dq  LOCAL       (q, k, v = Q, K, V)     -> dq: every row of its tiles (non-local rows 0)
 *   3. dkdv LOCAL_BAND (Q, K, V)               -> dk, dv: every row of its tiles
 *   4. dkdv GLOBAL_COLS (Q, K, V; k_rows)      -> dk, dv: the listed key rows
 *   5. dq  GLOBAL_ROWS (Q_g, K_g, V_g; q_rows) -> dq (or dQ_g): the listed rows
 *   6. dkdv GLOBAL_ROWS (Q_g, K_g, V_g; q_rows)-> dk, dv (or dK_g, dV_g): every row of its tiles
 * Steps 4-6 only when some sequence has a global token. LSE and delta are those of the
 * row's own pass (the forward's).
 *
 * dq: outer = query tiles of BWD_BLOCK (contiguous for LOCAL, gathered q_rows for
 *   GLOBAL_ROWS), inner = contiguous key tiles of BWD_BLOCK.
 * dkdv: outer = key tiles of BWD_BLOCK (contiguous for LOCAL_BAND and GLOBAL_ROWS; gathered
 *   k_rows for GLOBAL_COLS), inner = query tiles of BWD_BLOCK (contiguous for LOCAL_BAND
 *   and GLOBAL_COLS; gathered q_rows for GLOBAL_ROWS).
 * accumulate (dkdv only): nonzero adds the result to what dk, dv hold (f32 add, one
 *   rounding to the element type) instead of overwriting them. A key row no visited pair
 *   touches gets 0 (or is left as is when accumulating).
 * Padded tokens (clarifications): their dO and O rows are not read either, so step 1 gives
 *   them delta = 0; a listed row (q_rows) or key (k_rows) that is padded takes part in no
 *   pair (dq GLOBAL_ROWS writes 0 for such a row), so the host should list only
 *   non-padded global tokens. With separate Q_g, K_g, V_g, dQ_g rows that are not listed
 *   are not written by step 5 (the caller zeroes them), nor are dK_g, dV_g when steps 4-6
 *   are skipped. */
typedef struct {
  fk_attention_base base; /* q, k, v: (B, N, H, D); lse_stride is also delta's */
  fk_longformer_common c;
  const void *o, *dout; /* (B, N, H, D) */
  const float *lse;     /* (B, H, N) f32, the forward's */
  float *delta;         /* (B, H, N) f32, same strides as lse: written by step 1 */
  void *dq, *dk, *dv;   /* (B, N, H, D) */
  fk_strides do_stride;
  fk_strides dq_stride;
  fk_strides dk_stride;
  fk_strides dv_stride;
  int32_t accumulate;
  /* Packed global keys and splits, as in the forward:
   * - dq LOCAL with k_rows (the gathered global tokens, exactly those global_mask marks):
   *   inner ids below ceil(N / BWD_BLOCK) are contiguous key tiles with LOCAL_BAND pairs,
   *   ids from ceil(N / BWD_BLOCK) on are tiles (BWD_BLOCK entries) of k_rows with
   *   GLOBAL_COLS pairs. k_rows = NULL: contiguous tiles with LOCAL pairs, as before.
   * - num_splits > 1, for dq GLOBAL_ROWS and dkdv GLOBAL_COLS only (few outer rows, long
   *   inner lists): each outer tile of each (b, h) runs as num_splits blocks, split s
   *   visiting entries [len * s / num_splits, len * (s + 1) / num_splits) of its CSR row,
   *   and writes its f32 partial sums (what the single block accumulates over those
   *   entries; the reduce applies any final scaling) to `partial`, contiguous:
   *     dq:   (num_splits, B, H, q_rows_per_seq, D)
   *     dkdv: (num_splits, B, H, k_rows_per_seq, D) for dK, then the same for dV;
   *   entry x of the gathered list at index x. A reduce kernel launched by the same call
   *   sums the splits in increasing s (deterministic) and writes the listed rows exactly
   *   as the unsplit pass would (dq: overwrite; dkdv: overwrite or add per `accumulate`).
   *   num_splits = 1: no workspace (partial may be NULL). Other passes require 1. */
  int32_t num_splits;
  float *partial;
} fk_longformer_bwd_params;

int32_t fk_longformer_bwd_delta(const fk_longformer_bwd_params *params, void *stream);
int32_t fk_longformer_bwd_dq(const fk_longformer_bwd_params *params, void *stream);
int32_t fk_longformer_bwd_dkdv(const fk_longformer_bwd_params *params, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* FK_LONGFORMER_H */
