// Part of the CPU emulator (emu.h): the instruction models every kernel sees through
// plain CUDA C++ (--use_fast_math's transcendentals, barriers, shuffles), and CUDA C++'s
// keywords and built-in variables as host C++. The warp-level matrix instructions
// (mma.sync, ldmatrix, cp.async) are in mock/mma_sm80.cuh.
#pragma once
#include "emu_scheduler.h"

namespace emu {

// --use_fast_math's transcendentals (CUDA C++ Programming Guide, intrinsic functions, and
// the PTX ISA's ex2 / lg2.approx): the correctly rounded result moved by a deterministic
// pseudo-random error within the documented bound, with .ftz's flushing of denormal inputs
// and outputs. The tolerances of the suites then hold for what a GPU computes.
inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }
inline uint32_t mix(uint32_t x) { // murmur3's finalizer
  x ^= x >> 16, x *= 0x85ebca6bu, x ^= x >> 13, x *= 0xc2b2ae35u, x ^= x >> 16;
  return x;
}
inline uint32_t bits_of(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  return b;
}
// r moved by k units in the last place (away from zero for k > 0).
inline float add_ulps(float r, int k) {
  if (!std::isfinite(r) || r == 0.f) return r;
  uint32_t b = bits_of(r);
  b = uint32_t(int64_t(b) + k);
  float o;
  memcpy(&o, &b, 4);
  return std::isfinite(o) ? o : r;
}
// ex2.approx.ftz.f32: max error 2 ulp over the full range; exact for integers (2^n, so
// exp2(0) = 1: the hardware scales 2^frac(x) by 2^int(x)).
inline float fast_exp2f(float x) {
  x = ftz(x);
  const float r = float(std::exp2(double(x)));
  if (x == std::trunc(x)) return ftz(r);
  return ftz(add_ulps(r, int(mix(bits_of(x)) % 5) - 2));
}
// lg2.approx.ftz.f32 (__log2f): on [0.5, 2] max absolute error 2^-22, elsewhere 2 ulp.
inline float fast_log2f(float x) {
  x = ftz(x);
  const double l = std::log2(double(x));
  const uint32_t h = mix(bits_of(x) ^ 0x9e3779b9u);
  if (x >= 0.5f && x <= 2.f) // u in [-1, 1]; 3/4 of the bound leaves room for the rounding
    return float(l + (double(h) / 2147483647.5 - 1.0) * 0x1.8p-23);
  return add_ulps(float(l), int(h % 5) - 2);
}
// __expf / __logf as nvcc builds them: through ex2 / lg2 with an f32 multiply, which is
// where their larger error (2 + 1.173 |x| ulp for __expf) comes from.
inline float fast_expf(float x) { return fast_exp2f(ftz(x) * 1.44269502f); }
inline float fast_logf(float x) { return fast_log2f(x) * 0.693147182f; }

} // namespace emu

// CUDA C++ as host C++: the execution-space and storage keywords vanish, the built-in
// index variables read the current fiber.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)
#define __shared__
#define threadIdx (emu::g_cur->tid)
#define blockIdx (emu::g_block)
#define gridDim (emu::g_grid)
#define blockDim (emu::g_bdim)

// --use_fast_math turns these into the approximate instructions (and sinf etc., which the
// kernels do not use). Everything included after this header sees the models.
#define exp2f(x) ::emu::fast_exp2f(x)
#define log2f(x) ::emu::fast_log2f(x)
#define expf(x) ::emu::fast_expf(x)
#define logf(x) ::emu::fast_logf(x)
#define __expf(x) ::emu::fast_expf(x)
#define __logf(x) ::emu::fast_logf(x)
#define __log2f(x) ::emu::fast_log2f(x)

inline void __syncthreads() { emu::barrier_wait(emu::g_block_bar); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
  emu::warp_sync();
}
inline float __shfl_xor_sync(unsigned mask, float v, int m) {
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask is not emulated");
  emu::ws().f[emu::lane()] = v;
  emu::warp_sync();
  const float r = emu::ws().f[emu::lane() ^ m];
  emu::warp_sync();
  return r;
}
