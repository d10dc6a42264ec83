// Stands in for kernels/common/tma_host.cuh in the emulator's build: the real header is
// included (its tma_matrix_ok / tma_strides_ok are the ones under test) with the encoders
// renamed out of the way; the encoder below checks what cuTensorMapEncodeTiled checks for
// the maps the kernels ask for and stores the map in the CUtensorMap's 128 bytes, where
// mock/sm90.cuh's TMA emulation reads it.
#pragma once
#include "emu.h"

#define encode_map_sw128 driver_encode_map_sw128
#define encode_matrix_map_sw128 driver_encode_matrix_map_sw128
#include "kernels/common/tma_host.cuh"
#undef encode_map_sw128
#undef encode_matrix_map_sw128

namespace emu {

// What the emulated CUtensorMap holds (16-bit elements).
struct TensorMap {
  uint64_t magic;
  const unsigned char *base;
  int rank;
  uint64_t dims[5];    // elements, innermost first
  uint64_t strides[4]; // bytes: strides[i - 1] is dim i's (dim 0 is contiguous)
  uint32_t box[5];     // elements
  int swizzle_bytes;   // 0 (none), 32, 64, 128
  int elem_bytes;
};
constexpr uint64_t kTensorMapMagic = 0x544d41505f454d55ull; // "UME_PAMT"
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "fits the opaque map");

inline const TensorMap &tensor_map(const CUtensorMap *m) {
  const TensorMap *t = reinterpret_cast<const TensorMap *>(m);
  if (t->magic != kTensorMapMagic) fail("TMA with a tensor map that was never encoded");
  return *t;
}

} // namespace emu

namespace fk {

inline cudaError_t encode_map_sw128(CUtensorMap *map, const void *base, int rank,
                                    const int64_t *dims, const int64_t *strides,
                                    const uint32_t *box, bool) {
  // The driver's rules (cuTensorMapEncodeTiled) for the maps asked for here: a 16-byte-
  // aligned address, strides that are multiples of 16 bytes below 2^40, dims in
  // [1, 2^32], box dims in [1, 256], the box's inner extent (64 elements, 128 bytes) at
  // most the swizzle span.
  if (rank < 2 || rank > 5 || !tma_strides_ok(base, rank, strides) || box[0] != 64)
    return cudaErrorInvalidValue;
  emu::TensorMap t{};
  t.magic = emu::kTensorMapMagic;
  t.base = static_cast<const unsigned char *>(base);
  t.rank = rank;
  for (int i = 0; i < rank; ++i) {
    if (dims[i] < 1 || dims[i] > (int64_t(1) << 32) || box[i] < 1 || box[i] > 256)
      return cudaErrorInvalidValue;
    t.dims[i] = uint64_t(dims[i]);
    t.box[i] = box[i];
    if (i > 0) {
      if ((strides[i - 1] * 2) % 16 || strides[i - 1] * 2 >= (int64_t(1) << 40))
        emu::fail("tma_strides_ok accepted a stride the driver refuses");
      t.strides[i - 1] = uint64_t(strides[i - 1]) * 2;
    }
  }
  if (reinterpret_cast<uintptr_t>(base) % 16) emu::fail("tma_strides_ok accepted a misaligned base");
  t.swizzle_bytes = 128;
  t.elem_bytes = 2;
  memset(map, 0, sizeof *map);
  memcpy(map, &t, sizeof t);
  return cudaSuccess;
}

// The real one's body, over the emulated encoder.
inline cudaError_t encode_matrix_map_sw128(CUtensorMap *map, const void *base, int64_t rows,
                                           int64_t cols, int64_t ld, int box_rows, bool bf16) {
  if (!tma_matrix_ok(base, ld, rows, cols) || box_rows < 1 || box_rows > 256)
    return cudaErrorInvalidValue;
  const int64_t dims[2] = {cols, rows}, strides[1] = {ld};
  const uint32_t box[2] = {64, uint32_t(box_rows)};
  return encode_map_sw128(map, base, 2, dims, strides, box, bf16);
}

} // namespace fk
