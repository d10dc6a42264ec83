// 2-D max / average pooling, forward and backward, torch semantics (see fk_conv.h). One
// thread per output element; the backward gathers, per dx element, from the windows that
// cover it, so it is deterministic and needs no atomics.
#include <algorithm>

#include "../common/launch.cuh"
#include "../common/numeric.cuh"
#include "../include/fk_conv.h"

namespace fk {
namespace pool {
namespace {

constexpr int kPoolThreads = 256;

// Element i of an (n, c, rows, cols) grid. Channels go fastest for channels-last tensors,
// so that neighbouring threads touch neighbouring memory in either layout.
struct Coord {
  int n, c, a, b;
};
__device__ __forceinline__ Coord unravel(int64_t i, int c, int rows, int cols, bool channels_last) {
  Coord o;
  if (channels_last) {
    o.c = int(i % c), i /= c;
    o.b = int(i % cols), i /= cols;
  } else {
    o.b = int(i % cols), i /= cols;
    o.a = int(i % rows), i /= rows;
    o.c = int(i % c), o.n = int(i / c);
    return o;
  }
  o.a = int(i % rows), o.n = int(i / rows);
  return o;
}

// Window (p, q) before and after clipping, and its average-pooling divisor.
struct Window {
  int h0, h1, w0, w1; // clipped to the input, [h0, h1) x [w0, w1)
  float divisor;
};

__device__ __forceinline__ Window avg_window(const fk_pool2d_params &f, int op, int q) {
  int h0 = op * f.stride_h - f.pad_h, w0 = q * f.stride_w - f.pad_w;
  int h1 = min(h0 + f.kernel_h, f.h + f.pad_h), w1 = min(w0 + f.kernel_w, f.w + f.pad_w);
  const int padded_size = (h1 - h0) * (w1 - w0);
  h0 = max(h0, 0), w0 = max(w0, 0), h1 = min(h1, f.h), w1 = min(w1, f.w);
  const int size = f.divisor > 0         ? f.divisor
                   : f.count_include_pad ? padded_size
                                         : (h1 - h0) * (w1 - w0);
  return {h0, h1, w0, w1, float(size)};
}

template <typename T> __global__ void pool2d_fwd_kernel(const fk_pool2d_params f) {
  const T *x = static_cast<const T *>(f.x);
  const int64_t total = int64_t(f.n) * f.c * f.p * f.q;
  const bool channels_last = f.x_strides[1] == 1;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Coord o = unravel(i, f.c, f.p, f.q, channels_last);
    const int n = o.n, c = o.c, op = o.a, q = o.b;
    const T *xp = x + n * f.x_strides[0] + c * f.x_strides[1];
    float out;
    if (f.kind == FK_POOL_MAX) {
      const int h0 = op * f.stride_h - f.pad_h, w0 = q * f.stride_w - f.pad_w;
      // torch's starting index: the window's first tap inside the input.
      const int h_first = h0 < 0 ? h0 + (-h0 + f.dil_h - 1) / f.dil_h * f.dil_h : h0;
      const int w_first = w0 < 0 ? w0 + (-w0 + f.dil_w - 1) / f.dil_w * f.dil_w : w0;
      float best = -INFINITY;
      int arg = h_first * f.w + w_first;
      for (int kh = 0; kh < f.kernel_h; ++kh) {
        const int h = h0 + kh * f.dil_h;
        if (h < 0 || h >= f.h) continue;
        for (int kw = 0; kw < f.kernel_w; ++kw) {
          const int w = w0 + kw * f.dil_w;
          if (w < 0 || w >= f.w) continue;
          const float v = to_float(xp[h * f.x_strides[2] + w * f.x_strides[3]]);
          if (v > best || v != v) { // as torch: NaN propagates, the last NaN's index
            best = v;
            arg = h * f.w + w;
          }
        }
      }
      out = best;
      f.indices[((int64_t(n) * f.c + c) * f.p + op) * f.q + q] = arg;
    } else {
      const Window win = avg_window(f, op, q);
      float sum = 0.f;
      for (int h = win.h0; h < win.h1; ++h)
        for (int w = win.w0; w < win.w1; ++w)
          sum += to_float(xp[h * f.x_strides[2] + w * f.x_strides[3]]);
      out = sum / win.divisor;
    }
    static_cast<T *>(
        f.y)[n * f.y_strides[0] + c * f.y_strides[1] + op * f.y_strides[2] + q * f.y_strides[3]] =
        from_float<T>(out);
  }
}

// Output rows whose window covers input row h at some tap k: p * stride - pad + k dil = h.
// Calls visit(p, k) for each, in increasing k.
template <class Visit>
__device__ __forceinline__ void covering(int h, int kernel, int stride, int pad, int dil, int outs,
                                         Visit visit) {
  for (int k = 0; k < kernel; ++k) {
    const int hp = h + pad - k * dil;
    if (hp < 0 || hp % stride != 0 || hp / stride >= outs) continue;
    visit(hp / stride);
  }
}

template <typename T> __global__ void pool2d_bwd_kernel(const fk_pool2d_bwd_params b) {
  const fk_pool2d_params &f = b.fwd;
  const T *dy = static_cast<const T *>(b.dy);
  const bool is_max = f.kind == FK_POOL_MAX;
  // Average pooling's windows are contiguous (torch has no dilation there).
  const int dil_h = is_max ? f.dil_h : 1, dil_w = is_max ? f.dil_w : 1;
  const int64_t total = int64_t(f.n) * f.c * f.h * f.w;
  const bool channels_last = f.x_strides[1] == 1;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Coord o = unravel(i, f.c, f.h, f.w, channels_last);
    const int n = o.n, c = o.c, h = o.a, w = o.b;
    const T *dyp = dy + n * f.y_strides[0] + c * f.y_strides[1];
    const int32_t *idx = b.indices + (int64_t(n) * f.c + c) * f.p * f.q;
    float acc = 0.f;
    covering(h, f.kernel_h, f.stride_h, f.pad_h, dil_h, f.p, [&](int op) {
      covering(w, f.kernel_w, f.stride_w, f.pad_w, dil_w, f.q, [&](int q) {
        const float g = to_float(dyp[op * f.y_strides[2] + q * f.y_strides[3]]);
        if (is_max) {
          if (idx[op * f.q + q] == h * f.w + w) acc += g;
        } else {
          acc += g / avg_window(f, op, q).divisor;
        }
      });
    });
    static_cast<T *>(
        b.dx)[n * f.x_strides[0] + c * f.x_strides[1] + h * f.x_strides[2] + w * f.x_strides[3]] =
        from_float<T>(acc);
  }
}

inline dim3 pool_grid(int64_t total) {
  return dim3(unsigned(std::max<int64_t>(
      1, std::min<int64_t>((total + kPoolThreads - 1) / kPoolThreads, int64_t(1) << 20))));
}

inline bool pool_params_ok(const fk_pool2d_params &f) {
  return f.n >= 0 && f.c >= 0 && f.h > 0 && f.w > 0 && f.p >= 0 && f.q >= 0 && f.kernel_h > 0 &&
         f.kernel_w > 0 && f.stride_h > 0 && f.stride_w > 0 && f.pad_h >= 0 && f.pad_w >= 0 &&
         f.dil_h > 0 && f.dil_w > 0 && (f.kind == FK_POOL_MAX || f.kind == FK_POOL_AVG);
}

template <typename T> cudaError_t pool_fwd(const fk_pool2d_params &f, cudaStream_t s) {
  const int64_t total = int64_t(f.n) * f.c * f.p * f.q;
  return launch_kernel(pool2d_fwd_kernel<T>, pool_grid(total), dim3(kPoolThreads), 0, s, f);
}

template <typename T> cudaError_t pool_bwd(const fk_pool2d_bwd_params &b, cudaStream_t s) {
  const fk_pool2d_params &f = b.fwd;
  const int64_t total = int64_t(f.n) * f.c * f.h * f.w;
  return launch_kernel(pool2d_bwd_kernel<T>, pool_grid(total), dim3(kPoolThreads), 0, s, b);
}

} // namespace
} // namespace pool
} // namespace fk

