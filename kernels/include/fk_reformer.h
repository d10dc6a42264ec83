/* flashkernels C ABI, Reformer LSH self-attention (issue 16), forward: hashing, one stable
 * sort of the concatenated rounds, chunked attention with circular look-back, the round
 * combination and the unsort, all on the device, with Hugging Face's LSHSelfAttention
 * semantics (rust/ops/reformer/mod.rs pins them; its CPU reference is the definition).
 * Work and memory grow as n_hashes * N * (chunks_before + 1 + chunks_after) * C, never N^2.
 *
 * For every batch b and head h (R = n_hashes, nb = n_buckets, C = chunk_length, N = seqlen):
 *
 * Hashed (N > C; N must be a multiple of C):
 *   - buckets: unless given, bucket[b, h, r, i] = first argmax over k of [x R_r ; -x R_r]
 *     (x = qk[b, i, h, :] as stored, R_r = rotations[h, :, r, :], f32 sums over d in
 *     order) + r * nb'; nb' = nb, or nb + 1 when any token of the whole batch is padded,
 *     and then padded tokens take the bucket nb in every round (HF's offsets). Hashed
 *     buckets are written to `buckets`.
 *   - order: the R * N positions p = r N + i are sorted stably by bucket; since round r's
 *     values lie in [r nb', (r + 1) nb'), sorted position s belongs to round s / N.
 *   - chunks of C over the sorted order; the query at sorted position s (chunk c) attends
 *     to the keys of chunks c - chunks_before ..= c + chunks_after, circularly over all
 *     R N / C chunks (a chunk reached twice counts twice).
 *   - score(i, j) = qk_i . k_j, k_j = qk_j (mean(qk_j^2) + 1e-6)^(-1/2) / sqrt(D) (computed
 *     as qk_j / sqrt(sum(qk_j^2) + 1e-6 D)); REPLACED by the mask value when causal and
 *     j > i, or key j is padded; then by the self value when j == i (token positions).
 *     (mask, self) = (-1e4, -1e3) for f16, (-1e9, -1e5) for bf16 (HF's values).
 *   - per round: lse[b, h, r, i] = logsumexp of the query's scores, o_r its softmax-weighted
 *     v; out[b, i, h] = sum_r exp(lse_r - logsumexp_r lse_r) o_r (f32, rounded once).
 * Full-attention fallback (N <= C): every query attends to all N keys with the same masks,
 *   no hashing, no sort; lse has one round; `buckets` and `rotations` are not used.
 *
 * Layouts: qk, v, out (B, N, H, D) through their fk_strides (batch, row, head), head dim
 * unit stride. rotations (H, D, R, nb / 2) f32, contiguous (the host converts). key_padding
 * (B, N) uint8, 1 = padded, row stride N, or NULL (no padding). given_buckets and buckets
 * (B, H, R, N) int32 contiguous; lse (B, H, rounds, N) f32 contiguous, rounds = R (hashed)
 * or 1 (fallback). Outputs must not overlap inputs or each other. Padded tokens' rows are
 * read (they are queries, and hashed) and must be finite.
 *
 * Refused (cudaErrorInvalidValue, nothing launched): a required pointer NULL (qk, v, out,
 * lse; hashed without given buckets: rotations and buckets); batch, seqlen, heads, n_hashes,
 * chunk_length < 1; head_dim not in [1, 128]; n_buckets odd or not in [2, 8192];
 * chunks_before, chunks_after not in [0, 65535]; causal not 0 / 1; dtype not F16 / BF16;
 * hashed with N not a multiple of C; given_buckets with N <= C; a workspace that is needed
 * and NULL or not 256-byte aligned; batch, heads > 65535 (grid z, y);
 * n_hashes * seqlen > 2^31 - 1.
 * NOT checked (the host must): given buckets' values (round r's in [r nb', (r + 1) nb'),
 * nb' as above): out-of-range values are clamped into their round's range, which keeps
 * every access in bounds but gives meaningless outputs; finite inputs.
 * Deterministic (no atomics): the same inputs give bitwise the same outputs.
 * Conventions as in flashkernels.h: the launcher takes the caller's stream, never
 * synchronizes, returns a cudaError_t (0 = success). */
#ifndef FK_REFORMER_H
#define FK_REFORMER_H

#include <stdint.h>

#include "flashkernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void *qk;               /* (B, N, H, D) */
  const void *v;                /* (B, N, H, D) */
  const float *rotations;       /* (H, D, n_hashes, n_buckets / 2) f32; see above */
  const uint8_t *key_padding;   /* (B, N), 1 = padded; or NULL */
  const int32_t *given_buckets; /* (B, H, n_hashes, N), offset per round; or NULL (hash) */
  void *out;                    /* (B, N, H, D) */
  float *lse;                   /* (B, H, rounds, N) */
  int32_t *buckets;             /* (B, H, n_hashes, N): written when hashed here; else unused */
  void *workspace; /* fk_reformer_fwd_workspace_bytes() bytes, 256-byte aligned; NULL when
                      that is 0 */
  fk_strides qk_stride, v_stride, out_stride;
  int32_t batch, seqlen, heads, head_dim;
  int32_t n_hashes, n_buckets;
  int32_t chunk_length, chunks_before, chunks_after;
  int32_t causal; /* 0 / 1 */
  int32_t dtype;  /* FK_DTYPE_F16 or FK_DTYPE_BF16 */
  int32_t device;
} fk_reformer_fwd_params;

