// Tensor-core tile GEMM core for sm_80+ (f16 / bf16 in, f32 accumulate), shared by the
// convolution family and, later, the fused feed-forward op. Per group g = blockIdx.z:
//
//   out_g[row_map(m) + col_map(n)] = act(sum_k A_g[m, k] B_g[n, k] + bias_g[n]),  m < M, n < N
//
// Three policies around one mainloop (cp.async double buffering into SwizzledTile<64>,
// ldmatrix, mma.sync m16n8k16, f32 accumulators in registers):
// - A and B loaders fill one (rows x 64) shared tile per k-step, zero outside the matrix:
//   StridedLoader reads any operand whose element (row, col) sits at row_map(row) +
//   col_map(col) (a row-major matrix, weights through their strides, dy transposed...),
//   16-byte cp.async where the host found that legal, an element gather otherwise; the
//   convolution's Im2colLoader gathers im2col tiles straight from x.
// - The epilogue (StagedEpilogue: bias, run-time activation, optional pre-activation copy,
//   any output strides, staged through shared memory; F32Epilogue: raw f32) runs once the
//   mainloop is done.
// Groups (blockIdx.z) start group_stride apart, or, for groups that are tuples such as
// (batch, head, split), where an IndexMap3 over z puts them (MappedOperand,
// MappedEpilogueParams). Split-K (SplitKLoader, a policy around any loader): group z
// reduces only over its split's range of k, absolute k indices, so loaders need no base
// shift; the partials go to an F32Epilogue and the caller reduces them in a fixed order.
// Rows or reduction columns of padded keys can be masked to zero in the loader (KeyMask).
// A linear layer is the same call: A = activations (row-major), B = weight (out, in) as torch
// stores it, StagedEpilogue for bias + activation. The Hopper path sits beside this one
// (gemm_sm90.cuh: TMA, wgmma, a producer warpgroup): its tiles are SwizzledTile<64>'s layout
// (wgmma's 128-byte swizzle) and its traits give these epilogues the same per-warp
// accumulator view, so only the mainloop differs.
#pragma once

#include "launch.cuh"
#include "mma_sm80.cuh"
#include "numeric.cuh"

