// Shared-memory tile I/O around the SwizzledTile layout of mma_sm80.cuh, used by every
// attention kernel (dense and Longformer, forward and backward):
// - load_tile: the one cooperative cp.async fill of a ROWS x COLS tile, from one or more
//   global tensors with the same rows (K and V, say); a row map names the source row of
//   each tile row, or none (then zeros);
// - stage_row: one row of a warp's f32 accumulator fragments into a staging tile;
// - store_rows: a warp's staged rows to global memory, 16 bytes at a time, through a row
//   map (rows without a destination are skipped).
// A row map is called for tile row r and one 16-byte chunk of it, in one of two forms:
// row_of(r, chunk_ok, row) sets `row` (the global row) and returns whether the chunk is
// copied; row_of(r, chunk_ok) returns the global row, or -1 for none. Either way a copied
// chunk must have chunk_ok() (it is not head-dim padding); where the map tests it is up to
// it: before a look-up that reads memory, or after a plain bound.
#pragma once

#include <type_traits>

#include "mma_sm80.cuh"

namespace fk {

// chunk_ok() of a row map: chunk < chunks_valid.
struct ChunkOk {
  int chunk, chunks_valid;
  __device__ __forceinline__ bool operator()() const { return chunk < chunks_valid; }
};

// The first n rows, in order (a tile at the end of a sequence).
struct FirstRows {
  int n;
  __device__ __forceinline__ bool operator()(int r, ChunkOk chunk_ok, int &row) const {
    row = r;
    return r < n && chunk_ok();
  }
};

// Rows given by token: tok(r) >= 0 is tile row r's row, -1 none; looked up only for chunks
// that are not head-dim padding (tok may read memory).
template <class TokFn> struct TokenRows {
  const TokFn &tok;
  __device__ __forceinline__ int operator()(int r, ChunkOk chunk_ok) const {
    return chunk_ok() ? tok(r) : -1;
  }
};

// Applies a row map of either form: whether the chunk is copied, and from / to which row.
template <class RowMap>
__device__ __forceinline__ bool map_row(const RowMap &row_of, int r, ChunkOk chunk_ok, int &row) {
  if constexpr (std::is_invocable_v<const RowMap &, int, ChunkOk>) {
    row = row_of(r, chunk_ok);
    return row >= 0;
  } else {
    return row_of(r, chunk_ok, row);
  }
}
template <class TokFn> __device__ __forceinline__ TokenRows<TokFn> token_rows(const TokFn &tok) {
  return {tok};
}

// One destination tile of a load_tile and the global tensor its rows come from (gmem: the
// tensor's row 0 for the row map, row_stride in elements).
template <typename Element> struct TileSource {
  Element *smem;
  const Element *gmem;
  int64_t row_stride;
};

template <typename Element>
__device__ __forceinline__ TileSource<Element> tile_source(Element *smem, const Element *gmem,
                                                           int64_t row_stride) {
  return {smem, gmem, row_stride};
}

// Source address of one chunk of a load_tile (a zero-filled chunk still needs a legal
// address: the tensor's row 0).
template <typename Element>
__device__ __forceinline__ const void *chunk_source(const TileSource<Element> &t, int chunk,
                                                    int src, bool valid) {
  return t.gmem + (valid ? int64_t(src) * t.row_stride + chunk * 8 : 0);
}

// Cooperative cp.async of a ROWS x COLS tile (COLS: the padded head dim) into each of
// `tiles`: a chunk of tile row r is that of the row row_of names, or zeros where it copies
// nothing. row_of is called once per chunk, for all tiles.
template <int kNThreads, int COLS, int ROWS, class RowMap, class... Tiles>
__device__ __forceinline__ void load_tile(const RowMap &row_of, int chunks_valid, int tid,
                                          const Tiles &...tiles) {
  using Tile = SwizzledTile<COLS>;
  constexpr int kChunks = ROWS * Tile::kChunksPerRow;
  static_assert(kChunks % kNThreads == 0, "tile must split evenly over threads");
#pragma unroll
  for (int i = 0; i < kChunks / kNThreads; ++i) {
    const int idx = i * kNThreads + tid;
    const int row = idx / Tile::kChunksPerRow;
    const int chunk = idx % Tile::kChunksPerRow;
    int src = 0;
    const bool valid = map_row(row_of, row, ChunkOk{chunk, chunks_valid}, src);
    // Every source address first, then the copies.
    const void *from[] = {chunk_source(tiles, chunk, src, valid)...};
    int k = 0;
    (cp_async_16(smem_addr(tiles.smem + Tile::offset(row, chunk)), from[k++], valid ? 16 : 0), ...);
  }
}

// Row `row` of a swizzled tile := row r (0: g, 1: g + 8) of a warp's 16 x COLS f32
// accumulator fragments (8-column tiles, c0..c3 of mma_16x8x16) times `mul`, as Element.
template <int COLS, typename Element>
__device__ __forceinline__ void stage_row(Element *tile, int row, const float (&acc)[COLS / 8][4],
                                          int r, float mul, int t) {
  using ET = ElemTraits<Element>;
#pragma unroll
  for (int i = 0; i < COLS / 8; ++i)
    *reinterpret_cast<uint32_t *>(tile + SwizzledTile<COLS>::offset(row, i) + 2 * t) =
        ET::pack(acc[i][2 * r] * mul, acc[i][2 * r + 1] * mul);
}

// 16-byte stores by one warp of tile rows [row0, row0 + ROWS) to the global rows of `gmem`
// that row_of names; chunks it does not copy are skipped.
template <int COLS, int ROWS, typename Element, class RowMap>
__device__ __forceinline__ void store_rows(Element *gmem, int64_t row_stride, const Element *tile,
                                           int row0, const RowMap &row_of, int chunks_valid,
                                           int lane) {
  using Tile = SwizzledTile<COLS>;
#pragma unroll
  for (int i = lane; i < ROWS * Tile::kChunksPerRow; i += 32) {
    const int row = row0 + i / Tile::kChunksPerRow;
    const int chunk = i % Tile::kChunksPerRow;
    int dst = 0;
    if (map_row(row_of, row, ChunkOk{chunk, chunks_valid}, dst))
      *reinterpret_cast<uint4 *>(gmem + int64_t(dst) * row_stride + chunk * 8) =
          *reinterpret_cast<const uint4 *>(tile + Tile::offset(row, chunk));
  }
}

} // namespace fk
