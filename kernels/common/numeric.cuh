// Scalar numerics shared by every kernel family: f32 <-> f16 / bf16 conversions, the
// unpacking of a 32-bit register holding two 16-bit values (the inverse of
// ElemTraits::pack in mma_sm80.cuh), the run-time activation (fk_activation), and division
// by a divisor fixed on the host (FastDiv, for the gathers' index arithmetic).
// Used by the GEMM core (gemm_sm80.cuh), the convolution and pooling kernels (conv/) and
// the attention backward (Delta, accumulating epilogues).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fk {

// n / d for 0 <= n < 2^31 and a divisor d >= 1 fixed on the host: one multiply-high and a
// shift (Granlund-Montgomery, as CUTLASS's FastDivmod) in place of the ~20-instruction
// division by a run-time value that the gathers' index arithmetic compiles to otherwise.
// mul = ceil(2^(31 + l) / d) with l = ceil(log2 d) fits 32 bits; d == 1 skips the multiply.
struct FastDiv {
  int d = 1;
  uint32_t mul = 0, shift = 0;
  FastDiv() = default;
  __host__ __device__ explicit FastDiv(int divisor) : d(divisor) {
    if (d <= 1) return;
    uint32_t l = 0;
    while ((uint64_t(1) << l) < uint64_t(d)) ++l;
    mul = uint32_t(((uint64_t(1) << (31 + l)) + uint64_t(d) - 1) / uint64_t(d));
    shift = l - 1;
  }
  __host__ __device__ __forceinline__ int div(int n) const {
    return d == 1 ? n : int(uint32_t((uint64_t(uint32_t(n)) * mul) >> 32) >> shift);
  }
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The two 16-bit values of a packed register (low half first) as floats.
template <typename Element> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2 *>(&v));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&v));
}

// Activation selected at run time (fk_activation): one instantiation serves all four.
__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
  case 1: return fmaxf(v, 0.f);
  case 2: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  case 3: return v / (1.f + expf(-v));
  default: return v;
  }
}

} // namespace fk
