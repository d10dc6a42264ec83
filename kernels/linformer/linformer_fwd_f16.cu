// Instantiation: Linformer's projection forward, f16 (one file per direction and dtype so nvcc
// compiles them in parallel).
#include "linformer_sm80.cuh"

namespace fk {
namespace linformer {
template cudaError_t proj_fwd<__half>(const fk_linformer_proj_params &, cudaStream_t);
} // namespace linformer
} // namespace fk
