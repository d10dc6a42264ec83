// Declarations of the Longformer forward implementations, instantiated per dtype in
// longformer_fwd_{f16,bf16}.cu; the C entry point (longformer_fwd_api.cu) sees only these.
#pragma once

#include <cuda_runtime.h>

#include "../include/fk_longformer.h"

namespace fk {

template <int kHeadDim, typename Element>
cudaError_t run_longformer_fwd_sm80(const fk_longformer_fwd_params &params, cudaStream_t stream);

} // namespace fk
