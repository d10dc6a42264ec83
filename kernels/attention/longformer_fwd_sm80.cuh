// Longformer attention forward for sm_80+: the LOCAL and GLOBAL_ROWS passes of
// fk_longformer.h, one kernel.
//
// The dense forward's machinery (the building blocks of common/: traits, tile loads,
// cp.async double buffering, S = Q K^T and O += P V on tensor cores, online softmax in the
// exp2 domain) driven by a host-built work list: a thread block owns BLOCK_M query rows of
// one (sequence, head) and visits only the key tiles its CSR row lists, so the cost is
// O(N * (w + #globals)) for LOCAL and O(#globals * N) for GLOBAL_ROWS. Inside a visited
// tile every element gets the exact rule of fk_longformer.h.
//
// LOCAL: the block's rows are the contiguous tokens [m * BLOCK_M, (m + 1) * BLOCK_M); a row
// attends when local (not padded, not global) to the non-padded keys in the dilated band or
// global (causal: j <= i). Global query rows are computed masked and never stored; padded
// rows (global or not) store O = 0, LSE = -inf.
// GLOBAL_ROWS: the block's rows are gathered, row r is token q_rows[b][m * BLOCK_M + r]
// (none when -1, outside [0, N) or past per_seq); a listed row attends to every non-padded
// key (causal: j <= i). This is the LOCAL rule with the band made all-true (d = 1, reach
// N) and no global mask, so both passes share one instruction stream; a listed padded row
// attends to nothing and stores O = 0, LSE = -inf (padding wins, as in LOCAL). Only listed
// rows are stored, at their token positions.
//
// Packed global keys (LOCAL with k_rows): inner ids below nkt = ceil(N / BLOCK_N) are
// contiguous key tiles whose global keys are skipped (LOCAL_BAND), ids nkt + m are tile m of
// the gathered global keys (GLOBAL_COLS: every listed non-padded key, causal j <= i), loaded
// by token; the tile's 64 tokens are staged in shared memory (per stage), from which the
// key flags and, causal, each row's cut (the listed tokens increase, so the keys j <= i are
// a prefix: a binary search) are read. Without k_rows every id is a contiguous tile with the
// LOCAL rule, as before.
// Split over keys (GLOBAL_ROWS, num_splits > 1): grid x = outer tiles x splits (a tile's
// splits adjacent); split s visits its slice of the CSR row and writes f32 partial O
// (normalised) and LSE to the workspace; longformer_fwd_combine_kernel (launched after it
// on the same stream) merges the splits in order and writes O and LSE of the listed rows.
//
// Padded tokens' Q, K and V rows are zero-filled on load (as are rows past the sequence or
// not listed), so whatever they hold never reaches O.
#pragma once

#include "../common/launch.cuh"
#include "../common/mma_sm80.cuh"
#include "../common/tile_io.cuh"
#include "../include/fk_longformer.h"
#include "common/block_info.cuh"
#include "common/gemm.cuh"
#include "common/kernel_traits.cuh"
#include "common/mask.cuh"
#include "common/softmax.cuh"

