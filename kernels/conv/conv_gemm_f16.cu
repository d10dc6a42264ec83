// Instantiation: conv2d forward and backward on the tensor-core GEMM core, f16 (one file per
// dtype so nvcc compiles them in parallel; forward and backward share the GEMM kernels).
#include "conv_bwd_gemm_sm80.cuh"

namespace fk {
namespace conv {
template cudaError_t conv2d_fwd_gemm<__half>(const fk_conv2d_params &, cudaStream_t, bool);
template cudaError_t conv2d_bwd_gemm<__half>(const fk_conv2d_bwd_params &, cudaStream_t, bool);
} // namespace conv
} // namespace fk
