// Stands in for kernels/common/tma_host.cuh in the emulator's build: the real header is
// included (its checks and encoders are the ones under test) with the driver call below
// in place of cuTensorMapEncodeTiled: it checks the driver's rules and stores the map in the
// CUtensorMap's 128 bytes, where mock/sm90.cuh's TMA emulation reads it.
#pragma once
#include "emu.h"

#include <cuda.h>
#include <cudaTypedefs.h>

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

// cuTensorMapEncodeTiled as the emulator's: what the driver checks of the maps asked for
// (16-byte-aligned address, strides multiples of 16 bytes below 2^40, dims in [1, 2^32],
// box dims in [1, 256], the box's inner extent at most the 128-byte swizzle span), then the
// map stored in the CUtensorMap's 128 bytes. encode_map_sw128 (the real one) checks these
// rules itself first; one that reaches here broken is a bug in it.
inline cudaError_t driver_encode_tiled(CUtensorMap *map, const void *base, bool, cuuint32_t rank,
                                       const cuuint64_t *dims, const cuuint64_t *strides,
                                       const cuuint32_t *box) {
  if (reinterpret_cast<uintptr_t>(base) % 16) emu::fail("tensor map of a misaligned base");
  if (rank < 2 || rank > 5) emu::fail("tensor map rank out of 2..5");
  if (box[0] * 2 > 128) emu::fail("tensor map box wider than its swizzle span");
  emu::TensorMap t{};
  t.magic = emu::kTensorMapMagic;
  t.base = static_cast<const unsigned char *>(base);
  t.rank = int(rank);
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dims[i] < 1 || dims[i] > (1ull << 32) || box[i] < 1 || box[i] > 256)
      emu::fail("tensor map dims or box out of range");
    t.dims[i] = dims[i];
    t.box[i] = box[i];
    if (i > 0) {
      if (strides[i - 1] % 16 || strides[i - 1] >= (1ull << 40))
        emu::fail("tensor map stride not a multiple of 16 bytes below 2^40");
      t.strides[i - 1] = strides[i - 1];
    }
  }
  t.swizzle_bytes = 128;
  t.elem_bytes = 2;
  memset(map, 0, sizeof *map);
  memcpy(map, &t, sizeof t);
  return cudaSuccess;
}

} // namespace fk

#define FK_EMULATED_TMA_ENCODER 1
#include "kernels/common/tma_host.cuh"