/* Workspace of the forward, each part 256-byte aligned: hashed calls hold the sorted order
 * (B H n_hashes N int32), the sort's sorted segments (B H n_hashes N uint32) and per-segment
 * bucket counts (B H n_hashes (n_buckets + 1) ceil(N / 1024) int32) and, with key_padding, a
 * padding flag (256 bytes); calls with n_hashes > 1 (hashed) the per-round outputs
 * (B H n_hashes N D f32). 0 for the fallback (N <= C) and when the arguments are refused. */
int64_t fk_reformer_fwd_workspace_bytes(const fk_reformer_fwd_params *params);
int32_t fk_reformer_fwd(const fk_reformer_fwd_params *params, void *stream);

/* Backward (issue 16 item 3): gradients with respect to qk and v, the buckets held fixed
 * (as in training: the forward's buckets are given back), from the forward's out and
 * per-round lse. With L_i = logsumexp_r lse[b, h, r, i] the rounds form one softmax over
 * the union of their windows, P_ij = exp(score_ij - L_i) (a key reached in several rounds
 * or several window slots counts each time), Delta_i = rowsum(dO_i o out_i) (out as
 * stored), and
 *   dv_j  = sum_i P_ij dO_i                       (masked keys take their share too)
 *   dS_ij = P_ij (dO_i . v_j - Delta_i)           (0 where the score was replaced: the
 *                                                  mask and self values are constants)
 *   dqk_i = sum_j dS_ij k_j                       (the query)
 *         + J_i^T sum_j dS_ji qk_j                (the key, through k = qk g / sqrt(D),
 *                                                  g = (mean(qk^2) + 1e-6)^(-1/2))
 * The order, window and masks are the forward's (above): the backward re-runs the stable
 * sort of the given buckets. N <= C: full attention, one round, no buckets.
 *
 * Layouts: qk, v, out, dout, dqk, dv (B, N, H, D) through their fk_strides, head dim unit
 * stride; lse (B, H, rounds, N) f32 contiguous (the forward's); key_padding as the
 * forward's; buckets (B, H, n_hashes, N) int32 contiguous, round-offset (the forward's
 * output or given buckets). dqk and dv are written in the storage dtype, each element
 * rounded once from f32; they must not overlap the inputs or each other.
 *
 * Refused (cudaErrorInvalidValue, nothing launched): a required pointer NULL (qk, v, out,
 * dout, lse, dqk, dv; buckets when hashed); the forward's size, option and dtype checks;
 * hashed with N not a multiple of C; buckets with N <= C; a workspace that is needed and
 * NULL or not 256-byte aligned.
 * NOT checked (the host must): the buckets' values (out-of-range ones are clamped into
 * their round's range, as in the forward: in bounds, meaningless); that lse and out are
 * the forward's for these inputs (an lse below a query's scores overflows); finite inputs.
 * Deterministic (no atomics): each gradient row is summed in a fixed order. */
typedef struct {
  const void *qk;             /* (B, N, H, D) */
  const void *v;              /* (B, N, H, D) */
  const void *out;            /* (B, N, H, D): the forward's output */
  const void *dout;           /* (B, N, H, D) */
  const float *lse;           /* (B, H, rounds, N): the forward's per-round lse */
  const uint8_t *key_padding; /* (B, N), 1 = padded; or NULL */
  const int32_t *buckets;     /* (B, H, n_hashes, N): required when hashed; NULL otherwise */
  void *dqk;                  /* (B, N, H, D) */
  void *dv;                   /* (B, N, H, D) */
  void *workspace; /* fk_reformer_bwd_workspace_bytes() bytes, 256-byte aligned */
  fk_strides qk_stride, v_stride, out_stride, dout_stride, dqk_stride, dv_stride;
  int32_t batch, seqlen, heads, head_dim;
  int32_t n_hashes, n_buckets;
  int32_t chunk_length, chunks_before, chunks_after;
  int32_t causal; /* 0 / 1 */
  int32_t dtype;  /* FK_DTYPE_F16 or FK_DTYPE_BF16 */
  int32_t device;
} fk_reformer_bwd_params;

/* Workspace of the backward, each part 256-byte aligned: hashed calls the padding flag
 * (with key_padding, 256 bytes), the sorted order and the sort's parts (as the forward's);
 * every call Delta (B H N f32), the rounds' weights exp(lse_r - L) (B H rounds N f32) and
 * the per-round partial gradients dq, dk (of the normalised keys) and dv (3 x B H rounds N D
 * f32). 0 when the arguments are refused. */
int64_t fk_reformer_bwd_workspace_bytes(const fk_reformer_bwd_params *params);
int32_t fk_reformer_bwd(const fk_reformer_bwd_params *params, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* FK_REFORMER_H */
