// Host-side launch helpers shared by the C entry points: a scoped device switch, a
// launcher that raises a kernel's dynamic shared-memory limit when it needs more than
// the default 48 KB, and what the run-time choice of the Hopper kernels asks of a device.
#pragma once

#include <cuda_runtime.h>

#include <stdlib.h>

#include <atomic>
#include <utility>

namespace fk {

// Launch on `device`, then give the calling thread its previous device back.
class DeviceGuard {
public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard &) = delete;
  DeviceGuard &operator=(const DeviceGuard &) = delete;
  cudaError_t status() const { return status_; }

private:
  int previous_ = 0;
  cudaError_t status_;
};

// Launch `kernel<<<grid, block, smem_bytes, stream>>>(args...)`. Above 48 KB of dynamic
// shared memory a kernel must opt in (cudaFuncAttributeMaxDynamicSharedMemorySize) first;
// the attribute is per device, so it is set on every call (it is cheap).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, Args &&...args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

// The same for the sm_90a kernels (up to 227 KB of shared memory; the CPU emulator holds the
// other kernels to the 99 KB of sm_86 / sm_89).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel_sm90(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                               size_t smem_bytes, cudaStream_t stream, Args &&...args) {
  return launch_kernel(kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
}

// Does `device` run the sm_90a kernels? Compute capability 9.0 exactly: sm_90a code runs on
// no other device. Asked of the driver once per device (every C entry asks): the answer is
// kept, a failed query is not (0 = not known yet, 1 = no, 2 = yes).
inline bool device_is_sm90(int device) {
  static std::atomic<unsigned char> known[64];
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const unsigned char k = known[device].load(std::memory_order_relaxed);
    if (k != 0) return k == 2;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  const bool sm90 = major == 9 && minor == 0;
  if (cached) known[device].store(sm90 ? 2 : 1, std::memory_order_relaxed);
  return sm90;
}

// Should the C entries take the sm_90a kernels on `device`? FLASHKERNELS_NO_SM90=1 keeps
// the sm80 path on Hopper too (to compare the two in one benchmark run).
inline bool use_sm90_kernels(int device) {
  const char *off = getenv("FLASHKERNELS_NO_SM90");
  return device_is_sm90(device) && !(off != nullptr && off[0] == '1');
}

// Multiprocessors of `device` (persistent grids), or 0 if it cannot be asked.
inline int device_sm_count(int device) {
  int n = 0;
  return cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess ? n : 0;
}

} // namespace fk
