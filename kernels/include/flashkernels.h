/* flashkernels C ABI: one parameter struct and one launcher per op family.
 *
 * Conventions (see docs/ARCHITECTURE.md):
 * - Strides are in elements, 64-bit. The last (head) dimension has unit stride.
 * - Launchers take the caller's stream, never synchronize it, and return a
 *   cudaError_t value (0 = success); fk_error_string() turns it into text.
 * - Validation happens in Rust before the call; launchers re-check only what would
 *   otherwise be undefined behaviour on the device.
 */
#ifndef FLASHKERNELS_H
#define FLASHKERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  FK_DTYPE_F16 = 1,
  FK_DTYPE_BF16 = 2,
} fk_dtype;

/* A tensor's strides, in elements. For (B, rows, H, D) tensors: batch, row, head (the
 * head dim has unit stride). For LSE-like (B, H, rows) f32 tensors: batch and head, with
 * row unused (their row stride is 1). */
typedef struct {
  int64_t batch;
  int64_t row;
  int64_t head;
} fk_strides;

/* The problem's sizes, scale, element type and device, as every attention call has them.
 * Longformer: heads_kv = heads (no GQA) and seqlen_q = seqlen_k = N. */
typedef struct {
  int32_t batch;
  int32_t heads;    /* query heads */
  int32_t heads_kv; /* key/value heads; divides heads */
  int32_t seqlen_q; /* dense varlen: the longest sequence's */
  int32_t seqlen_k;
  int32_t head_dim; /* multiple of 8; <= 256 dense, <= 128 Longformer */
  float softmax_scale; /* multiplies Q K^T */
  int32_t dtype;       /* fk_dtype */
  int32_t device;      /* CUDA device ordinal the pointers live on */
} fk_attention_shape;

/* What every attention call (dense and Longformer, forward and backward) shares: the
 * inputs Q, K, V, the strides of Q, K, V, O and LSE, and the problem's shape. The first
 * member of each attention parameter struct. */
typedef struct {
  const void *q;
  const void *k;
  const void *v;
  fk_strides q_stride;
  fk_strides k_stride;
  fk_strides v_stride;
  fk_strides o_stride;
  fk_strides lse_stride; /* batch and head only; also the backward's delta */
  fk_attention_shape shape;
} fk_attention_base;

/* Sequence layout shared by the dense attention forward and backward.
 *
 * Dense batches: Q is (B, Nq, H, D) through base.q_stride; K, V are (B, Nk, H_kv, D);
 * O (and dO, dQ) like Q; dK, dV like K. LSE (and the backward's Delta workspace) is
 * (B, H, Nq) f32 with unit row stride.
 * Variable-length batches (cu_seqlens_q != NULL): sequences are packed along the row
 * axis, Q is (total_q, H, D) and K, V are (total_k, H_kv, D); sequence b owns rows
 * [cu_seqlens_q[b], cu_seqlens_q[b+1]) of Q and [cu_seqlens_k[b], cu_seqlens_k[b+1]) of
 * K and V (int32 device arrays of B+1 offsets, validated by the caller); the batch
 * strides are then ignored, seqlen_q / seqlen_k are the longest sequence's lengths, and
 * LSE is (H, total_q): element (b, h, i) lives at h * lse_stride.head + cu_seqlens_q[b] + i.
 *
 * Masking, per sequence with lengths nq, nk and diag = nk - nq (aligned bottom-right, as
 * FlashAttention >= 2.1): query i sees key j iff
 *   j >= i + diag - window_left   (when window_left >= 0)
 *   j <= i + diag + window_right  (when window_right >= 0; causal means window_right = 0)
 * A window side of -1 is unbounded. Rows with no visible key give O = 0, LSE = -inf and
 * zero gradients.
 * GQA / MQA: H is a multiple of H_kv; query head h reads K/V head h / (H / H_kv). */
typedef struct {
  fk_attention_base base; /* q, k, v, the q, k, v, o, lse strides, the shape */
  void *o;
  float *lse;
  const int32_t *cu_seqlens_q; /* NULL for dense batches */
  const int32_t *cu_seqlens_k; /* NULL iff cu_seqlens_q is NULL */
  int32_t window_left;         /* -1 = unbounded */
  int32_t window_right;        /* -1 = unbounded; causal callers pass 0 */
  /* Varlen: the packed row counts total_q = cu_seqlens_q[B], total_k = cu_seqlens_k[B]
   * (the extent a Hopper tensor map of Q or K / V needs; ignored for dense batches). */
  int32_t total_q, total_k;
} fk_attention_fwd_params;

/* Dense attention backward (FlashAttention-2 style: scores recomputed tile by tile).
 * Inputs: Q, K, V, O, dO and LSE of the forward (same layouts as there). Outputs dQ
 * (like Q), dK, dV (like K, V; for GQA summed over each group's query heads).
 * `delta` is a workspace laid out like LSE (same strides) that receives
 * rowsum(dO * O). The result is deterministic: no atomics, every gradient row is
 * owned and summed by one thread block in a fixed order. */
typedef struct {
  fk_attention_base base; /* q, k, v, the q, k, v, o, lse (and delta) strides, the shape */
  const void *o;
  const void *dout;
  const float *lse;
  void *dq;
  void *dk;
  void *dv;
  float *delta;
  const int32_t *cu_seqlens_q;
  const int32_t *cu_seqlens_k;

  fk_strides do_stride;
  fk_strides dq_stride;
  fk_strides dk_stride;
  fk_strides dv_stride;
  int32_t window_left;
  int32_t window_right;
  int32_t total_q, total_k; /* varlen: as in fk_attention_fwd_params */
} fk_attention_bwd_params;

/* Head dims the dense kernels are compiled for (every multiple of 8 up to 256). */
int32_t fk_attention_supports_head_dim(int32_t head_dim);

/* Launch on `stream` (a cudaStream_t / CUstream; NULL = legacy default stream). */
int32_t fk_attention_fwd(const fk_attention_fwd_params *params, void *stream);
int32_t fk_attention_bwd(const fk_attention_bwd_params *params, void *stream);

/* Text for a cudaError_t value returned by a launcher. Never NULL. */
const char *fk_error_string(int32_t code);

#ifdef __cplusplus
}
#endif

#endif /* FLASHKERNELS_H */
