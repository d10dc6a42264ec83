// A 4-d tensor for the emulator suites whose operands are strided (B, N, H, D)-like views
// (linformer, reformer): an allocation that ends at its last logical element, NaN
// everywhere else, so a read of a gap shows up as NaN, a write to one is counted
// (pad_touched) and an output element never written stays NaN.
#pragma once
#include "harness.h"

#include <array>
#include <cmath>
#include <cstring>
#include <vector>

namespace suite {

using harness::to_e;
using harness::to_f;

// Dims d, strides s in elements (innermost unit); `shift` NaN elements before the first
// (an operand off 16-byte alignment).
template <typename T> struct Strided {
  std::array<int, 4> d;
  std::array<int64_t, 4> s;
  int shift;
  emu::DeviceArray<T> data;
  std::vector<char> logical;
  Strided(std::array<int, 4> d_, std::array<int64_t, 4> s_, int shift_ = 0)
      : d(d_), s(s_), shift(shift_) {
    int64_t last = 0;
    for (int i = 0; i < 4; ++i) last += int64_t(d[i] - 1) * s[i];
    const size_t n = size_t(shift + last + 1);
    data.assign(n, to_e<T>(NAN));
    logical.assign(n, 0);
    for (int a = 0; a < d[0]; ++a)
      for (int b = 0; b < d[1]; ++b)
        for (int c = 0; c < d[2]; ++c)
          for (int e = 0; e < d[3]; ++e) logical[size_t(off(a, b, c, e))] = 1;
  }
  int64_t off(int a, int b, int c, int e) const {
    return shift + a * s[0] + b * s[1] + c * s[2] + e * s[3];
  }
  T *ptr() { return data.data() + shift; }
  double get(int a, int b, int c, int e) const { return to_f(data[size_t(off(a, b, c, e))]); }
  void set(int a, int b, int c, int e, float v) { data[size_t(off(a, b, c, e))] = to_e<T>(v); }
  // (batch, row, head) strides of a (B, N, H, D) view.
  fk_strides st() const { return {s[0], s[1], s[2]}; }
  long pad_touched() const {
    long n = 0;
    for (size_t i = 0; i < data.size(); ++i) n += !logical[i] && !std::isnan(to_f(data[i]));
    return n;
  }
  bool same_bits(const Strided &o) const {
    return std::memcmp(data.data(), o.data.data(), data.size() * sizeof(T)) == 0;
  }
};

} // namespace suite
