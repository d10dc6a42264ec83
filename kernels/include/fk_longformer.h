/* flashkernels C ABI: Longformer local-attention forward (non-global query rows).
 *
 * Conventions as in flashkernels.h (strides in elements, 64-bit, unit-stride head dim;
 * the launcher takes the caller's stream and returns a cudaError_t value).
 *
 * Per (sequence b, head h), with one-sided window w and dilation d_h, a non-global,
 * non-padded query i attends to the keys j = i + d_h * t, t in [-w, w] (t in [-w, 0] when
 * causal), that lie in [0, N) and are not padded, plus every non-padded global key (only
 * j <= i when causal); a global key inside the window counts once.
 * A padded query row gets O = 0 and LSE = -inf (also when it is marked global). Global,
 * non-padded query rows are NOT written (O and LSE keep whatever the caller put there):
 * they are a separate dense computation. An empty work list still needs a non-NULL
 * tile_ids.
 *
 * Work list: query tiles are FK_LONGFORMER_BLOCK_M rows, key tiles FK_LONGFORMER_BLOCK_N
 * keys. Heads are grouped into classes (heads of equal dilation share one); for
 * (sequence b, class c, query tile m) the kernel visits exactly the key tiles
 * tile_ids[tile_offsets[r] .. tile_offsets[r + 1]) with r = (b * num_classes + c) *
 * num_q_tiles + m, num_q_tiles = ceil(N / FK_LONGFORMER_BLOCK_M). The list must contain
 * every key tile holding an allowed (query, key) pair of a non-global row of the query
 * tile (extra tiles only cost time: the per-element rule above is applied inside every
 * visited tile; a tile listed twice would be counted twice). */
#ifndef FK_LONGFORMER_H
#define FK_LONGFORMER_H

#include <stdint.h>

#include "flashkernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FK_LONGFORMER_BLOCK_M 128 /* query rows per tile (every compiled head dim) */
#define FK_LONGFORMER_BLOCK_N 64  /* keys per tile (every compiled head dim) */

typedef struct {
  const void *q; /* (B, N, H, D) through the q strides, dtype below */
  const void *k; /* (B, N, H, D) */
  const void *v; /* (B, N, H, D) */
  void *o;       /* (B, N, H, D); global rows are left untouched */
  float *lse;    /* (B, H, N) f32, unit row stride; natural log; global rows untouched */

  int64_t q_batch_stride, q_row_stride, q_head_stride; /* elements */
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int32_t batch;    /* B >= 1 */
  int32_t seqlen;   /* N >= 0, queries and keys alike (< 2^30) */
  int32_t heads;    /* H >= 1 (no GQA) */
  int32_t head_dim; /* D: multiple of 8, <= 128 */
  int32_t window;   /* one-sided window w >= 0; values above N act as N */
  int32_t causal;   /* nonzero: t in [-w, 0] and no key after the query */
  const int32_t *dilation;     /* device, H entries, each >= 1 (values above N act as N) */
  const uint8_t *global_mask;  /* device (B, N) row-major, nonzero = global token; NULL = none */
  const uint8_t *padding_mask; /* device (B, N) row-major, nonzero = padded token; NULL = none */

  const int32_t *head_class;   /* device, H entries in [0, num_classes): CSR class of a head */
  int32_t num_classes;         /* >= 1 */
  const int32_t *tile_offsets; /* device, B * num_classes * num_q_tiles + 1 offsets into tile_ids */
  const int32_t *tile_ids;     /* device, key tile indices in [0, ceil(N / BLOCK_N)) */

  float softmax_scale; /* multiplies Q K^T */
  int32_t dtype;       /* fk_dtype */
  int32_t device;      /* CUDA device ordinal the pointers live on */
} fk_longformer_fwd_params;

/* Launch on `stream` (NULL = legacy default stream). */
int32_t fk_longformer_fwd(const fk_longformer_fwd_params *params, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* FK_LONGFORMER_H */
