// Declarations of the Longformer backward implementations (longformer_bwd_sm80.cuh),
// instantiated per dtype in longformer_bwd_{f16,bf16}.cu; the C entry points
// (longformer_bwd_api.cu) see only these.
#pragma once

#include <cuda_runtime.h>

#include "../include/fk_longformer.h"

namespace fk {

// Step 1: Delta of every token.
template <typename Element>
cudaError_t run_longformer_bwd_delta_sm80(const fk_longformer_bwd_params &params,
                                          cudaStream_t stream);
// dQ of pass LOCAL (packed global keys with k_rows) or GLOBAL_ROWS (num_splits > 1: then
// the reduce too); kHeadDim is the padded head dim (64 or 128).
template <int kHeadDim, typename Element>
cudaError_t run_longformer_bwd_dq_sm80(const fk_longformer_bwd_params &params, cudaStream_t stream);
// dK, dV of pass LOCAL_BAND, GLOBAL_COLS (num_splits > 1: then the reduce too) or
// GLOBAL_ROWS.
template <int kHeadDim, typename Element>
cudaError_t run_longformer_bwd_dkdv_sm80(const fk_longformer_bwd_params &params,
                                         cudaStream_t stream);

} // namespace fk