namespace fk {
namespace gemm {

// An index i unravelled as (i0, i1, i2), i2 fastest (sizes (*, d1, d2)), mapped to the
// offset i0 s0 + i1 s1 + i2 s2: output pixels (n, p, q), filter taps (r, s, c), or a plain
// stride (d1 = d2 = 1). The divisions by d1 and d2 are FastDivs prepared on the host: the
// loaders unravel a column per k-tile and a row per output row.
struct IndexMap3 {
  FastDiv div1, div2; // by d1, d2
  int64_t s0 = 0, s1 = 0, s2 = 0;
  IndexMap3() = default;
  __host__ __device__ IndexMap3(int d1, int d2, int64_t s0_, int64_t s1_, int64_t s2_)
      : div1(d1), div2(d2), s0(s0_), s1(s1_), s2(s2_) {}
  int d1() const { return div1.d; }
  int d2() const { return div2.d; }
  __host__ __device__ __forceinline__ int64_t offset(int i) const {
    const int rest = div2.div(i), i2 = i - rest * div2.d;
    const int i0 = div1.div(rest), i1 = rest - i0 * div1.d;
    return i0 * s0 + i1 * s1 + i2 * s2;
  }
  static IndexMap3 linear(int64_t stride) { return {1, 1, stride, 0, 0}; }
  // Runs of 8 consecutive indices starting at a multiple of 8 are contiguous and, given a
  // 16-byte-aligned base, 16-byte aligned.
  bool vectorizable() const {
    if (d1() == 1 && d2() == 1) return s0 == 1;
    return s2 == 1 && d2() % 8 == 0 && s1 % 8 == 0 && s0 % 8 == 0;
  }
};

// Tile configuration. kBlockK is fixed at 64 16-bit elements (a 128-byte shared row, the
// swizzle's unit); warps tile the block kWarpsM x kWarpsN; two cp.async stages (the
// mainloop alternates between them).
template <typename Element_, int kBlockM_, int kBlockN_, int kWarpsM_, int kWarpsN_,
          int kMinBlocksPerSm_>
struct TileGemmTraitsSm80 {
  using Element = Element_;
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kBlockK = 64, kStages = 2;
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, kMinBlocksPerSm = kMinBlocksPerSm_;
  static constexpr int kNThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kMTiles = kBlockM / kWarpsM / 16; // 16-row MMA tiles per warp
  static constexpr int kNTiles = kBlockN / kWarpsN / 8;  // 8-column MMA tiles per warp
  static_assert(kMTiles * 16 * kWarpsM == kBlockM && kNTiles * 8 * kWarpsN == kBlockN, "tiling");
  static_assert(kNTiles % 2 == 0, "B fragments are loaded for two n-tiles at a time");
  using Tile = SwizzledTile<kBlockK>;
  static constexpr int kSmemA = kBlockM * kBlockK, kSmemB = kBlockN * kBlockK; // elements
  // Epilogue staging rows padded by 16 bytes: aligned, and rows start in other banks.
  static constexpr int kStageLd = kBlockN + 8;
  static constexpr size_t kSmemMain = size_t(kStages) * (kSmemA + kSmemB) * sizeof(Element);
  static constexpr size_t kSmemEpilogue = size_t(2) * kBlockM * kStageLd * sizeof(Element);
  static constexpr size_t kSmemBytes = kSmemMain > kSmemEpilogue ? kSmemMain : kSmemEpilogue;
  // Orders the epilogue's staging among its threads (gemm_sm90.cuh's: a named barrier).
  static __device__ __forceinline__ void epilogue_barrier() { __syncthreads(); }
};

// Which elements a loader zeroes besides those outside rows x cols: none, the rows, or the
// reduction columns whose mask byte is nonzero (attention-style key padding: the keys of a
// sequence are the rows or the columns of an operand, the mask row is the group's batch).
enum class KeyMask { kNone, kRows, kCols };

// Operand given by index maps; zero outside rows x cols. Group g starts group_stride later.
template <typename Element> struct StridedOperand {
  const Element *base;
  IndexMap3 row_map, col_map;
  int rows, cols;
  int64_t group_stride;
  bool vec; // 16-byte cp.async allowed (host-checked: col_map, strides, alignment)
  static constexpr KeyMask kMask = KeyMask::kNone;
  __device__ __forceinline__ int64_t group_offset(unsigned z) const { return z * group_stride; }
};

// A StridedOperand whose group z starts at group_map.offset(z) (group_stride unused): z =
// (batch, head, split) with a stride each, 0 for what the operand does not depend on. With
// kMask_ != kNone, element (r, c) is also zero where mask[mask_map.offset(z) + r] (kRows)
// or mask[mask_map.offset(z) + c] (kCols) is nonzero (mask: uint8, 1 = masked).
template <typename Element, KeyMask kMask_ = KeyMask::kNone>
struct MappedOperand : StridedOperand<Element> {
  IndexMap3 group_map;
  const uint8_t *mask; // null: nothing masked
  IndexMap3 mask_map;
  static constexpr KeyMask kMask = kMask_;
  __device__ __forceinline__ int64_t group_offset(unsigned z) const {
    return group_map.offset(int(z));
  }
};

// Fills ROWS x kBlockK tiles of a StridedOperand (or a MappedOperand: StridedLoaderT's
// Operand). Each thread owns one 16-byte chunk column and ROWS / (threads / 8) rows, whose
// offsets it computes once. Masked rows (kRows) are folded into the rows' validity at
// construction; masked columns (kCols) are read once per k-tile for the thread's chunk and
// shared by its rows. Without a mask (StridedOperand) the code is the unmasked loader's.
template <class Traits, int ROWS, class Operand_> struct StridedLoaderT {
  using Element = typename Traits::Element;
  using Operand = Operand_;
  static constexpr KeyMask kMask = Operand::kMask;
  static constexpr int kRowsPerPass = Traits::kNThreads / Traits::Tile::kChunksPerRow;
  static constexpr int kPasses = ROWS / kRowsPerPass;
  static_assert(kPasses * kRowsPerPass == ROWS, "tile rows must split evenly over threads");

  const Operand &op;
  const Element *base;
  int chunk, row_in_pass;
  int64_t row_offset[kPasses];
  bool row_valid[kPasses];

  __device__ StridedLoaderT(const Operand &op_, int row0, int tid)
      : op(op_), base(op_.base + op_.group_offset(blockIdx.z)),
        chunk(tid % Traits::Tile::kChunksPerRow), row_in_pass(tid / Traits::Tile::kChunksPerRow) {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int row = row0 + i * kRowsPerPass + row_in_pass;
      row_valid[i] = row < op.rows;
      if constexpr (kMask == KeyMask::kRows)
        if (row_valid[i] && op.mask != nullptr)
          row_valid[i] = op.mask[op.mask_map.offset(blockIdx.z) + row] == 0;
      row_offset[i] = row_valid[i] ? op.row_map.offset(row) : 0;
    }
  }

