// Hopper (sm_90a) mainloop of the tile GEMM core, beside gemm_sm80.cuh's: per output tile
//
//   out[m, n] = epilogue(sum_k A[m, k] B[n, k])
//
// - a producer warpgroup whose one elected thread streams A and B tiles (BM x 64 and BN x 64,
//   128-byte swizzle) into kStages shared-memory stages with TMA, each stage guarded by a
//   `full` mbarrier (arrival + transaction bytes) and an `empty` one (one arrival per
//   consumer warpgroup); it gives its registers up (setmaxnreg.dec);
// - two consumer warpgroups (setmaxnreg.inc), 64 rows of the tile each, run wgmma
//   m64 x BN x k16 from the stages, keep one wgmma group in flight (a stage is released once
//   the wgmma after it was issued and its own has retired), then run the epilogue;
// - a persistent grid (one block per SM) walks the tiles m-fastest (neighbouring blocks
//   share B's tile in L2); the producer runs ahead into the next tile while the consumers
//   store this one, so the epilogue stages through its own shared memory.
// The epilogue policies are gemm_sm80.cuh's (they take accumulators by (row, col) in
// mma.sync's m16n8 fragment layout, which is wgmma's per warp): Traits here says kMTiles = 1
// and kNTiles = BN / 8 per warp, kNThreads = the consumers, and epilogue_barrier() is a named
// barrier over the consumers. The TMA kernel runs one group (blockIdx.z == 0) per launch;
// the gathering one takes groups along blockIdx.z as the sm80 core does.
// Operand layouts (template flags): A and B each K-major (a row-major M x K / N x K matrix:
// boxes of 64 k x rows) or MN-major (a row-major K x M / K x N matrix, as a transposed
// operand is: boxes of 64 m-or-n x 64 k, one per 64-wide block; wgmma's transpose bit).
// B may also come in two parts (BLoad):
// - kGatedHalves: the tile's first BN / 2 rows from one matrix (W1) and the last BN / 2 from
//   another (W3) at the same rows, so n-tiles j and j + kNTiles / 2 of each thread hold the
//   same (row, hidden unit) of both products;
// - kStackedK: the reduction runs over map_b's k < k_split, then over map_b2's (A's k goes on
//   from k_split): [W1; W3] stacked along K without a copy.
// Operands TMA cannot describe (the implicit im2col matrix, weights through their strides)
// take the second kernel at the end, whose producer warpgroup runs the sm80 core's loader
// policies with cp.async instead of TMA; the consumers are the same (consume_tiles).
#pragma once

#include "gemm_sm80.cuh" // the epilogue and loader policies, SplitKLoader
#include "launch.cuh"
#include "persistent.cuh"
#include "sm90.cuh"
#include "sm90_pipeline.cuh"

