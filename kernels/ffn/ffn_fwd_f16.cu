// Instantiation: the feed-forward forward, f16 (one file per dtype so nvcc compiles them in
// parallel).
#include "ffn_sm90.cuh"

namespace fk {
namespace ffn {
template cudaError_t ffn_fwd<__half>(const fk_ffn_params &, cudaStream_t);
template cudaError_t ffn_fwd_sm90<__half>(const fk_ffn_params &, cudaStream_t);
} // namespace ffn
} // namespace fk
