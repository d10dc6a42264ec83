// Host-side launch helpers shared by the C entry points: a scoped device switch and a
// launcher that raises a kernel's dynamic shared-memory limit when it needs more than
// the default 48 KB.
#pragma once

#include <cuda_runtime.h>

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

} // namespace fk