namespace fk {
namespace gemm {

template <typename Element_, int kBlockN_, int kStages_> struct TileGemmTraitsSm90 {
  using Element = Element_;
  static constexpr int kBlockM = 128, kBlockN = kBlockN_, kBlockK = 64, kStages = kStages_;
  static constexpr int kConsumers = 2;                     // warpgroups of 64 rows
  static constexpr int kNThreads = kConsumers * 128;       // the epilogue's threads
  static constexpr int kLaunchThreads = kNThreads + 128;   // + the producer warpgroup
  static constexpr int kMTiles = 1, kNTiles = kBlockN / 8; // per warp, as the epilogues see it
  static_assert(kBlockN == 64 || kBlockN == 128, "wgmma n of the wrappers in sm90.cuh");
  static constexpr int kStageLd = kBlockN + 8; // epilogue staging row, padded by 16 bytes
  static constexpr int kTileABytes = kBlockM * kBlockK * 2, kTileBBytes = kBlockN * kBlockK * 2;
  static constexpr size_t kStagingBytes = size_t(2) * kBlockM * kStageLd * sizeof(Element);
  static constexpr size_t kBarrierOffset =
      size_t(kStages) * (kTileABytes + kTileBBytes) + kStagingBytes;
  // + 1024: the dynamic shared memory's base is aligned up to the swizzle's 1024 bytes.
  static constexpr size_t kSmemBytes = kBarrierOffset + 2 * kStages * 8 + 1024;
  static constexpr int kProducerRegs = 120, kConsumerRegs = 192;
  static __device__ __forceinline__ void epilogue_barrier() {
    sm90::named_barrier_sync(1, kNThreads);
  }
};

// Where both kernels below keep their stages, epilogue staging and barriers: from the
// dynamic shared memory's base aligned up to the swizzle's 1024 bytes.
template <class Traits> struct StageSmem {
  unsigned char *a, *b;                 // kStages A tiles, kStages B tiles
  typename Traits::Element *staging;    // the epilogue's
  uint64_t *full, *empty;               // kStages each
  __device__ explicit StageSmem(unsigned char *raw) {
    unsigned char *base = sm90::align_1024(raw);
    a = base;
    b = a + Traits::kStages * Traits::kTileABytes;
    staging =
        reinterpret_cast<typename Traits::Element *>(b + Traits::kStages * Traits::kTileBBytes);
    full = reinterpret_cast<uint64_t *>(base + Traits::kBarrierOffset);
    empty = full + Traits::kStages;
  }
};

// The consumer warpgroups' side of both producers below: for each of this block's tiles
// (m-fastest), wait for each k-tile's stage, run its wgmma (one group kept in flight: a
// stage is released once the wgmma after it was issued and its own has retired), then the
// epilogue.
template <class Traits, class Epilogue, bool kAMn, bool kBMn>
__device__ __forceinline__ void consume_tiles(const typename Epilogue::Params &ep,
                                              const StageSmem<Traits> &sm, int k_tiles) {
#ifdef FK_SM90_DEVICE_CODE
  unsigned char *sA = sm.a, *sB = sm.b;
  uint64_t *full = sm.full, *empty = sm.empty;
  typename Traits::Element *staging = sm.staging;
  using Element = typename Traits::Element;
  constexpr int S = Traits::kStages, NT = Traits::kNTiles, BK = Traits::kBlockK;
  const int m_tiles = (ep.rows + Traits::kBlockM - 1) / Traits::kBlockM;
  const int tiles = m_tiles * ((ep.cols + Traits::kBlockN - 1) / Traits::kBlockN);
  const int wg = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int warp_m0 = wg * 64 + (warp % 4) * 16;
  int stage = 0;
  uint32_t phase = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int m0 = (tile % m_tiles) * Traits::kBlockM, n0 = (tile / m_tiles) * Traits::kBlockN;
    float acc[1][NT][4];
    float (&d)[NT * 4] = reinterpret_cast<float (&)[NT * 4]>(acc);
#pragma unroll
    for (int i = 0; i < NT * 4; ++i) d[i] = 0.f;
    int prev = -1; // the stage whose wgmma group may still be in flight
    for (int kt = 0; kt < k_tiles; ++kt) {
      sm90::mbarrier_wait(&full[stage], phase);
      // This warpgroup's 64 rows of A, and B; a k16 slice is 32 bytes along a K-major row
      // or 16 rows (2048 bytes) down an MN-major block (blocks 64 rows x 128 bytes apart).
      const unsigned char *a = sA + stage * Traits::kTileABytes + wg * 64 * 128;
      const unsigned char *b = sB + stage * Traits::kTileBBytes;
      const uint64_t da =
          kAMn ? sm90::make_smem_desc_sw128_mn(a, 64 * 128) : sm90::make_smem_desc_sw128(a);
      const uint64_t db =
          kBMn ? sm90::make_smem_desc_sw128_mn(b, 64 * 128) : sm90::make_smem_desc_sw128(b);
      constexpr uint32_t kStepA = kAMn ? 2048 : 32, kStepB = kBMn ? 2048 : 32;
      sm90::fence_registers(d);
      sm90::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < BK / 16; ++ks)
        sm90::wgmma_ss<Element, Traits::kBlockN, kAMn, kBMn>(
            d, sm90::advance_smem_desc(da, kStepA * ks), sm90::advance_smem_desc(db, kStepB * ks),
            1);
      sm90::wgmma_commit();
      sm90::wgmma_wait<1>(); // the previous k-tile's wgmma has retired: release its stage
      if (prev >= 0 && threadIdx.x % 128 == 0) sm90::mbarrier_arrive(&empty[prev]);
      prev = stage;
      if (++stage == S) stage = 0, phase ^= 1;
    }
    sm90::wgmma_wait<0>();
    sm90::fence_registers(d);
    if (prev >= 0 && threadIdx.x % 128 == 0) sm90::mbarrier_arrive(&empty[prev]);
    Traits::epilogue_barrier(); // the previous tile's stores have read the staging
    Epilogue::apply(acc, ep, staging, m0, n0, warp_m0, 0);
  }
#endif
}

