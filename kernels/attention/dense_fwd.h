// Declarations of the dense attention forward implementations. Each (padded head dim, dtype)
// pair is instantiated in its own .cu file so nvcc compiles them in parallel; the
// C entry point (dense_fwd_api.cu) sees only these declarations.
#pragma once

#include <cuda_runtime.h>

#include "../include/flashkernels.h"

namespace fk {

// mma.sync + cp.async path, sm_80 and newer (Ampere, Ada, and Hopper until a wgmma path
// is added beside it).
template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_fwd_sm80(const fk_attention_fwd_params &params, cudaStream_t stream);

} // namespace fk
