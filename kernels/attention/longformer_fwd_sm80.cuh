// Longformer attention forward for sm_80+: the LOCAL and GLOBAL_ROWS passes of
// fk_longformer.h, one kernel.
//
// The dense forward's machinery (dense_fwd_sm80.cuh: traits, swizzled tiles, tile sizes,
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

#include "../include/fk_longformer.h"
#include "dense_fwd_sm80.cuh"

namespace fk {

// cp.async of a ROWS x kHeadDim tile whose rows are tokens row0 + r of a sequence; rows
// past the sequence end or padded become zeros, as do head-dim padding chunks.
template <class Traits, int ROWS>
__device__ __forceinline__ void load_tile_masked(typename Traits::Element *smem,
                                                 const typename Traits::Element *gmem,
                                                 int64_t row_stride, int rows_valid,
                                                 const uint8_t *pad, int chunks_valid, int tid) {
  using Tile = typename Traits::Tile;
  constexpr int kChunks = ROWS * Tile::kChunksPerRow;
  static_assert(kChunks % Traits::kNThreads == 0, "tile must split evenly over threads");
#pragma unroll
  for (int i = 0; i < kChunks / Traits::kNThreads; ++i) {
    const int idx = i * Traits::kNThreads + tid;
    const int row = idx / Tile::kChunksPerRow;
    const int chunk = idx % Tile::kChunksPerRow;
    const bool valid =
        row < rows_valid && chunk < chunks_valid && (pad == nullptr || pad[row] == 0);
    const auto *src = gmem + (valid ? row * row_stride + chunk * 8 : 0);
    cp_async_16(smem_addr(smem + Tile::offset(row, chunk)), src, valid ? 16 : 0);
  }
}

// cp.async of a ROWS x kHeadDim tile whose row r is token token_of(r) of a sequence
// (gmem: the sequence's token 0); rows whose token is < 0 (none) or padded become zeros, as
// do head-dim padding chunks.
template <class Traits, int ROWS, class TokenOf>
__device__ __forceinline__ void load_rows_masked(typename Traits::Element *smem,
                                                 const typename Traits::Element *gmem,
                                                 int64_t row_stride, const TokenOf &token_of,
                                                 const uint8_t *pad, int chunks_valid, int tid) {
  using Tile = typename Traits::Tile;
  constexpr int kChunks = ROWS * Tile::kChunksPerRow;
  static_assert(kChunks % Traits::kNThreads == 0, "tile must split evenly over threads");
#pragma unroll
  for (int i = 0; i < kChunks / Traits::kNThreads; ++i) {
    const int idx = i * Traits::kNThreads + tid;
    const int row = idx / Tile::kChunksPerRow;
    const int chunk = idx % Tile::kChunksPerRow;
    const int tok = token_of(row);
    const bool valid = tok >= 0 && chunk < chunks_valid && (pad == nullptr || pad[tok] == 0);
    const auto *src = gmem + (valid ? int64_t(tok) * row_stride + chunk * 8 : 0);
    cp_async_16(smem_addr(smem + Tile::offset(row, chunk)), src, valid ? 16 : 0);
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSm)
    longformer_fwd_kernel(const fk_longformer_fwd_params p) {
  using Element = typename Traits::Element;
  using Tile = typename Traits::Tile;
  using ET = ElemTraits<Element>;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int MT = Traits::kMTiles;
  constexpr int kKSteps = D / 16;
  constexpr int kSTiles = BN / 8;
  constexpr int kOTiles = D / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
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
  const int m_block = blockIdx.x / max(p.num_splits, 1);
  const int split = blockIdx.x % max(p.num_splits, 1);
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const fk_longformer_common &pc = p.c;
  const int n_tokens = pc.seqlen;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int m0 = m_block * BM;
  const int warp_row0 = warp * Traits::kWarpRows;
  const int d_chunks = pc.head_dim / 8;
  const bool gathered = pc.pass == FK_LONGFORMER_GLOBAL_ROWS;

  // GLOBAL_ROWS ignores the global mask: with it NULL, a "local" row is a non-padded one
  // and no key is global, and the band below is all-true, which leaves the pass's rule.
  const uint8_t *glob =
      pc.global_mask && !gathered ? pc.global_mask + int64_t(batch) * n_tokens : nullptr;
  const uint8_t *pad = pc.padding_mask ? pc.padding_mask + int64_t(batch) * n_tokens : nullptr;
  // Clipping w and d to N changes no key and keeps w * d far from overflow. GLOBAL_ROWS:
  // d = 1 and reach N make band(i, j) true for every i, j in [0, N).
  const int dil = gathered ? 1 : min(pc.dilation[head], max(n_tokens, 1));
  const int win = gathered ? n_tokens : min(pc.window, n_tokens);
  const int64_t reach = int64_t(win) * dil; // |j - i| <= reach inside the band
  const bool causal = pc.causal != 0;

  // Token of the block's row `row` (in [0, BM)), or -1 for none: contiguous for LOCAL,
  // gathered from q_rows for GLOBAL_ROWS (-1 entries, entries outside [0, N) and entries
  // past per_seq are none).
  const int32_t *q_rows =
      gathered ? pc.q_rows + int64_t(batch) * pc.q_rows_per_seq + m0 : nullptr;
  const int rows_in_tile = (gathered ? pc.q_rows_per_seq : n_tokens) - m0;
  auto token_of = [&](int row) -> int {
    if (row >= rows_in_tile) return -1;
    if (!gathered) return m0 + row;
    const int tok = q_rows[row];
    return tok >= 0 && tok < n_tokens ? tok : -1;
  };

  const int num_splits = max(p.num_splits, 1);
  const int num_outer_tiles = gridDim.x / num_splits;
  const int64_t csr_row =
      (int64_t(batch) * pc.num_classes + pc.head_class[head]) * num_outer_tiles + m_block;
  const int row_begin = pc.tile_offsets[csr_row];
  const int64_t row_len = pc.tile_offsets[csr_row + 1] - row_begin;
  // Split s visits entries [len * s / S, len * (s + 1) / S) of the row (S = 1: all).
  const int it_begin = row_begin + int(row_len * split / num_splits);
  const int it_end = row_begin + int(row_len * (split + 1) / num_splits);

  // Packed global keys (LOCAL with k_rows): inner ids >= nkt are tiles of the gathered
  // keys, key row x of gathered tile gt is token k_rows[b][gt * BN + x] (none when -1,
  // outside [0, N) or past per_seq). Without k_rows every id is a contiguous key tile.
  // (Read from the parameters where used: registers are scarce at D = 128.)
  const bool packed = !gathered && pc.k_rows != nullptr;
  auto nkt = [&] { return (pc.seqlen + BN - 1) / BN; };
  auto key_token = [&](int gt, int row) -> int {
    const int64_t x = int64_t(gt) * BN + row;
    if (x >= pc.k_rows_per_seq) return -1;
    const int tok = pc.k_rows[int64_t(blockIdx.z) * pc.k_rows_per_seq + x];
    return tok >= 0 && tok < pc.seqlen ? tok : -1;
  };

  const Element *q = static_cast<const Element *>(p.q) + batch * p.q_batch_stride +
                     head * p.q_head_stride;
  const Element *k = static_cast<const Element *>(p.k) + batch * p.k_batch_stride +
                     head * p.k_head_stride;
  const Element *v = static_cast<const Element *>(p.v) + batch * p.v_batch_stride +
                     head * p.v_head_stride;

  auto load_kv = [&](int it, int stage) {
    const int tile = pc.tile_ids[it];
    if (packed && tile >= nkt()) { // gathered global keys, by token
      const int gt = tile - nkt();
      auto tok_of = [&](int row) { return key_token(gt, row); };
      load_rows_masked<Traits, BN>(sK + stage * Traits::kSmemKV, k, p.k_row_stride, tok_of, pad,
                                   d_chunks, tid);
      load_rows_masked<Traits, BN>(sV + stage * Traits::kSmemKV, v, p.v_row_stride, tok_of, pad,
                                   d_chunks, tid);
      // The tile's tokens, for its flags and causal cut (read after the loop's barrier).
      if (tid < BN) sKTok[stage * BN + tid] = tok_of(tid);
      return;
    }
    const int k0 = tile * BN;
    load_tile_masked<Traits, BN>(sK + stage * Traits::kSmemKV, k + int64_t(k0) * p.k_row_stride,
                                 p.k_row_stride, n_tokens - k0, pad ? pad + k0 : nullptr,
                                 d_chunks, tid);
    load_tile_masked<Traits, BN>(sV + stage * Traits::kSmemKV, v + int64_t(k0) * p.v_row_stride,
                                 p.v_row_stride, n_tokens - k0, pad ? pad + k0 : nullptr,
                                 d_chunks, tid);
  };

  load_rows_masked<Traits, BM>(sQ, q, p.q_row_stride, token_of, pad, d_chunks, tid);
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
      row_local[mt][r] = i >= 0 && !(pad && pad[i] != 0) && !(glob && glob[i] != 0);
    }

  auto load_q = [&](uint32_t(&a)[4], int mt, int ks) {
    const int row = warp_row0 + mt * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
    ldmatrix_x4(a, smem_addr(sQ + Tile::offset(row, 2 * ks + lane / 16)));
  };
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[Traits::kQInRegs ? kKSteps : 1][4];
  if constexpr (Traits::kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) load_q(qf[ks], 0, ks);
  }

