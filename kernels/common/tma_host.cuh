// Host side of TMA: tensor maps (CUtensorMap) encoded through the driver's
// cuTensorMapEncodeTiled, found at run time with cudaGetDriverEntryPointByVersion so that
// nothing links libcuda (the Rust crate links only the static CUDA runtime). The CPU
// emulator replaces only driver_encode_tiled (tests/emulator/mock/tma_host.cuh), so the
// checks and encoders here are the ones it tests.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace fk {

// Can TMA describe a row-major matrix of 16-bit elements at `base` with row stride `ld`
// (elements)? The driver wants a 16-byte-aligned address and row strides that are
// multiples of 16 bytes below 2^40.
inline bool tma_matrix_ok(const void *base, int64_t ld, int64_t rows, int64_t cols) {
  return base != nullptr && reinterpret_cast<uintptr_t>(base) % 16 == 0 && ld % 8 == 0 &&
         ld >= cols && rows >= 1 && cols >= 1 && ld * 2 < (int64_t(1) << 40) &&
         rows <= (int64_t(1) << 32) && cols <= (int64_t(1) << 32);
}

// Can TMA describe a tensor of 16-bit elements at `base` whose dimensions past the innermost
// (unit-stride) one have these strides (elements)? 16-byte-aligned address and strides
// that are multiples of 16 bytes below 2^40.
inline bool tma_strides_ok(const void *base, int rank, const int64_t *strides) {
  if (base == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int i = 0; i < rank - 1; ++i)
    if (strides[i] <= 0 || strides[i] % 8 != 0 || strides[i] * 2 >= (int64_t(1) << 40))
      return false;
  return true;
}

// The driver's cuTensorMapEncodeTiled with the maps' fixed choices (16-bit elements, no
// interleave, 128-byte swizzle, zero fill), found once through the runtime. The CPU
// emulator defines FK_EMULATED_TMA_ENCODER and its own (tests/emulator/mock/tma_host.cuh).
#ifndef FK_EMULATED_TMA_ENCODER
inline cudaError_t driver_encode_tiled(CUtensorMap *map, const void *base, bool bf16,
                                       cuuint32_t rank, const cuuint64_t *dims,
                                       const cuuint64_t *strides, const cuuint32_t *box) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void *fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  const CUresult r =
      encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, rank,
             const_cast<void *>(base), dims, strides, box, elem_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}
#endif

// A map of a rank-`rank` (2..5) tensor of 16-bit elements: dims innermost first (dims[0]
// unit-stride), strides[i] (elements) of dims[i + 1]; boxes of box[i] elements, box[0] = 64
// (128 bytes: one swizzle span); 128-byte swizzle, zero fill outside. Checks the driver's
// rules first, so a refusal is cudaErrorInvalidValue before any driver call.
inline cudaError_t encode_map_sw128(CUtensorMap *map, const void *base, int rank,
                                    const int64_t *dims, const int64_t *strides,
                                    const uint32_t *box, bool bf16) {
  if (rank < 2 || rank > 5 || !tma_strides_ok(base, rank, strides) || box[0] != 64)
    return cudaErrorInvalidValue;
  cuuint64_t d[5], st[4];
  cuuint32_t bx[5];
  for (int i = 0; i < rank; ++i) {
    if (dims[i] < 1 || dims[i] > (int64_t(1) << 32) || box[i] < 1 || box[i] > 256)
      return cudaErrorInvalidValue;
    d[i] = cuuint64_t(dims[i]), bx[i] = box[i];
    if (i + 1 < rank) st[i] = cuuint64_t(strides[i]) * 2;
  }
  return driver_encode_tiled(map, base, bf16, cuuint32_t(rank), d, st, bx);
}

// A 2-D map of the (rows x cols, row stride ld) matrix of 16-bit elements, boxes of
// box_rows x 64 elements.
inline cudaError_t encode_matrix_map_sw128(CUtensorMap *map, const void *base, int64_t rows,
                                           int64_t cols, int64_t ld, int box_rows, bool bf16) {
  if (!tma_matrix_ok(base, ld, rows, cols) || box_rows < 1 || box_rows > 256)
    return cudaErrorInvalidValue;
  const int64_t dims[2] = {cols, rows}, strides[1] = {ld};
  const uint32_t box[2] = {64, uint32_t(box_rows)};
  return encode_map_sw128(map, base, 2, dims, strides, box, bf16);
}

} // namespace fk
