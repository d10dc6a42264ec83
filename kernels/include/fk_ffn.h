/* flashkernels C ABI, fused feed-forward block (issue 14), forward and backward:
 *   h = act(x W1^T + b1)                      (plain)
 *   h = act(x W1^T + b1) * (x W3^T + b3)      (gated: SwiGLU with SiLU, GeGLU with GELU)
 *   y = h W2^T + b2 (+ x)
 * x (tokens, d_model), W1 / W3 (d_hidden, d_model), W2 (d_model, d_hidden) as nn.Linear
 * stores them; every matrix row-major with any row stride (in elements) and unit column
 * stride; biases contiguous or NULL. f16 / bf16 storage, f32 accumulation; h is written
 * once in the storage dtype by the first GEMM's epilogue and read once by the second.
 * Conventions as in flashkernels.h: the launcher takes the caller's stream, never
 * synchronizes, returns a cudaError_t (0 = success); validation happens in Rust first, and
 * the C entry refuses (cudaErrorInvalidValue, nothing launched) what would be undefined on
 * the device. */
#ifndef FK_FFN_H
#define FK_FFN_H

#include <stdint.h>

#include "flashkernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The hidden activation. GELU_ERF is torch's default GELU, GELU_TANH its
 * approximate="tanh"; SILU is x * sigmoid(x). */
typedef enum {
  FK_FFN_RELU = 1,
  FK_FFN_GELU_TANH = 2,
  FK_FFN_GELU_ERF = 3,
  FK_FFN_SILU = 4,
} fk_ffn_activation;

/* Forward. tokens >= 0 (0: nothing is launched); d_model and d_hidden positive multiples
 * of 8; each row stride at least its row's width. `h` (tokens, d_hidden, row stride
 * h_stride) receives the hidden activation and is required (it is the two GEMMs' link,
 * and what a backward reads); y (tokens, d_model) must not overlap x, h or the weights.
 * w3 == NULL: not gated (b3 must then be NULL too). */
typedef struct {
  const void *x;
  const void *w1;
  const void *w2;
  const void *w3;
  const void *b1; /* (d_hidden) or NULL */
  const void *b2; /* (d_model) or NULL */
  const void *b3; /* (d_hidden) or NULL */
  void *h;
  void *y;
  int64_t x_stride, w1_stride, w2_stride, w3_stride, h_stride, y_stride;
  int32_t tokens, d_model, d_hidden;
  int32_t activation; /* fk_ffn_activation */
  int32_t residual;   /* 1: y += x */
  int32_t dtype;      /* FK_DTYPE_F16 or FK_DTYPE_BF16 */
  int32_t device;
} fk_ffn_params;

int32_t fk_ffn_fwd(const fk_ffn_params *params, void *stream);

/* Backward: every gradient of the forward's inputs, given dy (tokens, d_model). Only the
 * forward's inputs are read (u, g and h are recomputed into the workspace); b1 / b3 as in
 * the forward (they enter the recomputation). dx, dw1, dw2 (and dw3 when gated) are
 * required, row-major with the given row strides; db1, db2, db3 (contiguous) may be NULL
 * (not wanted; db3 only when gated). Every element of each requested output is written.
 * tokens >= 1. Deterministic: no atomics, each output summed in a fixed order. */
typedef struct {
  const void *x;
  const void *w1;
  const void *w2;
  const void *w3;
  const void *b1;
  const void *b3;
  const void *dy;
  void *dx;
  void *dw1;
  void *dw2;
  void *dw3;
  void *db1;
  void *db2;
  void *db3;
  void *workspace; /* fk_ffn_bwd_workspace_bytes() bytes, 256-byte aligned */
  int64_t x_stride, w1_stride, w2_stride, w3_stride, dy_stride;
  int64_t dx_stride, dw1_stride, dw2_stride, dw3_stride;
  int32_t tokens, d_model, d_hidden;
  int32_t activation;
  int32_t residual;
  int32_t dtype;
  int32_t device;
} fk_ffn_bwd_params;

/* Workspace the backward needs (0 for arguments it refuses). */
int64_t fk_ffn_bwd_workspace_bytes(const fk_ffn_bwd_params *params);
int32_t fk_ffn_bwd(const fk_ffn_bwd_params *params, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* FK_FFN_H */
