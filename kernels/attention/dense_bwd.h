// Declarations of the dense attention backward implementations. Each (padded head dim,
// dtype) pair is instantiated in its own .cu file so nvcc compiles them in parallel; the
// C entry point (dense_bwd_api.cu) sees only these declarations.
#pragma once

#include <cuda_runtime.h>

#include "../include/flashkernels.h"

namespace fk {

// mma.sync + cp.async path, sm_80 and newer. kHeadDim is the padded head dim (64, 128 or
// 256; params.head_dim may be any multiple of 8 up to it). kHasMask: a window side is
// bounded (window_left >= 0 or window_right >= 0; causal included).
template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_bwd_sm80(const fk_attention_bwd_params &params, cudaStream_t stream);
// Hopper (dense_bwd_sm90.cuh): dK / dV and dQ on TMA + wgmma, Delta as above; head dims
// padded to 64 or 128, for a compute capability 9.0 device (use_sm90_kernels) and params
// that dense_bwd_sm90_eligible accepts.
template <int kHeadDim, typename Element, bool kHasMask>
cudaError_t run_dense_bwd_sm90(const fk_attention_bwd_params &params, cudaStream_t stream);
bool dense_bwd_sm90_eligible(const fk_attention_bwd_params &params);

} // namespace fk
