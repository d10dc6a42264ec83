// Instantiation: Longformer backward, bf16, head dims padded to 64 and 128.
#include "longformer_bwd_sm80.cuh"

namespace fk {
template cudaError_t run_longformer_bwd_delta_sm80<__nv_bfloat16>(const fk_longformer_bwd_params &,
                                                                  cudaStream_t);
template cudaError_t run_longformer_bwd_dq_sm80<64, __nv_bfloat16>(const fk_longformer_bwd_params &,
                                                                   cudaStream_t);
template cudaError_t run_longformer_bwd_dq_sm80<128, __nv_bfloat16>(
    const fk_longformer_bwd_params &, cudaStream_t);
template cudaError_t run_longformer_bwd_dkdv_sm80<64, __nv_bfloat16>(
    const fk_longformer_bwd_params &, cudaStream_t);
template cudaError_t run_longformer_bwd_dkdv_sm80<128, __nv_bfloat16>(
    const fk_longformer_bwd_params &, cudaStream_t);
} // namespace fk
