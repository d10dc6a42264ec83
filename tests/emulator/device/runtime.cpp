// The host side of the emulated device (the Rust crate's `emulator` feature, see
// rust/device/emulated.rs): what the kernels' C entry files need of the CUDA runtime, and
// device memory for the Rust layer.
//
// - The runtime calls the entry files (and the real launch.cuh) make, answered for one
//   device, 0. Kernel launches themselves go through tests/emulator/device/launch.cuh.
// - Device memory is emu::DeviceArray, the emulator's own global memory: one allocation
//   per buffer whose end is exactly the end of the data (ASan build: an exact heap block;
//   otherwise it touches a PROT_NONE page, and the few bytes of rounding hold a canary
//   checked when the buffer is freed), so a kernel reading past a tensor faults and one
//   writing past it is reported. Fresh memory is 0xFF bytes (NaN in f32 / f16 / bf16, -1
//   in int32), never zeros: what cudaMalloc returns is garbage, and nothing may rely on it.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "launch.cuh"

namespace {

constexpr unsigned char kPoison = 0xFF;
int g_device = 0;

} // namespace

const char *cudaGetErrorString(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "no error";
  case cudaErrorInvalidValue: return "invalid argument";
  case cudaErrorMemoryAllocation: return "out of memory";
  case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  case cudaErrorInvalidDevice: return "invalid device ordinal";
  case cudaErrorNotSupported: return "operation not supported";
  default: return "unrecognized error code (flashkernels CPU emulator)";
  }
}

const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "cudaSuccess";
  case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
  case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
  default: return "cudaErrorUnknown";
  }
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }

cudaError_t cudaGetDevice(int *device) {
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  g_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int *count) {
  if (count == nullptr) return cudaErrorInvalidValue;
  *count = 1;
  return cudaSuccess;
}

// The dynamic shared-memory opt-in: the emulator's limit is the strictest GPU's (99 KB).
cudaError_t cudaFuncSetAttribute(const void *, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize &&
      (value < 0 || size_t(value) > fk::kEmuMaxSmem))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

// An sm_80-class device (what the emulator emulates) with 132 SMs (an H100/H200's count,
// the one the host-side plans are tuned for).
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
  if (value == nullptr || device != 0) return cudaErrorInvalidValue;
  switch (attr) {
  case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
  case cudaDevAttrComputeCapabilityMajor: *value = 8; return cudaSuccess;
  case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
  case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(fk::kEmuMaxSmem); return cudaSuccess;
  case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
  default: return cudaErrorInvalidValue;
  }
}

// Device memory for the Rust layer (rust/device/emulated.rs).
extern "C" {

// `bytes` of poisoned device memory at *ptr; returns the handle to free, or null when
// out of memory. Aligned to 256 bytes like cudaMalloc when `bytes` is a multiple of 256 (then
// nothing lies between the end and the guard), otherwise to 16 (the most a kernel may
// assume of a tensor; at most 15 bytes of canary before the guard).
void *fk_emu_alloc(size_t bytes, void **ptr) {
  if (ptr == nullptr) return nullptr;
  const size_t align = bytes % 256 == 0 ? 256 : 16;
  auto *a = new (std::nothrow) emu::DeviceArray<unsigned char>(bytes, kPoison, align);
  if (a == nullptr) return nullptr;
  *ptr = a->data();
  return a;
}

// Frees what fk_emu_alloc returned (aborts with a message when a kernel wrote past the end).
void fk_emu_free(void *handle) { delete static_cast<emu::DeviceArray<unsigned char> *>(handle); }

// How many kernels the emulator has run (all threads).
int64_t fk_emu_launch_count(void) {
  std::lock_guard<std::mutex> lock(fk::emu_device_mutex());
  return fk::g_emu_launches;
}

} // extern "C"
