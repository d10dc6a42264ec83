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

/* Dense scaled-dot-product attention forward.
 * Q: (B, Nq, H, D) through the strides below; K, V: (B, Nk, H, D); O like Q;
 * LSE: (B, H, Nq) f32 with unit row stride. Causal masking is aligned bottom-right:
 * query i sees keys j <= i + Nk - Nq. Rows with no visible key give O = 0 and
 * LSE = -inf. */
typedef struct {
  const void *q;
  const void *k;
  const void *v;
  void *o;
  float *lse;

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int32_t batch;
  int32_t heads;
  int32_t seqlen_q;
  int32_t seqlen_k;
  int32_t head_dim;
  float softmax_scale;
  int32_t causal;
  int32_t dtype; /* fk_dtype */
  int32_t device; /* CUDA device ordinal the pointers live on */
} fk_attention_fwd_params;

/* Head dims the dense forward kernel is compiled for. */
int32_t fk_attention_fwd_supports_head_dim(int32_t head_dim);

/* Launches on `stream` (a cudaStream_t / CUstream; NULL = legacy default stream). */
int32_t fk_attention_fwd(const fk_attention_fwd_params *params, void *stream);

/* Text for a cudaError_t value returned by a launcher. Never NULL. */
const char *fk_error_string(int32_t code);

#ifdef __cplusplus
}
#endif

#endif /* FLASHKERNELS_H */
