// Instantiation: Reformer's LSH attention forward, f16 (one file per dtype so nvcc compiles
// them in parallel).
#include "reformer_sm80.cuh"

namespace fk {
namespace reformer {
template cudaError_t fwd<__half>(const fk_reformer_fwd_params &, cudaStream_t);
} // namespace reformer
} // namespace fk
