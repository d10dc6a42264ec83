// Convolution-family suite: fk_conv2d_fwd (both algorithms), fk_conv2d_bwd and
// fk_pool2d_fwd / _bwd (kernels/conv/, kernels/common/gemm_sm80.cuh) on the emulator against
// an f64 direct reference. Every tensor lives in a padded layout whose gaps are NaN: an
// input gap that is read shows up as NaN in the results, an output gap that is written is
// counted (pad-touched); outputs start as NaN, so an element never written fails too.
// Usage: conv_test [case index...] (all cases by default).
#include "emu.h"

#include "emulated/conv/conv_api.cu"
#include "emulated/conv/conv_bwd_gemm_sm80.cuh"
#include "emulated/conv/conv_direct.cu"
#include "emulated/conv/conv_gemm_bf16.cu"
#include "emulated/conv/conv_gemm_f16.cu"
#include "emulated/conv/pool.cu"

#include <random>
#include <string>

namespace {

template <typename T> T to_e(float x);
template <> __half to_e<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 to_e<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> float to_e<float>(float x) { return x; }
float to_f(__half x) { return __half2float(x); }
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
float to_f(float x) { return x; }

// A logical (d0, d1, d2, d3) tensor, NCHW or channels-last (d1 fastest), with `slack`
// NaN elements after every row of each level; the allocation (emu::DeviceArray) ends at
// the last logical element, so an access past it is caught.
template <typename T> struct Tensor4 {
  int d[4];
  int64_t st[4];
  emu::DeviceArray<T> data;
  Tensor4(int d0, int d1, int d2, int d3, bool channels_last, int slack) : d{d0, d1, d2, d3} {
    if (channels_last) {
      st[1] = 1, st[3] = d1 + slack, st[2] = d3 * st[3] + slack, st[0] = d2 * st[2] + slack;
    } else {
      st[3] = 1, st[2] = d3 + slack, st[1] = d2 * st[2] + slack, st[0] = d1 * st[1] + slack;
    }
    const bool empty = d0 <= 0 || d1 <= 0 || d2 <= 0 || d3 <= 0;
    data.assign(empty ? 0 : size_t(index(d0 - 1, d1 - 1, d2 - 1, d3 - 1) + 1), to_e<T>(NAN));
  }
  int64_t index(int a, int b, int c, int e) const {
    return a * st[0] + b * st[1] + c * st[2] + e * st[3];
  }
  T &at(int a, int b, int c, int e) { return data[index(a, b, c, e)]; }
  double get(int a, int b, int c, int e) const { return to_f(data[index(a, b, c, e)]); }
  void fill(std::mt19937 &rng) {
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for_each([&](int a, int b, int c, int e) { at(a, b, c, e) = to_e<T>(u(rng)); });
  }
  template <class F> void for_each(F f) const {
    for (int a = 0; a < d[0]; ++a)
      for (int b = 0; b < d[1]; ++b)
        for (int c = 0; c < d[2]; ++c)
          for (int e = 0; e < d[3]; ++e) f(a, b, c, e);
  }
  // Elements outside the logical tensor that are no longer NaN.
  long pad_touched() const {
    std::vector<char> logical(data.size(), 0);
    for_each([&](int a, int b, int c, int e) { logical[index(a, b, c, e)] = 1; });
    long n = 0;
    for (size_t i = 0; i < data.size(); ++i) n += !logical[i] && !std::isnan(to_f(data[i]));
    return n;
  }
};

double activate_ref(double v, int act) {
  switch (act) {
  case FK_ACT_RELU: return v > 0 ? v : 0;
  case FK_ACT_GELU: return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
  case FK_ACT_SILU: return v / (1 + std::exp(-v));
  default: return v;
  }
}

// Per-element check |got - ref| <= atol + rtol |ref|, plus bookkeeping of the worst.
struct Check {
  double rtol, atol, worst = 0;
  long bad = 0, nonfinite = 0, count = 0;
  void add(double got, double ref) {
    ++count;
    if (!std::isfinite(got)) {
      ++nonfinite;
      return;
    }
    const double err = std::fabs(got - ref), lim = atol + rtol * std::fabs(ref);
    worst = std::max(worst, err / lim);
    bad += err > lim;
  }
};

double tol_of(int dtype) {
  return dtype == FK_DTYPE_F32 ? 2e-5 : dtype == FK_DTYPE_F16 ? 2e-3 : 1.6e-2;
}
const char *dtype_name(int dtype) {
  return dtype == FK_DTYPE_F32 ? "f32" : dtype == FK_DTYPE_F16 ? "f16" : "bf16";
}

struct Result {
  std::string line;
  bool ok = true;
  void check(const char *what, const Check &c, long touched) {
    const bool good = c.bad == 0 && c.nonfinite == 0 && touched == 0 && c.count > 0;
    char buf[200];
    snprintf(buf, sizeof buf, " %s %.2f%s", what, c.worst, good ? "" : " <-- BAD");
    line += buf;
    if (!good) {
      snprintf(buf, sizeof buf, " (bad %ld nonfinite %ld pad-touched %ld of %ld)", c.bad,
               c.nonfinite, touched, c.count);
      line += buf;
    }
    ok = ok && good;
  }
  void fail(const std::string &why) {
    line += " " + why + " <-- BAD";
    ok = false;
  }
};

struct ConvCase {
  int n, c, h, w, k, r, s;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
  bool nhwc, bias, y_pre;
  int act, dtype;
  bool flip_grads = false; // backward: dy, dx, dweight in the other layout from x's
};

fk_conv2d_shape shape_of(const ConvCase &cc) {
  fk_conv2d_shape s{};
  s.n = cc.n, s.c = cc.c, s.h = cc.h, s.w = cc.w, s.k = cc.k, s.r = cc.r, s.s = cc.s;
  s.stride_h = cc.stride_h, s.stride_w = cc.stride_w, s.pad_h = cc.pad_h, s.pad_w = cc.pad_w;
  s.dil_h = cc.dil_h, s.dil_w = cc.dil_w, s.groups = cc.groups;
  s.p = (cc.h + 2 * cc.pad_h - cc.dil_h * (cc.r - 1) - 1) / cc.stride_h + 1;
  s.q = (cc.w + 2 * cc.pad_w - cc.dil_w * (cc.s - 1) - 1) / cc.stride_w + 1;
  return s;
}

std::string describe(const ConvCase &c) {
  char buf[200];
  snprintf(buf, sizeof buf, "%s %s n%d c%d %dx%d k%d %dx%d s%d,%d p%d,%d d%d,%d g%d act%d%s%s%s",
           dtype_name(c.dtype), c.nhwc ? "nhwc" : "nchw", c.n, c.c, c.h, c.w, c.k, c.r, c.s,
           c.stride_h, c.stride_w, c.pad_h, c.pad_w, c.dil_h, c.dil_w, c.groups, c.act,
           c.bias ? " bias" : "", c.y_pre ? " y_pre" : "", c.flip_grads ? " flip" : "");
  return buf;
}

template <typename T> struct ConvProblem {
  ConvCase cc;
  fk_conv2d_shape s;
  Tensor4<T> x, w, dy;
  emu::DeviceArray<T> bias;
  explicit ConvProblem(const ConvCase &c, uint32_t seed)
      // Channels-last slack of 8 keeps the 16-byte paths possible; NCHW's is odd.
      : cc(c), s(shape_of(c)), x(c.n, c.c, c.h, c.w, c.nhwc, c.nhwc ? 8 : 5),
        w(c.k, c.c / c.groups, c.r, c.s, c.nhwc, c.nhwc ? 8 : 3),
        dy(c.n, c.k, s.p, s.q, c.nhwc != c.flip_grads, 8) {
    std::mt19937 rng(seed);
    x.fill(rng);
    w.fill(rng);
    dy.fill(rng);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<T> b;
    for (int i = 0; i < c.k; ++i) b.push_back(to_e<T>(u(rng)));
    bias = emu::DeviceArray<T>(b);
  }
  // conv + bias at (n, k, p, q), f64.
  double pre(int n, int k, int op, int q) const {
    const int cg = cc.c / cc.groups, g = k / (cc.k / cc.groups);
    double acc = cc.bias ? to_f(bias[k]) : 0.0;
    for (int c = 0; c < cg; ++c)
      for (int r = 0; r < cc.r; ++r)
        for (int ss = 0; ss < cc.s; ++ss) {
          const int h = op * cc.stride_h - cc.pad_h + r * cc.dil_h;
          const int wi = q * cc.stride_w - cc.pad_w + ss * cc.dil_w;
          if (h >= 0 && h < cc.h && wi >= 0 && wi < cc.w)
            acc += x.get(n, g * cg + c, h, wi) * w.get(k, c, r, ss);
        }
    return acc;
  }
};

// Runs im2col, the implicit GEMM where supported, and the implicit GEMM again on a copy of
// x one element off 16-byte alignment (its per-element gather fallback).
template <typename T> void conv_fwd_case(const ConvCase &cc, Result &res) {
  ConvProblem<T> pb(cc, 99);
  emu::DeviceArray<T> x_shifted(pb.x.data.size() + 1, to_e<T>(NAN));
  std::copy(pb.x.data.begin(), pb.x.data.end(), x_shifted.begin() + 1);
  for (int run = 0; run < 3; ++run) {
    const int algo = run == 0 ? FK_CONV_ALGO_IM2COL : FK_CONV_ALGO_IMPLICIT_GEMM;
    Tensor4<T> y(cc.n, cc.k, pb.s.p, pb.s.q, cc.nhwc, 8), y_pre = y;
    fk_conv2d_params p{};
    p.x = run == 2 ? x_shifted.data() + 1 : pb.x.data.data(), p.weight = pb.w.data.data();
    p.bias = cc.bias ? pb.bias.data() : nullptr;
    p.y = y.data.data(), p.y_pre = cc.y_pre ? y_pre.data.data() : nullptr;
    for (int i = 0; i < 4; ++i)
      p.x_strides[i] = pb.x.st[i], p.w_strides[i] = pb.w.st[i], p.y_strides[i] = y.st[i];
    p.shape = pb.s, p.activation = cc.act, p.algo = algo, p.dtype = cc.dtype;
    if (!fk_conv2d_supports(&p)) {
      // Only the half-precision implicit GEMM may refuse, and only where the header says
      // it must (x not channels-last or C/groups not a multiple of 8): any other refusal
      // would let a case pass unchecked.
      const bool must_refuse =
          run >= 1 && cc.dtype != FK_DTYPE_F32 && !(cc.nhwc && (cc.c / cc.groups) % 8 == 0);
      if (!must_refuse)
        res.fail(run == 0 ? "im2col refused" : "implicit GEMM refused a case it supports");
      if (run == 1) res.line += " implicit:-";
      continue;
    }
    if (run == 2 && cc.dtype == FK_DTYPE_F32) continue; // one direct kernel for all
    const int64_t ws_bytes = fk_conv2d_workspace_bytes(&p);
    // NaN: unwritten workspace shows. 256-byte aligned, as the API asks.
    emu::DeviceArray<unsigned char> ws(size_t(ws_bytes), 0xFF, 256);
    p.workspace = ws_bytes ? ws.data() : nullptr;
    const int rc = fk_conv2d_fwd(&p, nullptr);
    res.line += run == 0 ? " im2col:" : run == 1 ? " implicit:" : " unaligned:";
    if (rc != 0) {
      res.fail("rc " + std::to_string(rc));
      continue;
    }
    const double tol = tol_of(cc.dtype);
    Check cy{tol, tol}, cp{tol, tol};
    y.for_each([&](int n, int k, int op, int q) {
      const double v = pb.pre(n, k, op, q);
      cy.add(y.get(n, k, op, q), activate_ref(v, cc.act));
      if (cc.y_pre) cp.add(y_pre.get(n, k, op, q), v);
    });
    res.check("y", cy, y.pad_touched());
    if (cc.y_pre) res.check("y_pre", cp, y_pre.pad_touched());
  }
}

// Four runs: im2col and the implicit GEMM with every gradient asked for, then the implicit
// GEMM with dx alone and im2col with dweight alone (the workspace is sized for what is
// asked). Half precision only; f32 (direct kernels) runs once.
template <typename T> void conv_bwd_case(const ConvCase &cc, Result &res) {
  ConvProblem<T> pb(cc, 7);
  const int cg = cc.c / cc.groups, kg = cc.k / cc.groups;
  const bool grads_nhwc = cc.nhwc != cc.flip_grads;
  const fk_conv2d_shape &s = pb.s;
  // The f64 references, in for_each order, computed once.
  std::vector<double> ref_dx, ref_dw, ref_db;
  Tensor4<T>(cc.n, cc.c, cc.h, cc.w, grads_nhwc, 4).for_each([&](int n, int c, int h, int wi) {
    // The taps (r, ss) whose output position (op, q) reads input (h, wi).
    const int g = c / cg;
    double acc = 0;
    for (int r = 0; r < s.r; ++r)
      for (int ss = 0; ss < s.s; ++ss) {
        const int ph = h + s.pad_h - r * s.dil_h, qw = wi + s.pad_w - ss * s.dil_w;
        if (ph < 0 || qw < 0 || ph % s.stride_h != 0 || qw % s.stride_w != 0) continue;
        const int op = ph / s.stride_h, q = qw / s.stride_w;
        if (op >= s.p || q >= s.q) continue;
        for (int k = g * kg; k < (g + 1) * kg; ++k)
          acc += pb.dy.get(n, k, op, q) * pb.w.get(k, c - g * cg, r, ss);
      }
    ref_dx.push_back(acc);
  });
  Tensor4<T>(cc.k, cg, cc.r, cc.s, grads_nhwc, 2).for_each([&](int k, int c, int r, int ss) {
    const int g = k / kg;
    double acc = 0;
    for (int n = 0; n < s.n; ++n)
      for (int op = 0; op < s.p; ++op)
        for (int q = 0; q < s.q; ++q) {
          const int h = op * s.stride_h - s.pad_h + r * s.dil_h;
          const int wi = q * s.stride_w - s.pad_w + ss * s.dil_w;
          if (h >= 0 && h < s.h && wi >= 0 && wi < s.w)
            acc += pb.dy.get(n, k, op, q) * pb.x.get(n, g * cg + c, h, wi);
        }
    ref_dw.push_back(acc);
  });
  for (int k = 0; k < cc.k; ++k) {
    double acc = 0;
    pb.dy.for_each([&](int n, int kk, int op, int q) {
      if (kk == k) acc += pb.dy.get(n, kk, op, q);
    });
    ref_db.push_back(acc);
  }
  const int runs = cc.dtype == FK_DTYPE_F32 ? 1 : 4;
  for (int run = 0; run < runs; ++run) {
    const bool implicit = run == 1 || run == 2, want_dx = run != 3, want_dw = run != 2;
    Tensor4<T> dx(cc.n, cc.c, cc.h, cc.w, grads_nhwc, 4), dw(cc.k, cg, cc.r, cc.s, grads_nhwc, 2);
    emu::DeviceArray<T> db(cc.k, to_e<T>(NAN));
    fk_conv2d_bwd_params p{};
    p.x = pb.x.data.data(), p.weight = pb.w.data.data(), p.dy = pb.dy.data.data();
    p.dx = want_dx ? dx.data.data() : nullptr, p.dweight = want_dw ? dw.data.data() : nullptr;
    p.dbias = cc.bias && run < 2 ? db.data() : nullptr;
    for (int i = 0; i < 4; ++i) {
      p.x_strides[i] = pb.x.st[i], p.w_strides[i] = pb.w.st[i], p.dy_strides[i] = pb.dy.st[i];
      p.dx_strides[i] = dx.st[i], p.dw_strides[i] = dw.st[i];
    }
    p.shape = pb.s, p.dtype = cc.dtype;
    p.algo = implicit ? FK_CONV_ALGO_IMPLICIT_GEMM : FK_CONV_ALGO_IM2COL;
    res.line += run == 0 ? " im2col:" : run == 1 ? " implicit:" : run == 2 ? " dx:" : " dw:";
    if (!fk_conv2d_bwd_supports(&p)) return res.fail("unsupported");
    const int64_t ws_bytes = fk_conv2d_bwd_workspace_bytes(&p);
    emu::DeviceArray<unsigned char> ws(size_t(ws_bytes), 0xFF, 256); // NaN: unwritten shows
    p.workspace = ws_bytes ? ws.data() : nullptr;
    const int rc = fk_conv2d_bwd(&p, nullptr);
    if (rc != 0) return res.fail("rc " + std::to_string(rc));
    const double tol = tol_of(cc.dtype);
    if (want_dx) {
      Check cx{tol, tol};
      size_t i = 0;
      dx.for_each([&](int n, int c, int h, int wi) { cx.add(dx.get(n, c, h, wi), ref_dx[i++]); });
      res.check("dx", cx, dx.pad_touched());
    }
    if (want_dw) {
      Check cw{tol, tol};
      size_t i = 0;
      dw.for_each([&](int k, int c, int r, int ss) { cw.add(dw.get(k, c, r, ss), ref_dw[i++]); });
      res.check("dw", cw, dw.pad_touched());
    }
    if (p.dbias != nullptr) {
      Check cb{tol, tol};
      for (int k = 0; k < cc.k; ++k) cb.add(to_f(db[k]), ref_db[k]);
      res.check("db", cb, 0); // a write past db's end is caught by its allocation
    }
  }
}

struct PoolCase {
  int n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw;
  bool ceil_mode;
  int kind, count_include_pad, divisor, dtype;
  bool nhwc, ties;
};

int pool_out(int in, int k, int s, int pad, int dil, bool ceil_mode) {
  const int span = in + 2 * pad - dil * (k - 1) - 1;
  int out = (span + (ceil_mode ? s - 1 : 0)) / s + 1;
  if (ceil_mode && (out - 1) * s >= in + pad) --out; // torch: last window starts inside
  return out;
}

template <typename T> void pool_case(const PoolCase &pc, Result &res) {
  const int P = pool_out(pc.h, pc.kh, pc.sh, pc.ph, pc.dh, pc.ceil_mode);
  const int Q = pool_out(pc.w, pc.kw, pc.sw, pc.pw, pc.dw, pc.ceil_mode);
  Tensor4<T> x(pc.n, pc.c, pc.h, pc.w, pc.nhwc, 3), y(pc.n, pc.c, P, Q, pc.nhwc, 2);
  Tensor4<T> dy(pc.n, pc.c, P, Q, !pc.nhwc, 1), dx(pc.n, pc.c, pc.h, pc.w, !pc.nhwc, 2);
  std::mt19937 rng(5);
  x.fill(rng);
  dy.fill(rng);
  if (pc.ties) // few distinct values: first-maximum ties everywhere
    x.for_each(
        [&](int a, int b, int c, int e) { x.at(a, b, c, e) = to_e<T>(float(int(rng() % 3))); });
  const size_t outs = size_t(pc.n) * pc.c * P * Q;
  emu::DeviceArray<int32_t> idx(outs, -7);
  fk_pool2d_params f{};
  f.x = x.data.data(), f.y = y.data.data();
  f.indices = pc.kind == FK_POOL_MAX ? idx.data() : nullptr;
  for (int i = 0; i < 4; ++i) f.x_strides[i] = x.st[i], f.y_strides[i] = y.st[i];
  f.n = pc.n, f.c = pc.c, f.h = pc.h, f.w = pc.w, f.p = P, f.q = Q;
  f.kernel_h = pc.kh, f.kernel_w = pc.kw, f.stride_h = pc.sh, f.stride_w = pc.sw;
  f.pad_h = pc.ph, f.pad_w = pc.pw, f.dil_h = pc.dh, f.dil_w = pc.dw;
  f.count_include_pad = pc.count_include_pad, f.divisor = pc.divisor;
  f.kind = pc.kind, f.dtype = pc.dtype;
  int rc = fk_pool2d_fwd(&f, nullptr);
  if (rc != 0) return res.fail("fwd rc " + std::to_string(rc));
  const double tol = tol_of(pc.dtype);
  Check cy{tol, tol}, cx{tol, tol};
  long bad_idx = 0;
  std::vector<double> divisor(outs);
  y.for_each([&](int n, int c, int op, int q) {
    const size_t o = ((size_t(n) * pc.c + c) * P + op) * Q + q;
    if (pc.kind == FK_POOL_MAX) {
      double best = -INFINITY;
      int arg = -1;
      for (int i = 0; i < pc.kh; ++i)
        for (int j = 0; j < pc.kw; ++j) {
          const int h = op * pc.sh - pc.ph + i * pc.dh, w = q * pc.sw - pc.pw + j * pc.dw;
          if (h < 0 || h >= pc.h || w < 0 || w >= pc.w) continue;
          if (x.get(n, c, h, w) > best) best = x.get(n, c, h, w), arg = h * pc.w + w;
        }
      cy.add(y.get(n, c, op, q), best);
      bad_idx += idx[o] != arg;
    } else {
      int h0 = op * pc.sh - pc.ph, w0 = q * pc.sw - pc.pw;
      int h1 = std::min(h0 + pc.kh, pc.h + pc.ph), w1 = std::min(w0 + pc.kw, pc.w + pc.pw);
      const int padded = (h1 - h0) * (w1 - w0);
      h0 = std::max(h0, 0), w0 = std::max(w0, 0), h1 = std::min(h1, pc.h), w1 = std::min(w1, pc.w);
      divisor[o] = pc.divisor > 0         ? pc.divisor
                   : pc.count_include_pad ? padded
                                          : (h1 - h0) * (w1 - w0);
      double sum = 0;
      for (int h = h0; h < h1; ++h)
        for (int w = w0; w < w1; ++w) sum += x.get(n, c, h, w);
      cy.add(y.get(n, c, op, q), sum / divisor[o]);
    }
  });
  res.check("y", cy, y.pad_touched());
  if (bad_idx) res.fail(std::to_string(bad_idx) + " wrong indices");

  fk_pool2d_bwd_params b{};
  b.dy = dy.data.data(), b.indices = f.indices, b.dx = dx.data.data(), b.fwd = f;
  for (int i = 0; i < 4; ++i) b.fwd.x_strides[i] = dx.st[i], b.fwd.y_strides[i] = dy.st[i];
  rc = fk_pool2d_bwd(&b, nullptr);
  if (rc != 0) return res.fail("bwd rc " + std::to_string(rc));
  std::vector<double> ref(size_t(pc.n) * pc.c * pc.h * pc.w, 0.0);
  dy.for_each([&](int n, int c, int op, int q) {
    const size_t o = ((size_t(n) * pc.c + c) * P + op) * Q + q;
    const size_t plane = (size_t(n) * pc.c + c) * pc.h * pc.w;
    if (pc.kind == FK_POOL_MAX) {
      ref[plane + idx[o]] += dy.get(n, c, op, q);
      return;
    }
    const int h0 = op * pc.sh - pc.ph, w0 = q * pc.sw - pc.pw;
    for (int h = std::max(h0, 0); h < std::min(h0 + pc.kh, pc.h); ++h)
      for (int w = std::max(w0, 0); w < std::min(w0 + pc.kw, pc.w); ++w)
        ref[plane + h * pc.w + w] += dy.get(n, c, op, q) / divisor[o];
  });
  dx.for_each([&](int n, int c, int h, int w) {
    cx.add(dx.get(n, c, h, w), ref[((size_t(n) * pc.c + c) * pc.h + h) * pc.w + w]);
  });
  res.check("dx", cx, dx.pad_touched());
}

template <class F> void by_dtype(int dtype, F f) {
  if (dtype == FK_DTYPE_F16)
    f(__half());
  else if (dtype == FK_DTYPE_BF16)
    f(__nv_bfloat16());
  else
    f(float());
}

struct Entry {
  std::string name;
  std::function<void(Result &)> run;
};

std::vector<Entry> all_cases() {
  std::vector<Entry> cases;
  const int F16 = FK_DTYPE_F16, BF16 = FK_DTYPE_BF16, F32 = FK_DTYPE_F32;
  const int NONE = FK_ACT_NONE, RELU = FK_ACT_RELU, GELU = FK_ACT_GELU, SILU = FK_ACT_SILU;
  // n c h w k r s sh sw ph pw dh dw groups nhwc bias y_pre act dtype
  const ConvCase fwd[] = {
      {2, 16, 9, 9, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, true, false, RELU, F16},
      {2, 16, 9, 9, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, true, GELU, BF16},
      {1, 16, 11, 9, 32, 3, 3, 2, 2, 1, 1, 1, 1, 1, true, false, false, SILU, F16},
      {2, 32, 5, 5, 16, 1, 1, 1, 1, 0, 0, 1, 1, 1, true, true, false, NONE, BF16},
      {1, 8, 13, 13, 16, 7, 7, 2, 2, 3, 3, 1, 1, 1, true, true, true, RELU, F16},
      {1, 3, 15, 15, 8, 7, 7, 2, 2, 3, 3, 1, 1, 1, false, true, false, RELU, BF16},
      {1, 16, 9, 9, 16, 3, 3, 1, 1, 2, 2, 2, 2, 1, true, false, true, GELU, F16},
      {1, 32, 7, 8, 16, 3, 3, 1, 1, 1, 1, 1, 1, 2, true, true, true, SILU, BF16},
      {2, 12, 7, 7, 12, 3, 3, 1, 1, 1, 1, 1, 1, 12, false, true, false, NONE, F16},
      {1, 16, 9, 9, 16, 5, 5, 2, 2, 2, 2, 1, 1, 16, true, true, true, GELU, BF16},
      {1, 8, 6, 7, 8, 3, 3, 2, 1, 3, 2, 1, 1, 1, true, true, false, SILU, F16},
      {1, 5, 7, 5, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, true, RELU, F16},
      {2, 64, 12, 12, 80, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, false, GELU, F16},
      {1, 48, 10, 11, 72, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, true, true, SILU, BF16},
      {1, 32, 5, 5, 8, 3, 3, 1, 1, 1, 1, 1, 1, 4, true, false, false, RELU, BF16},
      {1, 16, 8, 8, 12, 3, 3, 1, 1, 1, 1, 2, 1, 2, true, true, true, NONE, F16},
      {1, 16, 9, 7, 16, 3, 3, 1, 2, 2, 1, 1, 2, 2, true, true, true, GELU, F32},
      {1, 6, 9, 9, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, false, false, true, SILU, F32},
      {2, 4, 5, 5, 6, 1, 1, 1, 1, 0, 0, 1, 1, 1, false, true, false, RELU, F32},
  };
  for (const ConvCase &c : fwd)
    cases.push_back({"fwd " + describe(c), [c](Result &r) {
                       by_dtype(c.dtype, [&](auto t) { conv_fwd_case<decltype(t)>(c, r); });
                     }});
  // The forward again on an emulated Hopper device: half-precision convolutions (grouped
  // ones too) take the wgmma mainloop with the gathering producer (conv_gemm_sm80.cuh's conv_gemm_run) for every
  // algorithm run; the others the sm80 kernels. Plus a case with several tiles per SM and
  // k-tiles past the 4 stages.
  std::vector<ConvCase> on_sm90(std::begin(fwd), std::end(fwd));
  on_sm90.push_back({2, 64, 16, 16, 136, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, true, RELU, BF16});
  for (const ConvCase &c : on_sm90)
    cases.push_back({"fwd sm90 " + describe(c), [c](Result &r) {
                       const int n = fk::sm90_launches_of(true, [&] {
                         by_dtype(c.dtype, [&](auto t) { conv_fwd_case<decltype(t)>(c, r); });
                       });
                       if ((n > 0) != (c.dtype != FK_DTYPE_F32))
                         r.fail("sm90 launches " + std::to_string(n));
                     }});
  const ConvCase bwd[] = {
      {2, 8, 7, 7, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, true, false, NONE, F16},
      {1, 16, 9, 8, 8, 3, 3, 2, 2, 1, 1, 1, 1, 1, true, true, false, NONE, BF16},
      {1, 8, 9, 9, 8, 3, 3, 1, 1, 2, 2, 2, 2, 2, true, false, false, NONE, F32},
      {2, 6, 6, 7, 6, 3, 3, 2, 1, 3, 1, 1, 1, 6, false, true, false, NONE, F16},
      {1, 3, 11, 11, 4, 7, 7, 2, 2, 3, 3, 1, 1, 1, true, true, false, NONE, BF16},
      {1, 4, 5, 5, 8, 1, 1, 1, 1, 0, 0, 1, 1, 2, false, true, false, NONE, F32},
      {2, 64, 12, 12, 80, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, false, NONE, F16},
      {2, 32, 10, 9, 48, 3, 3, 2, 2, 1, 1, 1, 1, 2, false, true, false, NONE, BF16, true},
      {1, 16, 9, 9, 16, 5, 5, 1, 1, 2, 2, 1, 1, 16, true, true, false, NONE, F16},
      {2, 16, 8, 8, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, false, false, NONE, F16},
      {1, 24, 8, 8, 16, 1, 1, 1, 1, 0, 0, 1, 1, 1, true, true, false, NONE, BF16, true},
      {1, 5, 7, 6, 12, 3, 3, 2, 2, 2, 2, 2, 1, 1, true, true, false, NONE, F16},
      // dweight split over pixels (BwdPlan): 2 even splits; 2 uneven, grouped, NCHW; 5.
      {2, 8, 16, 16, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, false, NONE, BF16},
      {1, 16, 23, 29, 16, 3, 3, 1, 1, 1, 1, 1, 1, 2, false, true, false, NONE, F16},
      {1, 8, 40, 40, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, false, false, NONE, F16},
      // The implicit dx's derived padding dil (R-1) - pad: negative (1x1, pad 1), dilated,
      // asymmetric.
      {1, 8, 5, 6, 16, 1, 1, 1, 1, 1, 1, 1, 1, 1, true, true, false, NONE, F16},
      {1, 16, 9, 9, 16, 3, 3, 1, 1, 2, 2, 2, 2, 2, true, false, false, NONE, BF16},
      {1, 8, 7, 10, 8, 3, 5, 1, 1, 0, 2, 1, 2, 1, true, true, false, NONE, BF16, true},
  };
  for (const ConvCase &c : bwd)
    cases.push_back({"bwd " + describe(c), [c](Result &r) {
                       by_dtype(c.dtype, [&](auto t) { conv_bwd_case<decltype(t)>(c, r); });
                     }});
  // The backward on the emulated Hopper device: half-precision cases run every GEMM on the
  // wgmma mainloop (gathering producer).
  for (const ConvCase &c : bwd)
    cases.push_back({"bwd sm90 " + describe(c), [c](Result &r) {
                       const int n = fk::sm90_launches_of(true, [&] {
                         by_dtype(c.dtype, [&](auto t) { conv_bwd_case<decltype(t)>(c, r); });
                       });
                       if ((n > 0) != (c.dtype != FK_DTYPE_F32))
                         r.fail("sm90 launches " + std::to_string(n));
                     }});
  const int MAX = FK_POOL_MAX, AVG = FK_POOL_AVG;
  // n c h w kh kw sh sw ph pw dh dw ceil kind include_pad divisor dtype nhwc ties
  const PoolCase pools[] = {
      {2, 3, 9, 9, 3, 3, 2, 2, 1, 1, 1, 1, false, MAX, 0, 0, F16, false, false},
      {1, 4, 8, 7, 3, 2, 2, 1, 1, 1, 2, 2, true, MAX, 0, 0, BF16, true, false},
      {1, 2, 7, 7, 2, 2, 2, 2, 0, 0, 1, 1, true, MAX, 0, 0, F32, false, true},
      {1, 3, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, false, MAX, 0, 0, F16, true, true},
      {2, 3, 9, 8, 3, 3, 2, 2, 1, 1, 1, 1, false, AVG, 1, 0, F16, false, false},
      {1, 4, 7, 9, 3, 2, 2, 2, 1, 1, 1, 1, true, AVG, 0, 0, BF16, true, false},
      {1, 2, 8, 8, 4, 4, 3, 3, 2, 1, 1, 1, true, AVG, 1, 0, F32, false, false},
      {1, 2, 6, 6, 3, 3, 2, 2, 1, 1, 1, 1, false, AVG, 0, 5, F16, true, false},
  };
  for (const PoolCase &c : pools) {
    char buf[200];
    snprintf(buf, sizeof buf, "pool %s %s %s %dx%d k%dx%d s%d,%d p%d,%d d%d,%d%s%s%s",
             dtype_name(c.dtype), c.kind == MAX ? "max" : "avg", c.nhwc ? "nhwc" : "nchw", c.h, c.w,
             c.kh, c.kw, c.sh, c.sw, c.ph, c.pw, c.dh, c.dw, c.ceil_mode ? " ceil" : "",
             c.kind == AVG ? (c.count_include_pad ? " incl-pad" : " excl-pad") : "",
             c.ties      ? " ties"
             : c.divisor ? " divisor"
                         : "");
    cases.push_back({buf, [c](Result &r) {
                       by_dtype(c.dtype, [&](auto t) { pool_case<decltype(t)>(c, r); });
                     }});
  }
  return cases;
}

// What the device would mis-handle is refused before any launch; supports() as documented.
// fk::FastDiv (the gathers' index arithmetic) against / and %: every divisor near a power
// of two and random ones, each with dividends at the edges (0, multiples of d and their
// neighbours, 2^31 - 1) and random ones.
bool fast_div_ok() {
  std::mt19937 rng(5);
  std::vector<int> divisors;
  for (int l = 0; l < 31; ++l)
    for (int delta = -2; delta <= 2; ++delta) {
      const int64_t d = (int64_t(1) << l) + delta;
      if (d >= 1 && d <= INT32_MAX) divisors.push_back(int(d));
    }
  for (int i = 0; i < 2000; ++i) divisors.push_back(int(rng() % INT32_MAX) + 1);
  for (int i = 0; i < 2000; ++i) divisors.push_back(int(rng() % 4096) + 1);
  for (const int d : divisors) {
    const fk::FastDiv f(d);
    std::vector<int64_t> ns = {0, 1, d - 1, d, int64_t(d) + 1, INT32_MAX, INT32_MAX - 1};
    for (int64_t k : {int64_t(2), int64_t(3), int64_t(INT32_MAX) / d, int64_t(INT32_MAX) / d - 1})
      for (int64_t e = -1; e <= 1; ++e) ns.push_back(k * d + e);
    for (int i = 0; i < 50; ++i) ns.push_back(int64_t(rng() % (uint32_t(INT32_MAX) + 1u)));
    for (const int64_t n : ns)
      if (n >= 0 && n <= INT32_MAX && f.div(int(n)) != int(n / d)) {
        printf("FastDiv(%d).div(%lld) = %d, want %lld\n", d, (long long)n, f.div(int(n)),
               (long long)(n / d));
        return false;
      }
  }
  return true;
}

int api_checks() {
  int bad = 0;
  auto expect = [&](const char *what, bool ok) {
    if (!ok) {
      printf("api %s  <-- BAD\n", what);
      ++bad;
    }
  };
  expect("FastDiv matches integer division", fast_div_ok());
  alignas(16) static __half dummy[64];
  fk_conv2d_params p{};
  p.x = p.weight = p.y = dummy;
  const int64_t nhwc[4] = {8 * 4 * 4, 1, 8 * 4, 8};
  for (int i = 0; i < 4; ++i) p.x_strides[i] = p.y_strides[i] = p.w_strides[i] = nhwc[i];
  p.shape = shape_of({1, 8, 4, 4, 8, 1, 1, 1, 1, 0, 0, 1, 1, 1, true, false, false, 0, 0});
  p.algo = FK_CONV_ALGO_IMPLICIT_GEMM, p.dtype = FK_DTYPE_F16;
  expect("implicit nhwc c8 supported", fk_conv2d_supports(&p) == 1);
  expect("implicit workspace 0", fk_conv2d_workspace_bytes(&p) == 0);
  auto q = p;
  q.x_strides[1] = 2;
  expect("implicit strided c unsupported", !fk_conv2d_supports(&q));
  q = p;
  q.shape.c = q.shape.k = 4;
  expect("implicit c4 unsupported", !fk_conv2d_supports(&q));
  q = p;
  q.algo = FK_CONV_ALGO_IM2COL;
  q.x_strides[1] = 2;
  expect("im2col strided supported", fk_conv2d_supports(&q) == 1);
  expect("im2col workspace", fk_conv2d_workspace_bytes(&q) == 256);
  q = p;
  q.dtype = FK_DTYPE_F32;
  expect("f32 supported", fk_conv2d_supports(&q) == 1);
  q = p;
  q.dtype = 9;
  expect("dtype 9 unsupported", !fk_conv2d_supports(&q));
  auto refused = [&](const char *what, fk_conv2d_params r) {
    const int launches0 = fk::g_emu_launches;
    expect(what,
           fk_conv2d_fwd(&r, nullptr) == cudaErrorInvalidValue && fk::g_emu_launches == launches0);
  };
  q = p;
  q.shape.groups = 3;
  refused("groups 3", q);
  q = p;
  q.shape.p = 5;
  refused("wrong p", q);
  q = p;
  q.y = nullptr;
  refused("null y", q);
  q = p;
  q.activation = 4;
  refused("activation 4", q);
  q = p;
  q.algo = FK_CONV_ALGO_IM2COL;
  refused("im2col without workspace", q);
  q = p;
  q.x_strides[1] = 2;
  refused("implicit unsupported layout", q);
  expect("null params", fk_conv2d_fwd(nullptr, nullptr) == cudaErrorInvalidValue);
  fk_pool2d_params f{};
  f.x = f.y = dummy, f.n = f.c = 1, f.h = f.w = 4, f.p = f.q = 2;
  f.kernel_h = f.kernel_w = f.stride_h = f.stride_w = f.dil_h = f.dil_w = 2;
  f.kind = FK_POOL_MAX, f.dtype = FK_DTYPE_F16;
  expect("max pool without indices", fk_pool2d_fwd(&f, nullptr) == cudaErrorInvalidValue);
  fk_conv2d_bwd_params b{};
  b.x = b.weight = b.dy = dummy, b.dx = b.dweight = dummy;
  for (int i = 0; i < 4; ++i) b.x_strides[i] = b.dy_strides[i] = b.w_strides[i] = nhwc[i];
  for (int i = 0; i < 4; ++i) b.dx_strides[i] = b.dw_strides[i] = nhwc[i];
  b.shape = p.shape, b.algo = FK_CONV_ALGO_IMPLICIT_GEMM, b.dtype = FK_DTYPE_BF16;
  expect("bwd supported", fk_conv2d_bwd_supports(&b) == 1);
  // Implicit: dx from the flipped weights (128 B) or dweight's im2col (256 B) + partials
  // (256 B), which run one after the other in one region; im2col: dx's f32 dcol (512 B).
  expect("bwd workspace", fk_conv2d_bwd_workspace_bytes(&b) == 512);
  auto bq = b;
  bq.dweight = nullptr;
  expect("bwd workspace dx", fk_conv2d_bwd_workspace_bytes(&bq) == 256);
  bq.algo = FK_CONV_ALGO_IM2COL;
  expect("bwd workspace dx im2col", fk_conv2d_bwd_workspace_bytes(&bq) == 512);
  const int launches0 = fk::g_emu_launches;
  expect("bwd without workspace",
         fk_conv2d_bwd(&b, nullptr) == cudaErrorInvalidValue && fk::g_emu_launches == launches0);
  b.dtype = FK_DTYPE_F32;
  expect("bwd f32 workspace 0", fk_conv2d_bwd_workspace_bytes(&b) == 0);
  // An empty batch: dweight and dbias are zeros, written all the same.
  for (int dtype : {int(FK_DTYPE_F16), FK_DTYPE_F32}) {
    alignas(16) float grads[64];
    for (float &g : grads) g = NAN;
    b.dtype = dtype, b.shape.n = 0, b.dx = nullptr, b.dweight = grads, b.dbias = grads + 32;
    b.dw_strides[0] = 8, b.dw_strides[1] = 1; // (8, 8, 1, 1) contiguous
    const bool ok = fk_conv2d_bwd(&b, nullptr) == 0 && fk_conv2d_bwd_workspace_bytes(&b) == 0;
    const int bytes = dtype == FK_DTYPE_F32 ? 4 : 2;
    bool zeros = true;
    for (int i = 0; i < 8 * 8 * bytes / 4; ++i) zeros = zeros && grads[i] == 0.f;
    for (int i = 0; i < 8 * bytes / 4; ++i) zeros = zeros && grads[32 + i] == 0.f;
    expect(dtype == FK_DTYPE_F32 ? "bwd f32 n=0 zeros" : "bwd f16 n=0 zeros", ok && zeros);
  }
  return bad;
}

} // namespace

int main(int argc, char **argv) {
  const auto cases = all_cases();
  std::vector<int> which;
  for (int i = 0; i < int(cases.size()); ++i)
    if (emu::case_selected(size_t(i), argc, argv)) which.push_back(i);
  const int api_failed = argc == 1 ? api_checks() : 0;
  if (argc == 1) printf("api checks: %s\n", api_failed ? "FAILED" : "ok");
  int failed = 0;
  printf("per case and output: worst |error| / (atol + rtol |ref|), 1 = at tolerance\n");
  for (int i : which) {
    Result r;
    cases[i].run(r);
    printf("%2d %-66s%s\n", i, cases[i].name.c_str(), r.line.c_str());
    fflush(stdout);
    failed += !r.ok;
  }
  printf("%d of %zu cases failed\n", failed, which.size());
  return failed || api_failed ? 1 : 0;
}