namespace fk {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSm)
    longformer_fwd_kernel(const fk_longformer_fwd_params p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int MT = Traits::kMTiles;
  constexpr int kKSteps = D / 16;
  constexpr int kSTiles = BN / 8;
  constexpr int kOTiles = D / 8;
  static_assert(BM == FK_LONGFORMER_BLOCK_M && BN == FK_LONGFORMER_BLOCK_N,
                "the host's tile plan assumes the ABI's tile sizes");
  static_assert(2 * kSTiles <= 32, "key flags of a thread fit a 32-bit mask");
  static_assert(Traits::kNThreads >= BN, "one thread per key token of a gathered tile");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sQ = reinterpret_cast<Element *>(smem_raw);
  Element *sK = sQ + Traits::kSmemQ;
  Element *sV = sK + 2 * Traits::kSmemKV;
  int *sKTok = reinterpret_cast<int *>(sV + 2 * Traits::kSmemKV); // 2 stages x BN tokens

  // Split over keys (GLOBAL_ROWS only; the entry point checks): the splits of one outer
  // tile are adjacent blocks of the grid's x.
  const attn::LongformerWork work(p.num_splits);
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const fk_longformer_common &pc = p.c;
  const fk_attention_shape &ps = p.base.shape;
  const int n_tokens = ps.seqlen_q;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int m0 = work.outer * BM;
  const int warp_row0 = warp * Traits::kWarpRows;
  const int d_chunks = ps.head_dim / 8;
  const bool gathered = pc.pass == FK_LONGFORMER_GLOBAL_ROWS;

  // THE RULE in the form that serves both passes (common/mask.cuh): GLOBAL_ROWS is LOCAL
  // with no global mask (a "local" row is a non-padded one, no key is global) and a band
  // that holds every pair. Its masks and causal flag are kept in locals, and its tests
  // written out where the call form measured more spills at D = 128.
  const attn::LongformerRule rule =
      attn::LongformerRule::local_form(pc, n_tokens, batch, head, gathered);
  const uint8_t *glob = rule.glob, *pad = rule.pad;
  const bool causal = pc.causal != 0;

  // Token of the block's row `row` (in [0, BM)), or -1 for none: contiguous for LOCAL,
  // gathered from q_rows for GLOBAL_ROWS (-1 entries, entries outside [0, N) and entries
  // past per_seq are none).
  const int32_t *q_rows = gathered ? pc.q_rows + int64_t(batch) * pc.q_rows_per_seq + m0 : nullptr;
  const int rows_in_tile = (gathered ? pc.q_rows_per_seq : n_tokens) - m0;
  auto token_of = [&](int row) -> int {
    if (row >= rows_in_tile) return -1;
    if (!gathered) return m0 + row;
    const int tok = q_rows[row];
    return tok >= 0 && tok < n_tokens ? tok : -1;
  };

  int it_begin, it_end;
  work.entries(pc, p.num_splits, batch, head, it_begin, it_end);

  // Packed global keys (LOCAL with k_rows): inner ids >= nkt are tiles of the gathered
  // keys, key row x of gathered tile gt is token k_rows[b][gt * BN + x] (none when -1,
  // outside [0, N) or past per_seq). Without k_rows every id is a contiguous key tile.
  // (Read from the parameters where used: registers are scarce at D = 128.)
  const bool packed = !gathered && pc.k_rows != nullptr;
  auto nkt = [&] { return (ps.seqlen_q + BN - 1) / BN; };
  auto key_token = [&](int gt, int row) {
    return attn::gathered_token(pc.k_rows, pc.k_rows_per_seq, blockIdx.z, int64_t(gt) * BN + row,
                                ps.seqlen_q);
  };

  const Element *q = static_cast<const Element *>(p.base.q) + batch * p.base.q_stride.batch +
                     head * p.base.q_stride.head;
  const Element *k = static_cast<const Element *>(p.base.k) + batch * p.base.k_stride.batch +
                     head * p.base.k_stride.head;
  const Element *v = static_cast<const Element *>(p.base.v) + batch * p.base.v_stride.batch +
                     head * p.base.v_stride.head;

  auto load_kv = [&](int it, int stage) {
    const int tile = pc.tile_ids[it];
    if (packed && tile >= nkt()) { // gathered global keys, by token
      const int gt = tile - nkt();
      auto tok_of = [&](int row) { return key_token(gt, row); };
      auto key_row = [&](int row, ChunkOk chunk_ok, int &tok) {
        tok = tok_of(row);
        return tok >= 0 && chunk_ok() && (pad == nullptr || pad[tok] == 0);
      };
      // K and V in one fill: the row map (token, padding) is evaluated once per chunk.
      load_tile<Traits::kNThreads, D, BN>(
          key_row, d_chunks, tid, tile_source(sK + stage * Traits::kSmemKV, k, p.base.k_stride.row),
          tile_source(sV + stage * Traits::kSmemKV, v, p.base.v_stride.row));
      // The tile's tokens, for its flags and causal cut (read after the loop's barrier).
      if (tid < BN) sKTok[stage * BN + tid] = tok_of(tid);
      return;
    }
    // Contiguous key tile: rows past the sequence end or padded become zeros.
    const int k0 = tile * BN;
    const int rows_valid = n_tokens - k0;
    const uint8_t *tpad = pad ? pad + k0 : nullptr;
    auto key_row = [&](int row, ChunkOk chunk_ok, int &src) {
      src = row;
      return row < rows_valid && chunk_ok() && (tpad == nullptr || tpad[row] == 0);
    };
    load_tile<Traits::kNThreads, D, BN>(
        key_row, d_chunks, tid,
        tile_source(sK + stage * Traits::kSmemKV, k + int64_t(k0) * p.base.k_stride.row,
                    p.base.k_stride.row),
        tile_source(sV + stage * Traits::kSmemKV, v + int64_t(k0) * p.base.v_stride.row,
                    p.base.v_stride.row));
  };

  // Q rows: the block's tokens, zeros where none or padded.
  auto query_row = [&](int row, ChunkOk chunk_ok, int &tok) {
    tok = token_of(row);
    return tok >= 0 && chunk_ok() && (pad == nullptr || pad[tok] == 0);
  };
  load_tile<Traits::kNThreads, D, BM>(query_row, d_chunks, tid,
                                      tile_source(sQ, q, p.base.q_stride.row));
  cp_async_commit();
  if (it_begin < it_end) load_kv(it_begin, 0);
  cp_async_commit();

  // This thread's query rows: their tokens (-1: none) and which attend (LOCAL: not padded,
  // not global; GLOBAL_ROWS: not padded).
  bool row_local[MT][2];
  int row_idx[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = token_of(warp_row0 + mt * 16 + g + 8 * r);
      row_idx[mt][r] = i;
      // rule.query_ok(FK_LONGFORMER_LOCAL, i), written out.
      row_local[mt][r] = i >= 0 && !(pad && pad[i] != 0) && !(glob && glob[i] != 0);
    }

  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[Traits::kQInRegs ? kKSteps : 1][4];
  if constexpr (Traits::kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) attn::load_a<D>(qf[ks], sQ, warp_row0, ks, lane);
  }
  const auto q_src = [&] {
    if constexpr (Traits::kQInRegs)
      return attn::RegA<kKSteps>{qf};
    else
      return attn::SmemA<D, Element>{sQ, warp_row0};
  }();

  float acc[MT][kOTiles][4];
  attn::zero(acc);
  attn::OnlineSoftmax<MT> softmax;
  const float scale_log2 = ps.softmax_scale * attn::kLog2e;

  for (int it = it_begin; it < it_end; ++it) {
    const int stage = (it - it_begin) & 1;
    if (it + 1 < it_end) {
      load_kv(it + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sKs = sK + stage * Traits::kSmemKV;
    const Element *sVs = sV + stage * Traits::kSmemKV;
    const int tile = pc.tile_ids[it];

    // Flags of the 2 * kSTiles key columns this thread holds, bit 2 j + c for tile column
    // x = 8 j + 2 t + c: key_band (allowed when in the band) and key_any (allowed whatever
    // the band); the causal and row tests come in the element test below.
    const bool gtile = packed && tile >= nkt();
    uint32_t key_band = 0, key_any = 0;
    if (!gtile) {
      // Contiguous key tile, column x = token k0 + x. Without k_rows the pairs follow LOCAL
      // (band or global key), with k_rows LOCAL_BAND (global keys skipped: they are in the
      // gathered tiles).
      const int k0 = tile * BN;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = k0 + j * 8 + 2 * t + c;
          if (col < n_tokens && !rule.padded(col)) {
            const bool is_glob = rule.global(col);
            if (!packed || !is_glob) key_band |= 1u << (2 * j + c);
            if (!packed && is_glob) key_any |= 1u << (2 * j + c);
          }
        }
    } else {
      // Gathered key tile (GLOBAL_COLS): every listed non-padded key, whatever the band.
      const int *tk = sKTok + stage * BN;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int tok = tk[j * 8 + 2 * t + c];
          if (rule.key_ok(tok)) key_any |= 1u << (2 * j + c);
        }
    }

    float s[MT][kSTiles][4];
    attn::zero(s);
    attn::gemm_abt<D>(s, q_src, sKs, lane);

    // The per-element rule, on every visited tile.
    if (!gtile) {
      const int k0 = tile * BN;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >= 2 ? 1 : 0;
            const int bit = 2 * j + (e & 1);
            const int col = k0 + j * 8 + 2 * t + (e & 1);
            const int rel = col - row_idx[mt][r]; // |rel| <= N < 2^30
            const int dist = rel < 0 ? -rel : rel;
            const bool band = rule.in_band(dist);
            const bool allowed = row_local[mt][r] && !(causal && rel > 0) &&
                                 ((band && ((key_band >> bit) & 1u)) || ((key_any >> bit) & 1u));
            if (!allowed) s[mt][j][e] = -INFINITY;
          }
    } else {
      // Causal: the listed tokens increase (then -1), so the keys j <= i of row i are the
      // tile's first cut(i) columns (a binary search of the staged tokens).
      const int *tk = sKTok + stage * BN;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = row_idx[mt][r];
          int cut = BN;
          if (causal) {
            cut = 0;
#pragma unroll
            for (int step = BN; step >= 1; step /= 2)
              if (cut + step <= BN) {
                const int tok = tk[cut + step - 1];
                if (tok >= 0 && tok <= i) cut += step;
              }
          }
#pragma unroll
          for (int j = 0; j < kSTiles; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const bool allowed =
                  row_local[mt][r] && j * 8 + 2 * t + c < cut && ((key_any >> (2 * j + c)) & 1u);
              if (!allowed) s[mt][j][2 * r + c] = -INFINITY;
            }
        }
    }

    softmax.update(s, acc, scale_log2);
    attn::gemm_xb<D>(acc, s, sVs, lane);
    __syncthreads();
  }

  // Epilogue: stage O in this warp's Q rows, then 16-byte stores of the rows the pass
  // writes: LOCAL the local rows (the result) and the padded ones (zeros; padding wins over
  // global, as in the Rust rule); GLOBAL_ROWS (glob NULL) every listed row. i: a token, or -1.
  // No cp.async wait or barrier is needed first (the emulator's race check agrees): nothing
  // is in flight (the last tile waited with wait<0>; with no tile the second group is
  // empty), Q landed before the barrier after its wait, and only this warp read its rows.
  auto writes_row = [&](int i) { return i >= 0 && (rule.padded(i) || !rule.global(i)); };
  if (p.num_splits > 1) {
    const int split = blockIdx.x % p.num_splits;
    // GLOBAL_ROWS split: this split's O (normalised by its own sum, 0 without a key) and
    // LSE (-inf without a key) of every listed row, f32, to the workspace at the row's
    // entry index x; the combine kernel writes O and LSE.
    const int64_t ws_row0 =
        ((int64_t(split) * ps.batch + batch) * ps.heads + head) * pc.q_rows_per_seq + m0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float lse;
        const float inv_sum = softmax.finalize(mt, r, lse);
        const int row = warp_row0 + mt * 16 + g + 8 * r;
        if (row_idx[mt][r] < 0) continue;
        float *po = p.partial_o + (ws_row0 + row) * ps.head_dim;
#pragma unroll
        for (int i = 0; i < kOTiles; ++i)
          if (i * 8 < ps.head_dim) {
            po[i * 8 + 2 * t] = acc[mt][i][2 * r] * inv_sum;
            po[i * 8 + 2 * t + 1] = acc[mt][i][2 * r + 1] * inv_sum;
          }
        if (t == 0) p.partial_lse[ws_row0 + row] = lse;
      }
    return;
  }
  Element *sO = sQ;
  float lse[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float inv_sum = softmax.finalize(mt, r, lse[mt][r]);
      stage_row<D>(sO, warp_row0 + mt * 16 + g + 8 * r, acc[mt], r, inv_sum, t);
    }
  __syncwarp();

  Element *o =
      static_cast<Element *>(p.o) + batch * p.base.o_stride.batch + head * p.base.o_stride.head;
  store_rows<D, Traits::kWarpRows>(
      o, p.base.o_stride.row, sO, warp_row0,
      [&](int row, ChunkOk chunk_ok, int &tok) {
        tok = token_of(row);
        return chunk_ok() && writes_row(tok);
      },
      d_chunks, lane);
  if (t == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int grow = row_idx[mt][r];
        if (writes_row(grow))
          p.lse[batch * p.base.lse_stride.batch + head * p.base.lse_stride.head + grow] =
              lse[mt][r];
      }
  }
}