enum class BLoad { kSingle, kGatedHalves, kStackedK };

// The tensor maps of A and B (B2: W3 when gated or stacked) travel by value as
// __grid_constant__.
template <class Traits, class Epilogue, bool kAMn, bool kBMn, BLoad kB>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1)
    tile_gemm_sm90_kernel(const __grid_constant__ CUtensorMap map_a,
                          const __grid_constant__ CUtensorMap map_b,
                          const __grid_constant__ CUtensorMap map_b2,
                          const typename Epilogue::Params ep, int k_total, int k_split) {
#ifdef FK_SM90_DEVICE_CODE
  constexpr int S = Traits::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const StageSmem<Traits> sm(smem_raw);
  unsigned char *sA = sm.a, *sB = sm.b;
  uint64_t *full = sm.full, *empty = sm.empty;

  const int m_tiles = (ep.rows + Traits::kBlockM - 1) / Traits::kBlockM;
  const int n_tiles = (ep.cols + Traits::kBlockN - 1) / Traits::kBlockN;
  const int tiles = m_tiles * n_tiles;
  constexpr int BK = Traits::kBlockK;
  static_assert(!(kB == BLoad::kGatedHalves && kBMn), "gated halves are K-major");
  // kStackedK: k-tiles [0, k_tiles1) over map_b, the rest over map_b2.
  const int k_first = kB == BLoad::kStackedK ? k_split : k_total;
  const int k_tiles1 = (k_first + BK - 1) / BK;
  const int k_tiles = k_tiles1 + (kB == BLoad::kStackedK ? (k_total - k_split + BK - 1) / BK : 0);
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) sm90::init_stage_barriers(full, empty, S, 1, Traits::kConsumers);
  __syncthreads();

  if (wg == Traits::kConsumers) { // producer
    sm90::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x % 128 == 0) {
      sm90::tma_prefetch_descriptor(&map_a);
      sm90::tma_prefetch_descriptor(&map_b);
      if (kB != BLoad::kSingle) sm90::tma_prefetch_descriptor(&map_b2);
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int m0 = (tile % m_tiles) * Traits::kBlockM, n0 = (tile / m_tiles) * Traits::kBlockN;
        for (int kt = 0; kt < k_tiles; ++kt) {
          sm90::mbarrier_wait(&empty[stage], phase ^ 1); // the consumers released it
          sm90::mbarrier_arrive_expect_tx(&full[stage], Traits::kTileABytes + Traits::kTileBBytes);
          // A's k, and B's k in the matrix it comes from.
          const bool second = kB == BLoad::kStackedK && kt >= k_tiles1;
          const int kb = (second ? kt - k_tiles1 : kt) * BK;
          const int ka = second ? k_split + kb : kb;
          unsigned char *a = sA + stage * Traits::kTileABytes;
          if (kAMn) { // 64-row blocks of M, each 64 k x 128 bytes
#pragma unroll
            for (int i = 0; i < Traits::kBlockM / 64; ++i)
              sm90::tma_load_2d(a + i * 64 * 128, &map_a, &full[stage], m0 + 64 * i, ka);
          } else {
            sm90::tma_load_2d(a, &map_a, &full[stage], ka, m0);
          }
          unsigned char *b = sB + stage * Traits::kTileBBytes;
          const CUtensorMap *mb = second ? &map_b2 : &map_b;
          if (kB == BLoad::kGatedHalves) {
            sm90::tma_load_2d(b, &map_b, &full[stage], kb, n0 / 2);
            sm90::tma_load_2d(b + Traits::kTileBBytes / 2, &map_b2, &full[stage], kb, n0 / 2);
          } else if (kBMn) {
#pragma unroll
            for (int i = 0; i < Traits::kBlockN / 64; ++i)
              sm90::tma_load_2d(b + i * 64 * 128, mb, &full[stage], n0 + 64 * i, kb);
          } else {
            sm90::tma_load_2d(b, mb, &full[stage], kb, n0);
          }
          if (++stage == S) stage = 0, phase ^= 1;
        }
      }
    }
    return;
  }

  // Consumers.
  sm90::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  consume_tiles<Traits, Epilogue, kAMn, kBMn>(ep, sm, k_tiles);