  float acc[MT][kOTiles][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < kOTiles; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][i][e] = 0.f;
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[mt][r] = -INFINITY;
      row_sum[mt][r] = 0.f;
    }
  const float scale_log2 = pc.softmax_scale * kLog2e;

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
          if (col < n_tokens && !(pad && pad[col] != 0)) {
            const bool is_glob = glob && glob[col] != 0;
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
          if (tok >= 0 && !(pad && pad[tok] != 0)) key_any |= 1u << (2 * j + c);
        }
    }

    float s[MT][kSTiles][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Traits::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mt][e] = qf[ks][e];
        } else {
          load_q(a[mt], mt, ks);
        }
      }
#pragma unroll
      for (int j = 0; j < kSTiles; j += 2) {
        uint32_t b[4];
        const int row = (j + lane / 16) * 8 + (lane % 8);
        ldmatrix_x4(b, smem_addr(sKs + Tile::offset(row, 2 * ks + ((lane / 8) & 1))));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<Element>(s[mt][j], a[mt], b[0], b[1]);
          mma_16x8x16<Element>(s[mt][j + 1], a[mt], b[2], b[3]);
        }
      }
    }

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
            const bool band = dist <= reach && (dil == 1 || dist % dil == 0);
            const bool allowed =
                row_local[mt][r] && !(causal && rel > 0) &&
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
              const bool allowed = row_local[mt][r] && j * 8 + 2 * t + c < cut &&
                                   ((key_any >> (2 * j + c)) & 1u);
              if (!allowed) s[mt][j][2 * r + c] = -INFINITY;
            }
        }
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
          mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]) * scale_log2);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(row_max[mt][r] - m_use);
        row_max[mt][r] = mx;
        row_sum[mt][r] *= alpha;