// Combine of the GLOBAL_ROWS splits: one warp per (b, h, entry x) of q_rows, listed entries
// only; O = sum_s exp(lse_s - lse) O_s, LSE = log sum_s exp(lse_s), splits in increasing s
// (deterministic). Splits without a key (lse_s = -inf) are not read; a row none of whose
// splits saw a key gets O = 0, LSE = -inf.
template <typename Element>
__global__ void longformer_fwd_combine_kernel(const fk_longformer_fwd_params p) {
  using ET = ElemTraits<Element>;
  const fk_longformer_common &pc = p.c;
  const fk_attention_shape &ps = p.base.shape;
  const int64_t per_split = int64_t(ps.batch) * ps.heads * pc.q_rows_per_seq;
  const int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (w >= per_split) return;
  const int lane = threadIdx.x % 32;
  const int x = int(w % pc.q_rows_per_seq);
  const int head = int(w / pc.q_rows_per_seq % ps.heads);
  const int batch = int(w / pc.q_rows_per_seq / ps.heads);
  const int tok = pc.q_rows[int64_t(batch) * pc.q_rows_per_seq + x];
  if (tok < 0 || tok >= ps.seqlen_q) return;
  const int S = p.num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < S; ++s) mx = fmaxf(mx, p.partial_lse[s * per_split + w]);
  float lse = -INFINITY;
  if (mx != -INFINITY) {
    float sum = 0.f;
    for (int s = 0; s < S; ++s) {
      const float ls = p.partial_lse[s * per_split + w];
      if (ls != -INFINITY) sum += expf(ls - mx);
    }
    lse = mx + logf(sum);
  }
  Element *o = static_cast<Element *>(p.o) + batch * p.base.o_stride.batch +
               int64_t(tok) * p.base.o_stride.row + head * p.base.o_stride.head;
  for (int d = 2 * lane; d < ps.head_dim; d += 64) {
    float a0 = 0.f, a1 = 0.f;
    if (lse != -INFINITY)
      for (int s = 0; s < S; ++s) {
        const float ls = p.partial_lse[s * per_split + w];
        if (ls == -INFINITY) continue;
        const float wgt = expf(ls - lse);
        const float *po = p.partial_o + (s * per_split + w) * ps.head_dim + d;
        a0 = fmaf(wgt, po[0], a0);
        a1 = fmaf(wgt, po[1], a1);
      }
    *reinterpret_cast<uint32_t *>(o + d) = ET::pack(a0, a1);
  }
  if (lane == 0) p.lse[batch * p.base.lse_stride.batch + head * p.base.lse_stride.head + tok] = lse;
}

