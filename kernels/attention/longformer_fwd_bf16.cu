// Instantiation: Longformer forward (both passes), bf16, head dims padded to 64 and 128.
#include "longformer_fwd_sm80.cuh"

namespace fk {
template cudaError_t run_longformer_fwd_sm80<64, __nv_bfloat16>(const fk_longformer_fwd_params &,
                                                                cudaStream_t);
template cudaError_t run_longformer_fwd_sm80<128, __nv_bfloat16>(const fk_longformer_fwd_params &,
                                                                 cudaStream_t);
} // namespace fk
