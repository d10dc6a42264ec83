// Instantiation: the feed-forward backward, f16 (one file per dtype so nvcc compiles them
// in parallel).
#include "ffn_bwd_sm90.cuh"

namespace fk {
namespace ffn {
template cudaError_t ffn_bwd<__half>(const fk_ffn_bwd_params &, cudaStream_t);
template cudaError_t ffn_bwd_sm90<__half>(const fk_ffn_bwd_params &, cudaStream_t);
} // namespace ffn
} // namespace fk
