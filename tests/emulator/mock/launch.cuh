// Stands in for kernels/common/launch.cuh in the emulator's build (scripts/
// emulate_kernels.sh links it in as emulated/common/launch.cuh): same interface, but a
// launch runs the grid on the CPU emulator, synchronously. One device, nothing to switch.
#pragma once
#include "emu.h"

#include <utility>

namespace fk {

class DeviceGuard {
public:
  explicit DeviceGuard(int) {}
  cudaError_t status() const { return cudaSuccess; }
};

inline int g_emu_launches = 0; // for tests that check a launch did or did not happen

template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                          size_t smem_bytes, cudaStream_t, Args &&...args) {
  // What the real launch would refuse (or what no GPU could run).
  if (smem_bytes > kEmuMaxSmem) return cudaErrorInvalidValue;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  ++g_emu_launches;
  emu::launch(grid, block, smem_bytes, [&] { kernel(args...); });
  return cudaSuccess;
}

} // namespace fk