// Tile configurations: 128 x 64 at both head dims (the ABI's BLOCK_M x BLOCK_N). D=128 is
// the dense forward's; at D=64 the dense choice (two m-tiles per warp, 2 blocks per SM)
// spills here (255 registers: the mask state is extra), so one m-tile per warp, 8 warps,
// Q in registers, as at D=128.
template <int kHeadDim> struct LongformerFwdConfigSm80;
template <> struct LongformerFwdConfigSm80<64> {
  static constexpr int kMTiles = 1, kNWarps = 8, kBlockN = 64, kMinBlocksPerSm = 1;
  static constexpr bool kQInRegs = true;
};
template <> struct LongformerFwdConfigSm80<128> {
  static constexpr int kMTiles = 1, kNWarps = 8, kBlockN = 64, kMinBlocksPerSm = 1;
  static constexpr bool kQInRegs = true;
};

template <int kHeadDim, typename Element>
cudaError_t run_longformer_fwd_sm80(const fk_longformer_fwd_params &p, cudaStream_t stream) {
  using C = LongformerFwdConfigSm80<kHeadDim>;
  using Traits = AttnFwdTraitsSm80<kHeadDim, Element, C::kMTiles, C::kNWarps, C::kBlockN,
                                   C::kMinBlocksPerSm, C::kQInRegs>;
  // Outer tiles: contiguous query tiles of N (LOCAL) or gathered tiles of q_rows.
  const int outer_rows =
      p.c.pass == FK_LONGFORMER_GLOBAL_ROWS ? p.c.q_rows_per_seq : p.base.shape.seqlen_q;
  // Split over keys: the splits of an outer tile are adjacent in x (entry point: x fits).
  const int num_splits = p.num_splits > 1 ? p.num_splits : 1;
  const int outer_tiles = (outer_rows + Traits::kBlockM - 1) / Traits::kBlockM;
  const dim3 grid(unsigned(outer_tiles) * unsigned(num_splits), p.base.shape.heads,
                  p.base.shape.batch);
  // + the key tokens of gathered key tiles (two stages).
  const size_t smem = Traits::kSmemBytes + 2 * Traits::kBlockN * sizeof(int);
  cudaError_t err =
      launch_kernel(longformer_fwd_kernel<Traits>, grid, dim3(Traits::kNThreads), smem, stream, p);
  if (err != cudaSuccess || num_splits == 1) return err;
  constexpr int kCombineWarps = 4;
  const int64_t rows = int64_t(p.base.shape.batch) * p.base.shape.heads * p.c.q_rows_per_seq;
  const dim3 cgrid(unsigned((rows + kCombineWarps - 1) / kCombineWarps));
  return launch_kernel(longformer_fwd_combine_kernel<Element>, cgrid, dim3(32 * kCombineWarps), 0,
                       stream, p);
}

} // namespace fk
