// Stands in for kernels/common/launch.cuh in the emulator's build (scripts/
// emulate_kernels.sh links it in as emulated/common/launch.cuh): same interface, but a
// launch runs the grid on the CPU emulator, synchronously. One device, nothing to switch.
// The device is sm_80-class, or with EMU_ARCH=sm90 a Hopper one (the C entries then take
// their sm_90a kernels, which the emulator runs through mock/sm90.cuh) with 3
// multiprocessors, so that persistent grids walk several tiles per block.
#pragma once
#include "emu.h"

#include <utility>

namespace fk {

class DeviceGuard {
public:
  explicit DeviceGuard(int) {}
  cudaError_t status() const { return cudaSuccess; }
};

inline int g_emu_launches = 0;      // for tests that check a launch did or did not happen
inline int g_emu_sm90_launches = 0; // ... and which path a C entry took

template <typename... KernelArgs, typename... Args>
cudaError_t emu_launch_kernel(size_t smem_limit, void (*kernel)(KernelArgs...), dim3 grid,
                              dim3 block, size_t smem_bytes, Args &&...args) {
  // What the real launch would refuse (or what no GPU could run).
  if (smem_bytes > smem_limit) return cudaErrorInvalidValue;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  ++g_emu_launches;
  emu::launch(grid, block, smem_bytes, [&] { kernel(args...); });
  return cudaSuccess;
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t, Args &&...args) {
  return emu_launch_kernel(kEmuMaxSmem, kernel, grid, block, smem_bytes,
                           std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel_sm90(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                               size_t smem_bytes, cudaStream_t, Args &&...args) {
  if (!emu::g_sm90) return cudaErrorInvalidDeviceFunction; // sm_90a code on another device
  ++g_emu_sm90_launches;
  return emu_launch_kernel(kEmuMaxSmemSm90, kernel, grid, block, smem_bytes,
                           std::forward<Args>(args)...);
}

inline bool device_is_sm90(int) { return emu::g_sm90; }
inline bool use_sm90_kernels(int device) {
  const char *off = getenv("FLASHKERNELS_NO_SM90");
  return device_is_sm90(device) && !(off != nullptr && off[0] == '1');
}
inline int device_sm_count(int) { return 3; }

// Runs `body` on an emulated Hopper device (or, sm90 = false, an sm_80-class one), then
// restores the device kind; returns how many sm_90a kernels it launched: the suites' check
// that a C entry took the Hopper path exactly where it applies.
template <class F> int sm90_launches_of(bool sm90, F &&body) {
  const bool previous = emu::g_sm90;
  const int before = g_emu_sm90_launches;
  emu::g_sm90 = sm90;
  body();
  emu::g_sm90 = previous;
  return g_emu_sm90_launches - before;
}

} // namespace fk
