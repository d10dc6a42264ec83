/* flashkernels C ABI, Linformer's sequence projection (issue 15), forward and backward:
 *   O = softmax(scale Q (E K)^T) (F V),   E, F (k_proj x n_max), per K/V head or shared.
 * These entries compute only the projections; the attention over the k_proj projected
 * keys is the dense attention kernels' (flashkernels.h) on kp / vp, unchanged.
 *
 * Forward, for every batch b < batch and K/V head h < heads_kv:
 *   kp[b, :, h, :] = E_he[:, :N] K~[b, :, h, :]      (k_proj x head_dim)
 *   vp[b, :, h, :] = F_hf[:, :N] V~[b, :, h, :]
 * N = seqlen; K~ / V~ are K / V with the rows of padded keys (key_padding[b, j] != 0)
 * taken as zero (never read); he = h when e_heads == heads_kv, 0 when e_heads == 1
 * (headwise sharing); hf likewise with f_heads. f may equal e (key-value sharing).
 * The reduction over N runs in `splits` ranges of whole 64-position blocks (split s covers
 * positions [s c, min(N, (s + 1) c)), c = 64 ceil(ceil(N / 64) / splits); ranges that
 * would be empty are not run), each summed in f32 into the workspace, then added in the
 * order s = 0, 1, ... and rounded once to the storage dtype; splits == 1 rounds the f32
 * accumulator directly (no workspace).
 * Deterministic (no atomics): the same inputs and splits give bitwise the same outputs;
 * a different `splits` may differ in rounding.
 *
 * Backward, given dkp, dvp (batch, k_proj, heads_kv, head_dim): the projected problem's
 * dK, dV from the dense attention backward:
 *   dK[b, :, h, :] = E_he[:, :N]^T dkp[b, :, h, :]    (N x head_dim; rows of padded keys
 *   dV[b, :, h, :] = F_hf[:, :N]^T dvp[b, :, h, :]     are written as 0)
 *   dE[he] = sum over b and the heads h using he of dkp[b, :, h, :] K~[b, :, h, :]^T
 *   dF[hf] = the same with dvp and V~
 * dE, dF are (k_proj x n_max): columns >= N, and columns padded in every batch, are 0.
 * shared_kv = 1 (F is E: f must equal e, with the same strides and heads; df NULL):
 *   dE[he] = sum dkp K~^T + sum dvp V~^T   (the two sums are one reduction), dF not written.
 * Every element of dk, dv, de, df is written exactly once, rounded once from f32; no
 * atomics (the sum over batches and heads is the GEMMs' reduction dimension).
 *
 * Layouts: k, v, kp, vp, dkp, dvp, dk, dv are (B, rows, H_kv, D) through their fk_strides
 * (batch, row, head), head dim unit stride. e, f, de, df are (heads, k_proj, n_max)
 * through (head, row, col) int64 strides, any values (a transposed view of E works; the
 * 16-byte loads are used where the strides allow). key_padding is (batch, seqlen) uint8,
 * row stride seqlen, or NULL (no padding). Outputs must not overlap inputs or each other.
 *
 * Refused (cudaErrorInvalidValue, nothing launched): a required pointer NULL; batch,
 * heads_kv, seqlen, k_proj < 1; seqlen > n_max; head_dim not a multiple of 8 in [8, 256];
 * e_heads / f_heads not 1 or heads_kv; splits < 1 or > ceil(seqlen / 64); dtype not
 * F16 / BF16; shared_kv not 0 / 1 (or, when 1: f != e, different strides or heads, df not
 * NULL); a workspace that is needed and NULL or not 256-byte aligned; the 32-bit limits:
 *   forward  batch * heads_kv * splits <= 65535        (grid z)
 *   backward batch * heads_kv <= 65535                   (grid z of dK, dV)
 *            n_max <= 65535 * 64                         (grid y of dE, dF)
 *            (shared_kv ? 2 : 1) * batch * (heads_kv / e_heads) * head_dim <= 2^31 - 256
 *                                                        (the dE reduction's columns)
 *   both     seqlen, n_max, k_proj <= 2^31 - 256         (row / column indices of tiles)
 * Conventions as in flashkernels.h: the launchers take the caller's stream, never
 * synchronize, return a cudaError_t (0 = success). */
#ifndef FK_LINFORMER_H
#define FK_LINFORMER_H

#include <stdint.h>

#include "flashkernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* (head, row, col) strides of a projection matrix E / F (or their gradients), elements. */
typedef struct {
  int64_t head;
  int64_t row;
  int64_t col;
} fk_proj_strides;

typedef struct {
  const void *k; /* (B, N, H_kv, D) */
  const void *v;
  const void *e; /* (e_heads, k_proj, n_max) */
  const void *f; /* (f_heads, k_proj, n_max); may equal e */
  const uint8_t *key_padding; /* (B, N), 1 = padded; or NULL */
  void *kp;                   /* (B, k_proj, H_kv, D) */
  void *vp;
  void *workspace; /* fk_linformer_proj_workspace_bytes() bytes, 256-byte aligned; NULL
                      when that is 0 (splits == 1) */
  fk_strides k_stride, v_stride, kp_stride, vp_stride;
  fk_proj_strides e_stride, f_stride;
  int32_t batch, seqlen, heads_kv, head_dim, k_proj, n_max;
  int32_t e_heads, f_heads; /* 1 or heads_kv each */
  int32_t splits;           /* >= 1: ranges of the reduction over N (see the top) */
  int32_t dtype;            /* FK_DTYPE_F16 or FK_DTYPE_BF16 */
  int32_t device;
} fk_linformer_proj_params;

/* Workspace of the forward: 2 * batch * heads_kv * splits * k_proj * head_dim f32 partials
 * (each half 256-byte aligned) when splits > 1; 0 when splits == 1 or the arguments are
 * refused. */
int64_t fk_linformer_proj_workspace_bytes(const fk_linformer_proj_params *params);
int32_t fk_linformer_proj_fwd(const fk_linformer_proj_params *params, void *stream);

typedef struct {
  const void *k;
  const void *v;
  const void *e;
  const void *f;
  const uint8_t *key_padding;
  const void *dkp; /* (B, k_proj, H_kv, D) */
  const void *dvp;
  void *dk; /* (B, N, H_kv, D) */
  void *dv;
  void *de;        /* (e_heads, k_proj, n_max) */
  void *df;        /* (f_heads, k_proj, n_max); NULL when shared_kv */
  void *workspace; /* fk_linformer_proj_bwd_workspace_bytes() bytes (0 today: may be NULL) */
  fk_strides k_stride, v_stride, dkp_stride, dvp_stride, dk_stride, dv_stride;
  fk_proj_strides e_stride, f_stride, de_stride, df_stride;
  int32_t shared_kv; /* 1: F is E (see the top) */
  int32_t batch, seqlen, heads_kv, head_dim, k_proj, n_max;
  int32_t e_heads, f_heads;
  int32_t dtype;
  int32_t device;
} fk_linformer_proj_bwd_params;

/* Workspace of the backward: 0 (no GEMM of the backward splits its reduction today; the
 * entry point exists so that one can without an ABI change). */
int64_t fk_linformer_proj_bwd_workspace_bytes(const fk_linformer_proj_bwd_params *params);
int32_t fk_linformer_proj_bwd(const fk_linformer_proj_bwd_params *params, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* FK_LINFORMER_H */
