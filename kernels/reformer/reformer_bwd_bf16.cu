// Instantiation: Reformer's LSH attention backward, bf16 (one file per dtype so nvcc compiles
// them in parallel).
#include "reformer_bwd_sm80.cuh"

namespace fk {
namespace reformer {
template cudaError_t bwd<__nv_bfloat16>(const fk_reformer_bwd_params &, cudaStream_t);
} // namespace reformer
} // namespace fk
