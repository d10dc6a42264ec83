// The size of a persistent grid (the Hopper kernels' tile schedulers), from the device's
// multiprocessors as launch.cuh reports them (the emulator's launch.cuh: 3).
#pragma once

#include "launch.cuh"

#include <stdint.h>

namespace fk {

// A persistent grid for `tiles` tiles of each of `groups` slices (blockIdx.z): min(tiles,
// multiprocessors / groups rounded up) blocks a slice, 0 when there is nothing to do; an
// error when the kernels' int tile counter, the grid's z or the device query fails.
inline cudaError_t persistent_blocks(int64_t tiles, int device, unsigned &blocks, int groups = 1) {
  blocks = 0;
  if (tiles <= 0 || groups == 0) return cudaSuccess;
  // The kernels count tiles in int; gridDim.z is at most 65535.
  if (tiles > 0x7fffffff || groups < 0 || groups > 65535) return cudaErrorInvalidValue;
  const int sms = device_sm_count(device);
  if (sms <= 0) return cudaErrorInvalidDevice;
  const int per_group = (sms + groups - 1) / groups;
  blocks = unsigned(tiles < per_group ? tiles : per_group);
  return cudaSuccess;
}

} // namespace fk
