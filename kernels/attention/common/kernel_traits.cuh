// Tile configuration of the attention forward kernels (sm_80+): the dense forward
// (dense_fwd_sm80.cuh) and the Longformer forward (longformer_fwd_sm80.cuh) take the same
// traits, each with its own per-head-dim choice of them.
#pragma once

#include <stddef.h>

#include "../../common/mma_sm80.cuh"

namespace fk {

// A block of kNWarps warps owns kBlockM query rows; a warp owns kMTiles 16-row MMA tiles
// of them for the whole kernel (softmax statistics never leave registers) and visits
// kBlockN keys per step. With kMTiles = 2 every K/V fragment read from shared memory
// (ldmatrix) feeds two MMAs, halving the shared-memory traffic per FLOP, which is what
// bounds the 1-tile version; the cost is twice the accumulator registers, so Q is then
// re-read from shared memory each key block instead of living in registers (kQInRegs).
// Shared memory: Q, then two stages of K and two of V.
template <int kHeadDim_, typename Element_, int kMTiles_, int kNWarps_, int kBlockN_,
          int kMinBlocksPerSm_, bool kQInRegs_>
struct AttnFwdTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kNWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr bool kQInRegs = kQInRegs_;
  static_assert(!kQInRegs || kMTiles == 1, "Q lives in registers only with one m-tile");
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  using Tile = SwizzledTile<kHeadDim>;
  static constexpr int kSmemQ = kBlockM * kHeadDim;  // elements
  static constexpr int kSmemKV = kBlockN * kHeadDim; // elements, one K or V stage
  static constexpr size_t kSmemBytes = size_t(kSmemQ + 4 * kSmemKV) * sizeof(Element);
};

} // namespace fk
