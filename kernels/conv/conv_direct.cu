// Direct (SIMT) conv2d kernels, f32 accumulation, one output element per thread: the f32
// forward and backward (correctness over speed), and dbias of every dtype. Each output element
// sums its own contributions in a fixed order, so results are deterministic (no atomics).
#include <algorithm>

#include "../common/launch.cuh"
#include "../common/numeric.cuh"
#include "conv.h"

namespace fk {
namespace conv {
namespace {

constexpr int kThreads = 256;

inline dim3 grid_for(int64_t total) {
  return dim3(unsigned(std::max<int64_t>(
      1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20))));
}

__device__ __forceinline__ int64_t grid_start() {
  return blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_step() { return int64_t(gridDim.x) * blockDim.x; }

template <typename T> __global__ void conv2d_fwd_direct_kernel(const fk_conv2d_params p) {
  const fk_conv2d_shape &s = p.shape;
  const int cg = s.c / s.groups, kg = s.k / s.groups;
  const T *x = static_cast<const T *>(p.x);
  const T *wt = static_cast<const T *>(p.weight);
  const T *bias = static_cast<const T *>(p.bias);
  const int64_t total = int64_t(s.n) * s.k * s.p * s.q;
  for (int64_t i = grid_start(); i < total; i += grid_step()) {
    const int q = int(i % s.q), op = int(i / s.q % s.p), k = int(i / s.q / s.p % s.k);
    const int n = int(i / s.q / s.p / s.k);
    const int g = k / kg;
    float acc = 0.f;
    for (int c = 0; c < cg; ++c)
      for (int r = 0; r < s.r; ++r) {
        const int h = op * s.stride_h - s.pad_h + r * s.dil_h;
        if (h < 0 || h >= s.h) continue;
        for (int ss = 0; ss < s.s; ++ss) {
          const int w = q * s.stride_w - s.pad_w + ss * s.dil_w;
          if (w < 0 || w >= s.w) continue;
          acc += to_float(x[n * p.x_strides[0] + (g * cg + c) * p.x_strides[1] +
                            h * p.x_strides[2] + w * p.x_strides[3]]) *
                 to_float(wt[k * p.w_strides[0] + c * p.w_strides[1] + r * p.w_strides[2] +
                             ss * p.w_strides[3]]);
        }
      }
    if (bias != nullptr) acc += to_float(bias[k]);
    const int64_t off =
        n * p.y_strides[0] + k * p.y_strides[1] + op * p.y_strides[2] + q * p.y_strides[3];
    if (p.y_pre != nullptr) static_cast<T *>(p.y_pre)[off] = from_float<T>(acc);
    static_cast<T *>(p.y)[off] = from_float<T>(activate(acc, p.activation));
  }
}

// dx[n, c, h, w] = sum over the taps (k, r, s) of c's group whose window covers (h, w).
template <typename T> __global__ void conv2d_dx_direct_kernel(const fk_conv2d_bwd_params p) {
  const fk_conv2d_shape &s = p.shape;
  const int cg = s.c / s.groups, kg = s.k / s.groups;
  const T *dy = static_cast<const T *>(p.dy);
  const T *wt = static_cast<const T *>(p.weight);
  const int64_t total = int64_t(s.n) * s.c * s.h * s.w;
  for (int64_t i = grid_start(); i < total; i += grid_step()) {
    const int w = int(i % s.w), h = int(i / s.w % s.h), c = int(i / s.w / s.h % s.c);
    const int n = int(i / s.w / s.h / s.c);
    const int g = c / cg;
    float acc = 0.f;
    for (int k = g * kg; k < (g + 1) * kg; ++k)
      for (int r = 0; r < s.r; ++r) {
        const int hp = h + s.pad_h - r * s.dil_h;
        if (hp < 0 || hp % s.stride_h != 0 || hp / s.stride_h >= s.p) continue;
        for (int ss = 0; ss < s.s; ++ss) {
          const int wq = w + s.pad_w - ss * s.dil_w;
          if (wq < 0 || wq % s.stride_w != 0 || wq / s.stride_w >= s.q) continue;
          acc +=
              to_float(
                  dy[n * p.dy_strides[0] + k * p.dy_strides[1] +
                     (hp / s.stride_h) * p.dy_strides[2] + (wq / s.stride_w) * p.dy_strides[3]]) *
              to_float(wt[k * p.w_strides[0] + (c - g * cg) * p.w_strides[1] + r * p.w_strides[2] +
                          ss * p.w_strides[3]]);
        }
      }
    static_cast<T *>(p.dx)[n * p.dx_strides[0] + c * p.dx_strides[1] + h * p.dx_strides[2] +
                           w * p.dx_strides[3]] = from_float<T>(acc);
  }
}

// dweight[k, c, r, s] = sum over (n, p, q) of dy[n, k, p, q] x[n, g C/groups + c, h, w].
template <typename T> __global__ void conv2d_dw_direct_kernel(const fk_conv2d_bwd_params p) {
  const fk_conv2d_shape &s = p.shape;
  const int cg = s.c / s.groups, kg = s.k / s.groups;
  const T *dy = static_cast<const T *>(p.dy);
  const T *x = static_cast<const T *>(p.x);
  const int64_t total = int64_t(s.k) * cg * s.r * s.s;
  for (int64_t i = grid_start(); i < total; i += grid_step()) {
    const int ss = int(i % s.s), r = int(i / s.s % s.r), c = int(i / s.s / s.r % cg);
    const int k = int(i / s.s / s.r / cg);
    const int64_t xc = int64_t(k / kg * cg + c) * p.x_strides[1];
    float acc = 0.f;
    for (int n = 0; n < s.n; ++n)
      for (int op = 0; op < s.p; ++op) {
        const int h = op * s.stride_h - s.pad_h + r * s.dil_h;
        if (h < 0 || h >= s.h) continue;
        for (int q = 0; q < s.q; ++q) {
          const int w = q * s.stride_w - s.pad_w + ss * s.dil_w;
          if (w < 0 || w >= s.w) continue;
          acc += to_float(dy[n * p.dy_strides[0] + k * p.dy_strides[1] + op * p.dy_strides[2] +
                             q * p.dy_strides[3]]) *
                 to_float(x[n * p.x_strides[0] + xc + h * p.x_strides[2] + w * p.x_strides[3]]);
        }
      }
    static_cast<T *>(p.dweight)[k * p.dw_strides[0] + c * p.dw_strides[1] + r * p.dw_strides[2] +
                                ss * p.dw_strides[3]] = from_float<T>(acc);
  }
}

// dbias[k] = sum of dy over (n, p, q): one warp per channel, lanes in a fixed order.
template <typename T> __global__ void conv2d_dbias_kernel(const fk_conv2d_bwd_params p) {
  const fk_conv2d_shape &s = p.shape;
  const T *dy = static_cast<const T *>(p.dy);
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t pixels = int64_t(s.n) * s.p * s.q;
  for (int k = blockIdx.x * warps + threadIdx.x / 32; k < s.k; k += gridDim.x * warps) {
    float acc = 0.f;
    for (int64_t i = lane; i < pixels; i += 32) {
      const int q = int(i % s.q), op = int(i / s.q % s.p), n = int(i / s.q / s.p);
      acc += to_float(dy[n * p.dy_strides[0] + k * p.dy_strides[1] + op * p.dy_strides[2] +
                         q * p.dy_strides[3]]);
    }
#pragma unroll
    for (int m = 16; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (lane == 0) static_cast<T *>(p.dbias)[k] = from_float<T>(acc);
  }
}

} // namespace

template <typename T> cudaError_t conv2d_fwd_direct(const fk_conv2d_params &p, cudaStream_t st) {
  const fk_conv2d_shape &s = p.shape;
  const int64_t total = int64_t(s.n) * s.k * s.p * s.q;
  if (total == 0) return cudaSuccess;
  return launch_kernel(conv2d_fwd_direct_kernel<T>, grid_for(total), dim3(kThreads), 0, st, p);
}

template <typename T>
cudaError_t conv2d_bwd_direct(const fk_conv2d_bwd_params &p, cudaStream_t st) {
  const fk_conv2d_shape &s = p.shape;
  cudaError_t err = cudaSuccess;
  const int64_t dx_total = int64_t(s.n) * s.c * s.h * s.w;
  if (p.dx != nullptr && dx_total > 0)
    err = launch_kernel(conv2d_dx_direct_kernel<T>, grid_for(dx_total), dim3(kThreads), 0, st, p);
  const int64_t dw_total = int64_t(s.k) * (s.c / s.groups) * s.r * s.s;
  if (err == cudaSuccess && p.dweight != nullptr && dw_total > 0)
    err = launch_kernel(conv2d_dw_direct_kernel<T>, grid_for(dw_total), dim3(kThreads), 0, st, p);
  if (err == cudaSuccess && p.dbias != nullptr) err = conv2d_dbias<T>(p, st);
  return err;
}

template <typename T> cudaError_t conv2d_dbias(const fk_conv2d_bwd_params &p, cudaStream_t st) {
  constexpr int kChannelsPerBlock = kThreads / 32;
  const unsigned blocks = unsigned((p.shape.k + kChannelsPerBlock - 1) / kChannelsPerBlock);
  return launch_kernel(conv2d_dbias_kernel<T>, dim3(blocks), dim3(kThreads), 0, st, p);
}

template cudaError_t conv2d_fwd_direct<float>(const fk_conv2d_params &, cudaStream_t);
template cudaError_t conv2d_bwd_direct<float>(const fk_conv2d_bwd_params &, cudaStream_t);
template cudaError_t conv2d_dbias<__half>(const fk_conv2d_bwd_params &, cudaStream_t);
template cudaError_t conv2d_dbias<__nv_bfloat16>(const fk_conv2d_bwd_params &, cudaStream_t);

} // namespace conv
} // namespace fk