#pragma unroll
        for (int i = 0; i < kOTiles; ++i) {
          acc[mt][i][2 * r] *= alpha;
          acc[mt][i][2 * r + 1] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) {
          s[mt][j][2 * r] = exp2f(fmaf(s[mt][j][2 * r], scale_log2, -m_use));
          s[mt][j][2 * r + 1] = exp2f(fmaf(s[mt][j][2 * r + 1], scale_log2, -m_use));
          row_sum[mt][r] += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
        }
      }

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = ET::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = ET::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = ET::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = ET::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t b[4];
        const int row = kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
        ldmatrix_x4_trans(b, smem_addr(sVs + Tile::offset(row, 2 * np + lane / 16)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<Element>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma_16x8x16<Element>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();
  }

  // Epilogue: stage O in this warp's Q rows, then 16-byte stores of the rows the pass
  // writes: LOCAL the local rows (the result) and the padded ones (zeros; padding wins over
  // global, as in the Rust rule); GLOBAL_ROWS (glob NULL) every listed row. i: a token, or -1.
  // No cp.async wait or barrier is needed first (the emulator's race check agrees): nothing
  // is in flight (the last tile waited with wait<0>; with no tile the second group is
  // empty), Q landed before the barrier after its wait, and only this warp read its rows.
  auto writes_row = [&](int i) {
    return i >= 0 && ((pad && pad[i] != 0) || !(glob && glob[i] != 0));
  };
  if (p.num_splits > 1) {
    const int split = blockIdx.x % p.num_splits;
    // GLOBAL_ROWS split: this split's O (normalised by its own sum, 0 without a key) and
    // LSE (-inf without a key) of every listed row, f32, to the workspace at the row's
    // entry index x; the combine kernel writes O and LSE.
    const int64_t ws_row0 =
        ((int64_t(split) * pc.batch + batch) * pc.heads + head) * pc.q_rows_per_seq + m0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float l = row_sum[mt][r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv_sum = l > 0.f ? 1.f / l : 0.f;
        const int row = warp_row0 + mt * 16 + g + 8 * r;
        if (row_idx[mt][r] < 0) continue;
        float *po = p.partial_o + (ws_row0 + row) * pc.head_dim;
#pragma unroll
        for (int i = 0; i < kOTiles; ++i)
          if (i * 8 < pc.head_dim) {
            po[i * 8 + 2 * t] = acc[mt][i][2 * r] * inv_sum;
            po[i * 8 + 2 * t + 1] = acc[mt][i][2 * r + 1] * inv_sum;
          }
        if (t == 0)
          p.partial_lse[ws_row0 + row] =
              l > 0.f ? (row_max[mt][r] + log2f(l)) * kLn2 : -INFINITY;
      }
    return;
  }
  Element *sO = sQ;
  float lse[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv_sum = l > 0.f ? 1.f / l : 0.f;
      lse[mt][r] = l > 0.f ? (row_max[mt][r] + log2f(l)) * kLn2 : -INFINITY;
      const int row = warp_row0 + mt * 16 + g + 8 * r;
#pragma unroll
      for (int i = 0; i < kOTiles; ++i)
        *reinterpret_cast<uint32_t *>(sO + Tile::offset(row, i) + 2 * t) =
            ET::pack(acc[mt][i][2 * r] * inv_sum, acc[mt][i][2 * r + 1] * inv_sum);
    }
  __syncwarp();

  Element *o = static_cast<Element *>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
#pragma unroll
  for (int i = lane; i < Traits::kWarpRows * Tile::kChunksPerRow; i += 32) {
    const int row = warp_row0 + i / Tile::kChunksPerRow;
    const int chunk = i % Tile::kChunksPerRow;
    const int grow = token_of(row);
    if (chunk < d_chunks && writes_row(grow))
      *reinterpret_cast<uint4 *>(o + int64_t(grow) * p.o_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4 *>(sO + Tile::offset(row, chunk));
  }
  if (t == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int grow = row_idx[mt][r];
        if (writes_row(grow))
          p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + grow] = lse[mt][r];
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
  const int64_t per_split = int64_t(pc.batch) * pc.heads * pc.q_rows_per_seq;
  const int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (w >= per_split) return;
  const int lane = threadIdx.x % 32;
  const int x = int(w % pc.q_rows_per_seq);
  const int head = int(w / pc.q_rows_per_seq % pc.heads);
  const int batch = int(w / pc.q_rows_per_seq / pc.heads);
  const int tok = pc.q_rows[int64_t(batch) * pc.q_rows_per_seq + x];
  if (tok < 0 || tok >= pc.seqlen) return;
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
  Element *o = static_cast<Element *>(p.o) + batch * p.o_batch_stride +
               int64_t(tok) * p.o_row_stride + head * p.o_head_stride;
  for (int d = 2 * lane; d < pc.head_dim; d += 64) {
    float a0 = 0.f, a1 = 0.f;
    if (lse != -INFINITY)
      for (int s = 0; s < S; ++s) {
        const float ls = p.partial_lse[s * per_split + w];
        if (ls == -INFINITY) continue;
        const float wgt = expf(ls - lse);
        const float *po = p.partial_o + (s * per_split + w) * pc.head_dim + d;
        a0 = fmaf(wgt, po[0], a0);
        a1 = fmaf(wgt, po[1], a1);
      }
    *reinterpret_cast<uint32_t *>(o + d) = ET::pack(a0, a1);
  }
  if (lane == 0) p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + tok] = lse;
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
template <> struct LongformerFwdConfigSm80<128> : DenseFwdConfigSm80<128> {};

template <int kHeadDim, typename Element>
cudaError_t run_longformer_fwd_sm80(const fk_longformer_fwd_params &p, cudaStream_t stream) {
  using C = LongformerFwdConfigSm80<kHeadDim>;
  using Traits = DenseFwdTraitsSm80<kHeadDim, Element, C::kMTiles, C::kNWarps, C::kBlockN,
                                    C::kMinBlocksPerSm, C::kQInRegs>;
  // Outer tiles: contiguous query tiles of N (LOCAL) or gathered tiles of q_rows.
  const int outer_rows = p.c.pass == FK_LONGFORMER_GLOBAL_ROWS ? p.c.q_rows_per_seq : p.c.seqlen;
  // Split over keys: the splits of an outer tile are adjacent in x (entry point: x fits).
  const int num_splits = p.num_splits > 1 ? p.num_splits : 1;
  const int outer_tiles = (outer_rows + Traits::kBlockM - 1) / Traits::kBlockM;
  const dim3 grid(unsigned(outer_tiles) * unsigned(num_splits), p.c.heads, p.c.batch);
  // + the key tokens of gathered key tiles (two stages).
  const size_t smem = Traits::kSmemBytes + 2 * Traits::kBlockN * sizeof(int);
  cudaError_t err = launch_kernel(longformer_fwd_kernel<Traits>, grid, dim3(Traits::kNThreads),
                                  smem, stream, p);
  if (err != cudaSuccess || num_splits == 1) return err;
  constexpr int kCombineWarps = 4;
  const int64_t rows = int64_t(p.c.batch) * p.c.heads * p.c.q_rows_per_seq;
  const dim3 cgrid(unsigned((rows + kCombineWarps - 1) / kCombineWarps));
  return launch_kernel(longformer_fwd_combine_kernel<Element>, cgrid, dim3(32 * kCombineWarps),
                       0, stream, p);
}

} // namespace fk