  __device__ void load(Element *tile, int k0) const {
    const int col = k0 + chunk * 8;
    bool full = op.vec && col + 8 <= op.cols;
    unsigned keep = 0xFFu; // bit e: column col + e is not masked
    if constexpr (kMask == KeyMask::kCols) {
      if (op.mask != nullptr && col < op.cols) {
        const uint8_t *m = op.mask + op.mask_map.offset(blockIdx.z);
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (col + e < op.cols && m[col + e] != 0) keep &= ~(1u << e);
        full = full && keep == 0xFFu;
      }
    }
    const int64_t col_offset = full ? op.col_map.offset(col) : 0;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      Element *dst = tile + Traits::Tile::offset(i * kRowsPerPass + row_in_pass, chunk);
      if (!row_valid[i] || col >= op.cols || keep == 0) {
        cp_async_16(smem_addr(dst), base, 0);
      } else if (full) {
        cp_async_16(smem_addr(dst), base + row_offset[i] + col_offset, 16);
      } else {
        alignas(16) Element v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          v[e] = col + e < op.cols && (keep >> e & 1u)
                     ? base[row_offset[i] + op.col_map.offset(col + e)]
                     : from_float<Element>(0.f);
        *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(v);
      }
    }
  }
};

// The plain loader of a StridedOperand (the name conv and the FFN instantiate).
template <class Traits, int ROWS>
struct StridedLoader : StridedLoaderT<Traits, ROWS, StridedOperand<typename Traits::Element>> {
  using StridedLoaderT<Traits, ROWS, StridedOperand<typename Traits::Element>>::StridedLoaderT;
};

// The loader of a MappedOperand (group map, optional key mask).
template <class Traits, int ROWS, KeyMask kMask = KeyMask::kNone>
using MappedLoader = StridedLoaderT<Traits, ROWS, MappedOperand<typename Traits::Element, kMask>>;

template <typename Element> struct EpilogueParams {
  Element *out;
  Element *out_pre;     // conv + bias before the activation, out's layout; or null
  const Element *bias;  // (groups * N) or null
  IndexMap3 row_map, col_map;
  int rows, cols;       // M, N (per group)
  int64_t group_stride; // of out and out_pre; the bias's is N
  int activation;       // fk_activation
  bool vec;             // 16-byte stores along n allowed (host-checked)
  __device__ __forceinline__ int64_t group_offset(unsigned z) const { return z * group_stride; }
};

