// Internal interface of the fused feed-forward block: the launcher ffn_api.cu dispatches
// to, instantiated per dtype in its own translation unit so nvcc compiles them in
// parallel.
#pragma once

#include <cuda_runtime.h>

#include "../include/fk_ffn.h"

namespace fk {
namespace ffn {

// Both GEMMs of the forward (params checked by the C entry, tokens > 0).
template <typename T> cudaError_t ffn_fwd(const fk_ffn_params &p, cudaStream_t stream);

} // namespace ffn
} // namespace fk
