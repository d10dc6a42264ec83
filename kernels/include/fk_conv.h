/* flashkernels C ABI, convolution family: conv2d (forward, backward) through a
 * tensor-core GEMM core (im2col or implicit GEMM), and 2-D max / average pooling.
 * Conventions as in flashkernels.h: strides in elements (64-bit), launchers take the
 * caller's stream, never synchronize, return a cudaError_t (0 = success); validation
 * happens in Rust before the call.
 *
 * Logical layouts (memory order is given by the strides, so NCHW and NHWC — torch's
 * channels_last — are the same call):
 *   x (N, C, H, W), weight (K, C / groups, R, S), bias (K), y (N, K, P, Q), with
 *   P = (H + 2 pad_h - dil_h (R - 1) - 1) / stride_h + 1 and Q likewise (floor).
 * Convolution is cross-correlation, as torch.nn.functional.conv2d. */
#ifndef FK_CONV_H
#define FK_CONV_H

#include <stdint.h>

#include "flashkernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The f32 dtype value of this family (flashkernels.h's fk_dtype stops at bf16). */
#define FK_DTYPE_F32 3

/* Activation fused into the GEMM epilogue. GELU is the exact (erf) form, torch's
 * default; SiLU is x * sigmoid(x). */
typedef enum {
  FK_ACT_NONE = 0,
  FK_ACT_RELU = 1,
  FK_ACT_GELU = 2,
  FK_ACT_SILU = 3,
} fk_activation;

typedef enum {
  FK_CONV_ALGO_IM2COL = 1,        /* im2col into the workspace, then the GEMM */
  FK_CONV_ALGO_IMPLICIT_GEMM = 2, /* im2col tiles built in shared memory only */
} fk_conv_algo;

/* Geometry shared by every conv2d call. */
typedef struct {
  int32_t n, c, h, w;  /* input */
  int32_t k, r, s;     /* output channels, filter height, width */
  int32_t p, q;        /* output height, width */
  int32_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int32_t groups;      /* divides c and k */
} fk_conv2d_shape;

/* y = act(conv(x, weight) + bias). `y_pre` (optional, NULL = not wanted) receives
 * conv + bias before the activation, laid out with y's strides: what the backward of a
 * fused activation needs. dtype: f16 / bf16 (f32 accumulation) or FK_DTYPE_F32. */
typedef struct {
  const void *x;
  const void *weight;
  const void *bias; /* (K) contiguous, same dtype, or NULL */
  void *y;
  void *y_pre;
  void *workspace; /* fk_conv2d_workspace_bytes() bytes, 256-byte aligned, or NULL if 0 */
  int64_t x_strides[4]; /* n, c, h, w */
  int64_t w_strides[4]; /* k, c, r, s */
  int64_t y_strides[4]; /* n, k, p, q */
  fk_conv2d_shape shape;
  int32_t activation; /* fk_activation */
  int32_t algo;       /* fk_conv_algo */
  int32_t dtype;      /* fk_dtype */
  int32_t device;
} fk_conv2d_params;

/* Whether `algo` can run this call (dtype, channel alignment, strides); 1 or 0. The
 * pointers are not read. */
int32_t fk_conv2d_supports(const fk_conv2d_params *params);
/* Workspace the forward needs with params->algo (0 for the implicit GEMM). */
int64_t fk_conv2d_workspace_bytes(const fk_conv2d_params *params);
int32_t fk_conv2d_fwd(const fk_conv2d_params *params, void *stream);

/* Backward of the convolution (before any activation: `dy` is the gradient with
 * respect to conv + bias). Each output may be NULL when not wanted: dx (like x's
 * logical shape, dx_strides), dweight (like weight, dw_strides), dbias (K, contiguous).
 * Every element of each requested output is written (no accumulation into it). */
typedef struct {
  const void *x;
  const void *weight;
  const void *dy;
  void *dx;
  void *dweight;
  void *dbias;
  void *workspace; /* fk_conv2d_bwd_workspace_bytes() bytes, 256-byte aligned */
  int64_t x_strides[4];
  int64_t w_strides[4];
  int64_t dy_strides[4];
  int64_t dx_strides[4];
  int64_t dw_strides[4];
  fk_conv2d_shape shape;
  int32_t algo; /* implicit GEMM: dx without col2im (and its f32 workspace) at stride 1;
                   dweight goes through an im2col workspace with either algo */
  int32_t dtype;
  int32_t device;
} fk_conv2d_bwd_params;

int32_t fk_conv2d_bwd_supports(const fk_conv2d_bwd_params *params);
/* Depends on which of dx / dweight are requested (NULL or not); pointers are not read. */
int64_t fk_conv2d_bwd_workspace_bytes(const fk_conv2d_bwd_params *params);
int32_t fk_conv2d_bwd(const fk_conv2d_bwd_params *params, void *stream);

typedef enum {
  FK_POOL_MAX = 1,
  FK_POOL_AVG = 2,
} fk_pool_kind;

/* 2-D pooling, torch's max_pool2d / avg_pool2d semantics: x (N, C, H, W) -> y (N, C, P, Q)
 * with P, Q computed by the caller (ceil_mode included); windows start at
 * p * stride_h - pad_h. Max pooling skips padding (and windows lying wholly in padding
 * cannot occur with torch's constraints: pad <= kernel / 2) and records in `indices`
 * (int32, y's logical shape, contiguous; required for FK_POOL_MAX) the argmax as
 * h * W + w within the (n, c) plane, the first maximum on ties, as torch. Average
 * pooling divides by the window's size clipped to the padded input
 * (count_include_pad = 1) or to the real input (0), or by `divisor` when > 0. */
typedef struct {
  const void *x;
  void *y;
  int32_t *indices;
  int64_t x_strides[4];
  int64_t y_strides[4];
  int32_t n, c, h, w, p, q;
  int32_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int32_t count_include_pad;
  int32_t divisor;
  int32_t kind;  /* fk_pool_kind */
  int32_t dtype; /* f16, bf16 or f32 */
  int32_t device;
} fk_pool2d_params;

int32_t fk_pool2d_fwd(const fk_pool2d_params *params, void *stream);

/* dx from dy: max pooling scatters dy to the recorded indices (summing where windows
 * overlap), average pooling spreads it evenly. dx is fully written. The geometry and
 * strides (x_strides = dx's, y_strides = dy's) are those of the forward call. */
typedef struct {
  const void *dy;
  const int32_t *indices;
  void *dx;
  fk_pool2d_params fwd; /* the forward's parameters; its x / y / indices pointers unused */
} fk_pool2d_bwd_params;

int32_t fk_pool2d_bwd(const fk_pool2d_bwd_params *params, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* FK_CONV_H */