// EpilogueParams whose group z starts at group_map.offset(z) in out / out_pre (group_stride
// unused); the bias is still (groups * N).
template <typename Element> struct MappedEpilogueParams : EpilogueParams<Element> {
  IndexMap3 group_map;
  __device__ __forceinline__ int64_t group_offset(unsigned z) const {
    return group_map.offset(int(z));
  }
};

// Epilogue policies: apply(acc, params, smem, m0, n0, warp_m0, warp_n0) is called by every
// thread once the mainloop is done and shared memory is free; Params has rows and cols.
//
// StagedEpilogue: accumulators -> bias, activation -> shared staging -> global, in the
// operands' dtype. When n is the unit-stride dimension (NHWC), consecutive threads store
// consecutive n, 16 bytes at a time where allowed; otherwise (NCHW: m's q is unit-stride)
// consecutive threads take consecutive m.
template <class Traits, class Params_> struct StagedEpilogueT {
  using Element = typename Traits::Element;
  using Params = Params_;
  static __device__ void apply(const float (&acc)[Traits::kMTiles][Traits::kNTiles][4],
                               const Params &ep, Element *smem, int m0, int n0, int warp_m0,
                               int warp_n0);
};

template <class Traits>
struct StagedEpilogue : StagedEpilogueT<Traits, EpilogueParams<typename Traits::Element>> {};
template <class Traits>
struct MappedStagedEpilogue
    : StagedEpilogueT<Traits, MappedEpilogueParams<typename Traits::Element>> {};

template <class Traits, class Params_>
__device__ void StagedEpilogueT<Traits, Params_>::apply(
    const float (&acc)[Traits::kMTiles][Traits::kNTiles][4], const Params &ep, Element *smem,
    int m0, int n0, int warp_m0, int warp_n0) {
  constexpr int BM = Traits::kBlockM, BN = Traits::kBlockN, LD = Traits::kStageLd;
  Element *s_out = smem;
  Element *s_pre = smem + BM * LD;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const Element *bias = ep.bias != nullptr ? ep.bias + blockIdx.z * ep.cols : nullptr;
  Element *out = ep.out + ep.group_offset(blockIdx.z);
  Element *out_pre = ep.out_pre != nullptr ? ep.out_pre + ep.group_offset(blockIdx.z) : nullptr;
#pragma unroll
  for (int j = 0; j < Traits::kNTiles; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int n = warp_n0 + j * 8 + 2 * t + c;
      const float b = bias != nullptr && n0 + n < ep.cols ? to_float(bias[n0 + n]) : 0.f;
#pragma unroll
      for (int mt = 0; mt < Traits::kMTiles; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int m = warp_m0 + mt * 16 + g + 8 * r;
          const float v = acc[mt][j][2 * r + c] + b;
          s_out[m * LD + n] = from_float<Element>(activate(v, ep.activation));
          if (out_pre != nullptr) s_pre[m * LD + n] = from_float<Element>(v);
        }
    }
  Traits::epilogue_barrier();

  const bool n_unit = ep.col_map.div1.d == 1 && ep.col_map.div2.d == 1 && ep.col_map.s0 == 1;
  if (n_unit) {
    constexpr int kChunks = BN / 8;
    for (int i = threadIdx.x; i < BM * kChunks; i += Traits::kNThreads) {
      const int m = i / kChunks, n = (i % kChunks) * 8;
      if (m0 + m >= ep.rows || n0 + n >= ep.cols) continue;
      const int64_t off = ep.row_map.offset(m0 + m) + n0 + n;
      if (ep.vec && n0 + n + 8 <= ep.cols) {
        *reinterpret_cast<uint4 *>(out + off) =
            *reinterpret_cast<const uint4 *>(s_out + m * LD + n);
        if (out_pre != nullptr)
          *reinterpret_cast<uint4 *>(out_pre + off) =
              *reinterpret_cast<const uint4 *>(s_pre + m * LD + n);
      } else {
        for (int e = 0; e < 8 && n0 + n + e < ep.cols; ++e) {
          out[off + e] = s_out[m * LD + n + e];
          if (out_pre != nullptr) out_pre[off + e] = s_pre[m * LD + n + e];
        }
      }
    }
  } else {
    for (int i = threadIdx.x; i < BM * BN; i += Traits::kNThreads) {
      const int m = i % BM, n = i / BM;
      if (m0 + m >= ep.rows || n0 + n >= ep.cols) continue;
      const int64_t off = ep.row_map.offset(m0 + m) + ep.col_map.offset(n0 + n);
      out[off] = s_out[m * LD + n];
      if (out_pre != nullptr) out_pre[off] = s_pre[m * LD + n];
    }
  }
}

