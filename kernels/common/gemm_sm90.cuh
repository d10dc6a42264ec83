// Hopper (sm_90a) mainloop of the tile GEMM core, beside gemm_sm80.cuh's: per output tile
//
//   out[m, n] = epilogue(sum_k A[m, k] B[n, k]),   A: M x K, B: N x K, both row-major (K-major)
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
// barrier over the consumers. One group (blockIdx.z == 0) per launch.
// Gated B (kGatedB): the B tile's first BN / 2 rows come from one matrix (W1) and the last
// BN / 2 from another (W3) at the same rows, so n-tiles j and j + kNTiles / 2 of each thread
// hold the same (row, hidden unit) of both products.
#pragma once

#include "launch.cuh"
#include "sm90.cuh"

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
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static __device__ __forceinline__ void epilogue_barrier() {
    sm90::named_barrier_sync(1, kNThreads);
  }
};

// The tensor maps of A and B (B2: W3 when gated) travel by value as __grid_constant__.
template <class Traits, class Epilogue, bool kGatedB>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1)
    tile_gemm_sm90_kernel(const __grid_constant__ CUtensorMap map_a,
                          const __grid_constant__ CUtensorMap map_b,
                          const __grid_constant__ CUtensorMap map_b2,
                          const typename Epilogue::Params ep, int k_total) {
#ifdef FK_SM90_DEVICE_CODE
  using Element = typename Traits::Element;
  constexpr int S = Traits::kStages, NT = Traits::kNTiles;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char *base = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  unsigned char *sA = base;
  unsigned char *sB = sA + S * Traits::kTileABytes;
  Element *staging = reinterpret_cast<Element *>(sB + S * Traits::kTileBBytes);
  uint64_t *full = reinterpret_cast<uint64_t *>(base + Traits::kBarrierOffset);
  uint64_t *empty = full + S;

  const int m_tiles = (ep.rows + Traits::kBlockM - 1) / Traits::kBlockM;
  const int n_tiles = (ep.cols + Traits::kBlockN - 1) / Traits::kBlockN;
  const int tiles = m_tiles * n_tiles;
  const int k_tiles = (k_total + Traits::kBlockK - 1) / Traits::kBlockK;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      sm90::mbarrier_init(&empty[s], Traits::kConsumers);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  if (wg == Traits::kConsumers) { // producer
    sm90::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x % 128 == 0) {
      sm90::tma_prefetch_descriptor(&map_a);
      sm90::tma_prefetch_descriptor(&map_b);
      if (kGatedB) sm90::tma_prefetch_descriptor(&map_b2);
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int m0 = (tile % m_tiles) * Traits::kBlockM, n0 = (tile / m_tiles) * Traits::kBlockN;
        for (int kt = 0; kt < k_tiles; ++kt) {
          sm90::mbarrier_wait(&empty[stage], phase ^ 1); // the consumers released it
          sm90::mbarrier_arrive_expect_tx(&full[stage], Traits::kTileABytes + Traits::kTileBBytes);
          const int k0 = kt * Traits::kBlockK;
          sm90::tma_load_2d(sA + stage * Traits::kTileABytes, &map_a, &full[stage], k0, m0);
          unsigned char *b = sB + stage * Traits::kTileBBytes;
          if (kGatedB) {
            sm90::tma_load_2d(b, &map_b, &full[stage], k0, n0 / 2);
            sm90::tma_load_2d(b + Traits::kTileBBytes / 2, &map_b2, &full[stage], k0, n0 / 2);
          } else {
            sm90::tma_load_2d(b, &map_b, &full[stage], k0, n0);
          }
          if (++stage == S) stage = 0, phase ^= 1;
        }
      }
    }
    return;
  }

  // Consumers.
  sm90::warpgroup_reg_alloc<Traits::kConsumerRegs>();
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
      const uint64_t da =
          sm90::make_smem_desc_sw128(sA + stage * Traits::kTileABytes + wg * 64 * 128);
      const uint64_t db = sm90::make_smem_desc_sw128(sB + stage * Traits::kTileBBytes);
      sm90::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < Traits::kBlockK / 16; ++ks)
        sm90::wgmma_ss<Element, Traits::kBlockN>(d, sm90::advance_smem_desc(da, 32 * ks),
                                                 sm90::advance_smem_desc(db, 32 * ks), 1);
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

// Launches the persistent kernel: min(tiles, SMs) blocks of the producer + consumers.
template <class Traits, class Epilogue, bool kGatedB = false>
cudaError_t launch_tile_gemm_sm90(const CUtensorMap &map_a, const CUtensorMap &map_b,
                                  const CUtensorMap &map_b2, const typename Epilogue::Params &ep,
                                  int k_total, int device, cudaStream_t stream) {
  const int64_t tiles = int64_t((ep.rows + Traits::kBlockM - 1) / Traits::kBlockM) *
                        ((ep.cols + Traits::kBlockN - 1) / Traits::kBlockN);
  if (tiles == 0) return cudaSuccess;
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue; // the kernel counts tiles in int
  const int sms = device_sm_count(device);
  if (sms <= 0) return cudaErrorInvalidDevice;
  const unsigned blocks = unsigned(tiles < sms ? tiles : sms);
  return launch_kernel_sm90(tile_gemm_sm90_kernel<Traits, Epilogue, kGatedB>, dim3(blocks),
                            dim3(Traits::kLaunchThreads), Traits::kSmemBytes, stream, map_a, map_b,
                            map_b2, ep, k_total);
}

} // namespace gemm
} // namespace fk
