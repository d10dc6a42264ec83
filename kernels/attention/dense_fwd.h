// Declarations of the dense attention forward implementations. Each (padded head dim, dtype)
// pair is instantiated in its own .cu file so nvcc compiles them in parallel; the
// C entry point (dense_fwd_api.cu) sees only these declarations.
#pragma once

#include <cuda_runtime.h>

#include "../include/flashkernels.h"

namespace fk {

// mma.sync + cp.async path, sm_80 and newer (Ampere, Ada, and Hopper where the sm_90a
// path does not apply).
template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_fwd_sm80(const fk_attention_fwd_params &params, cudaStream_t stream);

// TMA + wgmma path (dense_fwd_sm90.cuh), head dims padded to 64, 128 or 256, for a compute
// capability 9.0 device (use_sm90_kernels) and params that dense_fwd_sm90_eligible accepts.
template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_fwd_sm90(const fk_attention_fwd_params &params, cudaStream_t stream);
bool dense_fwd_sm90_eligible(const fk_attention_fwd_params &params);

} // namespace fk