// F32Epilogue: the raw f32 accumulators into a row-major matrix, for results that are
// summed further (col2im) and should not be rounded to 16 bits on the way.
struct F32MatrixParams {
  float *out;
  int64_t ld, group_stride;
  int rows, cols;
};

template <class Traits> struct F32Epilogue {
  using Params = F32MatrixParams;
  static __device__ void apply(const float (&acc)[Traits::kMTiles][Traits::kNTiles][4],
                               const Params &ep, typename Traits::Element *, int m0, int n0,
                               int warp_m0, int warp_n0) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float *out = ep.out + blockIdx.z * ep.group_stride;
#pragma unroll
    for (int mt = 0; mt < Traits::kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int m = m0 + warp_m0 + mt * 16 + g + 8 * r;
        if (m >= ep.rows) continue;
#pragma unroll
        for (int j = 0; j < Traits::kNTiles; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int n = n0 + warp_n0 + j * 8 + 2 * t + c;
            if (n < ep.cols) out[m * ep.ld + n] = acc[mt][j][2 * r + c];
          }
      }
  }
};

// Split-K as a loader policy around any loader: group z = blockIdx.z reduces over k in
// [s k_split, (s + 1) k_split) with s = z % splits (splits fastest in z), k_split a multiple
// of kBlockK. Launched with k_total = k_split, the mainloop's k0 runs over [0, k_split); the
// wrapped loader gets the absolute column s k_split + k0 (no base shift in it) and zeroes
// what lies past its operand's cols, so the last split ends at the true reduction length.
// The inner operands' group maps see the whole z (give the split dimension stride 0); an
// F32Epilogue with group_stride = M N keeps one partial per z for the caller's fixed-order
// reduction. Why a loader policy and not a second kernel: the mainloop stays the one
// tile_gemm_kernel (a k-range argument in it changed the register allocation of the conv
// and FFN kernels); the price is that the last split runs its tiles past k_total on zeros
// (less than one split's work per group; the caller picks splits that do not leave whole
// splits empty).
template <class Loader> struct SplitKLoader {
  using Element = typename Loader::Element;
  struct Operand {
    typename Loader::Operand inner;
    int k_split, splits;
  };
  Loader inner;
  int k_begin;
  __device__ SplitKLoader(const Operand &op, int row0, int tid)
      : inner(op.inner, row0, tid), k_begin(int(blockIdx.z % unsigned(op.splits)) * op.k_split) {}
  __device__ void load(Element *tile, int k0) const { inner.load(tile, k_begin + k0); }
};

