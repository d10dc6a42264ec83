// Stands in for kernels/common/launch.cuh when build.rs compiles kernels/ for the Rust
// crate's `emulator` feature (the emulated device; see rust/device/emulated.rs). It is the
// emulator's own mock (tests/emulator/mock/launch.cuh: a launch runs the grid on the CPU
// emulator, synchronously) with one addition: launches are serialized. The emulator keeps
// its state (current fiber, shared memory, scheduler) in globals, and Rust tests launch
// from several threads at once; a launch runs its whole grid before it returns, so one lock
// around each launch is all the device needs.
#pragma once

#include <mutex>
#include <utility>

#define launch_kernel emu_unserialized_launch_kernel
#define launch_kernel_sm90 emu_unserialized_launch_kernel_sm90
#include "mock/launch.cuh"
#undef launch_kernel
#undef launch_kernel_sm90

namespace fk {

inline std::mutex &emu_device_mutex() {
  static std::mutex m;
  return m;
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                          size_t smem_bytes, cudaStream_t stream, Args &&...args) {
  std::lock_guard<std::mutex> lock(emu_device_mutex());
  return emu_unserialized_launch_kernel(kernel, grid, block, smem_bytes, stream,
                                        std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel_sm90(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                               size_t smem_bytes, cudaStream_t stream, Args &&...args) {
  std::lock_guard<std::mutex> lock(emu_device_mutex());
  return emu_unserialized_launch_kernel_sm90(kernel, grid, block, smem_bytes, stream,
                                             std::forward<Args>(args)...);
}

} // namespace fk