#endif
}

// Launches the persistent kernel: min(tiles, SMs) blocks of the producer + consumers.
// k_split: kStackedK's first part (ignored otherwise).
template <class Traits, class Epilogue, bool kAMn = false, bool kBMn = false,
          BLoad kB = BLoad::kSingle>
cudaError_t launch_tile_gemm_sm90(const CUtensorMap &map_a, const CUtensorMap &map_b,
                                  const CUtensorMap &map_b2, const typename Epilogue::Params &ep,
                                  int k_total, int device, cudaStream_t stream, int k_split = 0) {
  const int64_t tiles = int64_t((ep.rows + Traits::kBlockM - 1) / Traits::kBlockM) *
                        ((ep.cols + Traits::kBlockN - 1) / Traits::kBlockN);
  unsigned blocks;
  const cudaError_t err = persistent_blocks(tiles, device, blocks);
  if (err != cudaSuccess || blocks == 0) return err;
  return launch_kernel_sm90(tile_gemm_sm90_kernel<Traits, Epilogue, kAMn, kBMn, kB>, dim3(blocks),
                            dim3(Traits::kLaunchThreads), Traits::kSmemBytes, stream, map_a, map_b,
                            map_b2, ep, k_total, k_split);
}

// The sm80 core's loader policies (StridedLoader, conv's Im2colLoader, ...) as this
// mainloop's producer: the producer warpgroup's 128 threads gather each stage with cp.async
// (16-byte chunks into the 128-byte-swizzled tiles, element gathers where they must) and
// signal it with cp.async.mbarrier.arrive.noinc (the `full` barrier counts 128 arrivals).
// For operands TMA cannot describe, such as the implicit im2col matrix. Both K-major.
template <typename Element_> struct GatherLoaderTraits {
  using Element = Element_;
  static constexpr int kNThreads = 128;
  using Tile = SwizzledTile<64>;
};

