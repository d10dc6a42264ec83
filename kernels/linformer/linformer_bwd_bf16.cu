// Instantiation: Linformer's projection backward, bf16 (one file per direction and dtype so nvcc
// compiles them in parallel).
#include "linformer_sm80.cuh"

namespace fk {
namespace linformer {
template cudaError_t proj_bwd<__nv_bfloat16>(const fk_linformer_proj_bwd_params &, cudaStream_t);
} // namespace linformer
} // namespace fk