extern "C" int32_t fk_pool2d_fwd(const fk_pool2d_params *p, void *stream) {
  if (p == nullptr || p->x == nullptr || p->y == nullptr || !fk::pool::pool_params_ok(*p) ||
      (p->kind == FK_POOL_MAX && p->indices == nullptr))
    return cudaErrorInvalidValue;
  if (int64_t(p->n) * p->c * p->p * p->q == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
  case FK_DTYPE_F16: return fk::pool::pool_fwd<__half>(*p, s);
  case FK_DTYPE_BF16: return fk::pool::pool_fwd<__nv_bfloat16>(*p, s);
  case FK_DTYPE_F32: return fk::pool::pool_fwd<float>(*p, s);
  default: return cudaErrorInvalidValue;
  }
}

extern "C" int32_t fk_pool2d_bwd(const fk_pool2d_bwd_params *p, void *stream) {
  if (p == nullptr || p->dy == nullptr || p->dx == nullptr || !fk::pool::pool_params_ok(p->fwd) ||
      (p->fwd.kind == FK_POOL_MAX && p->indices == nullptr))
    return cudaErrorInvalidValue;
  if (int64_t(p->fwd.n) * p->fwd.c * p->fwd.h * p->fwd.w == 0) return cudaSuccess;
  fk::DeviceGuard guard(p->fwd.device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p->fwd.dtype) {
  case FK_DTYPE_F16: return fk::pool::pool_bwd<__half>(*p, s);
  case FK_DTYPE_BF16: return fk::pool::pool_bwd<__nv_bfloat16>(*p, s);
  case FK_DTYPE_F32: return fk::pool::pool_bwd<float>(*p, s);
  default: return cudaErrorInvalidValue;
  }
}