template <class Traits, class ALoader, class BLoader, class Epilogue>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1)
    tile_gemm_sm90_gather_kernel(const typename ALoader::Operand a,
                                 const typename BLoader::Operand b,
                                 const typename Epilogue::Params ep, int k_total) {
#ifdef FK_SM90_DEVICE_CODE
  using Element = typename Traits::Element;
  constexpr int S = Traits::kStages, BK = Traits::kBlockK;
  // The gathering producer keeps its rows' offsets in registers (implicit im2col: 8 rows a
  // thread): 120 for it, 192 for the consumers (128 x 120 + 256 x 192 <= 64 K); at 104 the
  // implicit kernel spilled 88 bytes, at 72 up to 284.
  constexpr int kProducerRegs = 120, kConsumerRegs = 192;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const StageSmem<Traits> sm(smem_raw);
  unsigned char *sA = sm.a, *sB = sm.b;
  uint64_t *full = sm.full, *empty = sm.empty;
  const int m_tiles = (ep.rows + Traits::kBlockM - 1) / Traits::kBlockM;
  const int tiles = m_tiles * ((ep.cols + Traits::kBlockN - 1) / Traits::kBlockN);
  const int k_tiles = (k_total + BK - 1) / BK;

  if (threadIdx.x == 0) sm90::init_stage_barriers(full, empty, S, 128, Traits::kConsumers);
  __syncthreads();

  if (threadIdx.x / 128 == Traits::kConsumers) { // producer
    sm90::warpgroup_reg_dealloc<kProducerRegs>();
    const int tid = threadIdx.x % 128;
    int stage = 0;
    uint32_t phase = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int m0 = (tile % m_tiles) * Traits::kBlockM, n0 = (tile / m_tiles) * Traits::kBlockN;
      const ALoader load_a(a, m0, tid);
      const BLoader load_b(b, n0, tid);
      for (int kt = 0; kt < k_tiles; ++kt) {
        sm90::mbarrier_wait(&empty[stage], phase ^ 1);
        load_a.load(reinterpret_cast<Element *>(sA + stage * Traits::kTileABytes), kt * BK);
        load_b.load(reinterpret_cast<Element *>(sB + stage * Traits::kTileBBytes), kt * BK);
        sm90::fence_proxy_async_shared(); // the element gathers' plain stores, for wgmma
        sm90::cp_async_mbarrier_arrive_noinc(&full[stage]);
        if (++stage == S) stage = 0, phase ^= 1;
      }
    }
    return;
  }
  sm90::warpgroup_reg_alloc<kConsumerRegs>();
  consume_tiles<Traits, Epilogue, false, false>(ep, sm, k_tiles);
#endif
}

// Groups as the sm80 core's launch_tile_gemm has them: blockIdx.z is the group the loaders
// and epilogue offset by, each group a persistent slice of the grid (the SMs shared out).
template <class Traits, class ALoader, class BLoader, class Epilogue>
cudaError_t launch_tile_gemm_sm90_gather(const typename ALoader::Operand &a,
                                         const typename BLoader::Operand &b,
                                         const typename Epilogue::Params &ep, int k_total,
                                         int groups, int device, cudaStream_t stream) {
  const int64_t tiles = int64_t((ep.rows + Traits::kBlockM - 1) / Traits::kBlockM) *
                        ((ep.cols + Traits::kBlockN - 1) / Traits::kBlockN);
  unsigned blocks;
  const cudaError_t err = persistent_blocks(tiles, device, blocks, groups);
  if (err != cudaSuccess || blocks == 0) return err;
  return launch_kernel_sm90(tile_gemm_sm90_gather_kernel<Traits, ALoader, BLoader, Epilogue>,
                            dim3(blocks, 1, unsigned(groups)), dim3(Traits::kLaunchThreads),
                            Traits::kSmemBytes, stream, a, b, ep, k_total);
}

// Split-K on the gathering kernel (gemm_sm80.cuh's SplitKLoader around both loaders):
// groups = (the caller's groups) x splits, splits fastest in blockIdx.z.
template <class Traits, class ALoader, class BLoader, class Epilogue>
cudaError_t launch_tile_gemm_sm90_gather_split(const typename ALoader::Operand &a,
                                               const typename BLoader::Operand &b,
                                               const typename Epilogue::Params &ep, int k_split,
                                               int splits, int groups, int device,
                                               cudaStream_t stream) {
  return launch_tile_gemm_sm90_gather<Traits, SplitKLoader<ALoader>, SplitKLoader<BLoader>,
                                      Epilogue>({a, k_split, splits}, {b, k_split, splits}, ep,
                                                k_split, groups * splits, device, stream);
}

} // namespace gemm
} // namespace fk
