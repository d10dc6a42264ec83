// Instantiation: the feed-forward backward, bf16 (one file per dtype so nvcc compiles them
// in parallel).
#include "ffn_bwd_sm90.cuh"

namespace fk {
namespace ffn {
template cudaError_t ffn_bwd<__nv_bfloat16>(const fk_ffn_bwd_params &, cudaStream_t);
template cudaError_t ffn_bwd_sm90<__nv_bfloat16>(const fk_ffn_bwd_params &, cudaStream_t);
} // namespace ffn
} // namespace fk
