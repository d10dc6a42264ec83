// What every Hopper kernel's shared-memory pipeline starts with (attention and the tile
// GEMM): the 1024-byte-aligned base the 128-byte swizzle needs, and the full / empty
// mbarrier pairs of its stages. Built on sm90.cuh's primitives (so the emulator's stand-ins
// for those run these too).
#pragma once

#include "sm90.cuh"

namespace fk {
namespace sm90 {

// The dynamic shared memory's base aligned up to the swizzle's 1024 bytes (kernels reserve
// 1024 bytes more than they use).
__device__ __forceinline__ unsigned char *align_1024(unsigned char *smem) {
  return smem + ((1024 - smem_addr(smem) % 1024) % 1024);
}

// `stages` pairs: full[s] completes after full_arrivals arrivals (and the bytes they expect),
// empty[s] after empty_arrivals (one per consumer). One thread calls it, before the block's
// first barrier.
__device__ __forceinline__ void init_stage_barriers(uint64_t *full, uint64_t *empty, int stages,
                                                    uint32_t full_arrivals,
                                                    uint32_t empty_arrivals) {
  for (int s = 0; s < stages; ++s) {
    mbarrier_init(&full[s], full_arrivals);
    mbarrier_init(&empty[s], empty_arrivals);
  }
  fence_barrier_init();
}

} // namespace sm90
} // namespace fk
