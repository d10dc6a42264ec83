// Instantiation: the feed-forward forward, bf16 (one file per dtype so nvcc compiles them in
// parallel).
#include "ffn_sm90.cuh"

namespace fk {
namespace ffn {
template cudaError_t ffn_fwd<__nv_bfloat16>(const fk_ffn_params &, cudaStream_t);
template cudaError_t ffn_fwd_sm90<__nv_bfloat16>(const fk_ffn_params &, cudaStream_t);
} // namespace ffn
} // namespace fk