// One block: a BM x BN output tile of group blockIdx.z; k_total is the reduction length.
template <class Traits, class ALoader, class BLoader, class Epilogue>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSm)
    tile_gemm_kernel(const typename ALoader::Operand a, const typename BLoader::Operand b,
                     const typename Epilogue::Params ep, int k_total) {
  using Element = typename Traits::Element;
  using Tile = typename Traits::Tile;
  constexpr int MT = Traits::kMTiles, NT = Traits::kNTiles;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element *sA = reinterpret_cast<Element *>(smem_raw);
  Element *sB = sA + Traits::kStages * Traits::kSmemA;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * Traits::kBlockM, n0 = blockIdx.y * Traits::kBlockN;
  const int warp_m0 = (warp / Traits::kWarpsN) * MT * 16;
  const int warp_n0 = (warp % Traits::kWarpsN) * NT * 8;

  const ALoader load_a(a, m0, tid);
  const BLoader load_b(b, n0, tid);
  const int k_tiles = (k_total + Traits::kBlockK - 1) / Traits::kBlockK;

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

  if (k_tiles > 0) { // an empty reduction (no pixels, say) must not touch its operands
    load_a.load(sA, 0);
    load_b.load(sB, 0);
  }
  cp_async_commit();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt & 1;
    if (kt + 1 < k_tiles) {
      load_a.load(sA + (stage ^ 1) * Traits::kSmemA, (kt + 1) * Traits::kBlockK);
      load_b.load(sB + (stage ^ 1) * Traits::kSmemB, (kt + 1) * Traits::kBlockK);
      cp_async_commit();
      cp_async_wait<1>(); // tile kt has landed, kt + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Element *sAs = sA + stage * Traits::kSmemA;
    const Element *sBs = sB + stage * Traits::kSmemB;
#pragma unroll
    for (int ks = 0; ks < Traits::kBlockK / 16; ++ks) {
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp_m0 + mt * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
        ldmatrix_x4(af[mt], smem_addr(sAs + Tile::offset(row, 2 * ks + lane / 16)));
      }
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        uint32_t bf[4];
        const int row = warp_n0 + (j + lane / 16) * 8 + (lane % 8);
        ldmatrix_x4(bf, smem_addr(sBs + Tile::offset(row, 2 * ks + ((lane / 8) & 1))));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<Element>(acc[mt][j], af[mt], bf[0], bf[1]);
          mma_16x8x16<Element>(acc[mt][j + 1], af[mt], bf[2], bf[3]);
        }
      }
    }
    __syncthreads(); // everyone is done with this stage before it is refilled
  }
  // Shared memory is free for the epilogue without a wait or barrier here (the emulator's
  // race check agrees): the last k-tile waited with wait<0> and its closing barrier orders
  // every read of sA and sB; with k_tiles == 0 nothing was loaded or read.
  Epilogue::apply(acc, ep, sA, m0, n0, warp_m0, warp_n0);
}

template <class Traits, class ALoader, class BLoader, class Epilogue = StagedEpilogue<Traits>>
cudaError_t launch_tile_gemm(const typename ALoader::Operand &a, const typename BLoader::Operand &b,
                             const typename Epilogue::Params &ep, int k_total, int groups,
                             cudaStream_t stream) {
  const dim3 grid((ep.rows + Traits::kBlockM - 1) / Traits::kBlockM,
                  (ep.cols + Traits::kBlockN - 1) / Traits::kBlockN, groups);
  return launch_kernel(tile_gemm_kernel<Traits, ALoader, BLoader, Epilogue>, grid,
                       dim3(Traits::kNThreads), Traits::kSmemBytes, stream, a, b, ep, k_total);
}

// Split-K launch (SplitKLoader): groups = (the caller's groups) x splits, splits fastest.
template <class Traits, class ALoader, class BLoader, class Epilogue>
cudaError_t launch_tile_gemm_split(const typename ALoader::Operand &a,
                                   const typename BLoader::Operand &b,
                                   const typename Epilogue::Params &ep, int k_split, int splits,
                                   int groups, cudaStream_t stream) {
  return launch_tile_gemm<Traits, SplitKLoader<ALoader>, SplitKLoader<BLoader>, Epilogue>(
      {a, k_split, splits}, {b, k_split, splits}, ep, k_split, groups * splits, stream);
}

// The configuration the convolution family uses: 128 x 64 tiles, 4 warps of 64 x 32.
template <typename Element> using ConvGemmTraits = TileGemmTraitsSm80<Element, 128, 64, 2, 2, 2>;

} // namespace gemm
} // namespace fk
