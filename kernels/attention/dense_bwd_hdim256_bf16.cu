// Instantiation: dense attention backward, padded head dim 256, bf16 (one file per pair so
// nvcc compiles them in parallel).
#include "dense_bwd_sm80.cuh"
#include "dense_bwd_sm90.cuh"

namespace fk {
template cudaError_t run_dense_bwd_sm80<256, __nv_bfloat16, false>(const fk_attention_bwd_params &,
                                                                   cudaStream_t);
template cudaError_t run_dense_bwd_sm80<256, __nv_bfloat16, true>(const fk_attention_bwd_params &,
                                                                  cudaStream_t);
template cudaError_t run_dense_bwd_sm90<256, __nv_bfloat16, false>(const fk_attention_bwd_params &,
                                                                   cudaStream_t);
template cudaError_t run_dense_bwd_sm90<256, __nv_bfloat16, true>(const fk_attention_bwd_params &,
                                                                  cudaStream_t);
} // namespace fk
