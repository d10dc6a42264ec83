// Fused feed-forward suite: fk_ffn_fwd and fk_ffn_bwd (kernels/ffn/, on kernels/common/gemm_sm80.cuh,
// and the forward on an emulated Hopper device too: gemm_sm90.cuh) on
// the emulator against an f64 definition. Every matrix lives in a row-padded layout whose
// gaps are NaN: an input gap that is read shows up as NaN in the results, an output gap
// that is written is counted (pad-touched); outputs start as NaN, so an element never
// written fails too. Bounds per element: one rounding of the hidden activation carried
// through W2, one rounding of y, and the f32 accumulation's own error (see Bounds).
// Usage: ffn_test [case index...] (all cases by default).
#include "emu.h"
#include "harness.h"

#include "emulated/ffn/ffn_fwd_f16.cu"
#include "emulated/ffn/ffn_fwd_bf16.cu"
#include "emulated/ffn/ffn_bwd_f16.cu"
#include "emulated/ffn/ffn_bwd_bf16.cu"
#include "emulated/ffn/ffn_api.cu"

#include <functional>
#include <random>
#include <string>

namespace {

using harness::to_e;
using harness::to_f;

// A (rows, cols) row-major matrix with `slack` NaN elements after each row; the allocation
// ends at the last logical element (an access past it is caught). `shift` elements of
// NaN before the first (an operand off 16-byte alignment).
template <typename T> struct Mat {
  int rows, cols, shift;
  int64_t ld;
  emu::DeviceArray<T> data;
  Mat(int r, int c, int slack, int shift_ = 0) : rows(r), cols(c), shift(shift_), ld(c + slack) {
    data.assign(r == 0 ? 1 : size_t(shift + (r - 1) * ld + c), to_e<T>(NAN));
  }
  T *ptr() { return data.data() + shift; }
  T &at(int r, int c) { return data[size_t(shift + r * ld + c)]; }
  double get(int r, int c) const { return to_f(data[size_t(shift + r * ld + c)]); }
  void fill(std::mt19937 &rng, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) at(r, c) = to_e<T>(u(rng));
  }
  long pad_touched() const {
    long n = 0;
    for (size_t i = 0; i < data.size(); ++i) {
      const int64_t k = int64_t(i) - shift;
      const bool logical = k >= 0 && k % ld < cols && k / ld < rows;
      n += !logical && !std::isnan(to_f(data[i]));
    }
    return n;
  }
};

double act_ref(int act, double v) {
  switch (act) {
  case FK_FFN_RELU: return v > 0 ? v : 0;
  case FK_FFN_GELU_TANH:
    return 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
  case FK_FFN_GELU_ERF: return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
  default: return v / (1 + std::exp(-v));
  }
}

const char *act_name(int a) {
  return a == FK_FFN_RELU        ? "relu"
         : a == FK_FFN_GELU_TANH ? "gelu_tanh"
         : a == FK_FFN_GELU_ERF  ? "gelu"
                                 : "silu";
}

double act_grad_ref(int act, double v) {
  const double e = 1e-6; // central difference: ~1e-12 off on the smooth activations
  if (act == FK_FFN_RELU) return v > 0 ? 1 : 0;
  return (act_ref(act, v + e) - act_ref(act, v - e)) / (2 * e);
}

struct FfnCase {
  int tokens, d_model, d_hidden, act;
  bool gated, biases, residual;
  int dtype;
  bool unaligned = false; // x and W1 one element off 16-byte alignment, odd row strides
};

std::string describe(const FfnCase &c) {
  char buf[200];
  snprintf(buf, sizeof buf, "%s t%d dm%d dh%d %s%s%s%s%s",
           c.dtype == FK_DTYPE_F16 ? "f16" : "bf16", c.tokens, c.d_model, c.d_hidden,
           act_name(c.act), c.gated ? " gated" : "", c.biases ? " bias" : "",
           c.residual ? " residual" : "", c.unaligned ? " unaligned" : "");
  return buf;
}

// Per-element check |got - ref| <= bound, with bookkeeping of the worst ratio.
struct Check {
  double worst = 0;
  long bad = 0, nonfinite = 0, count = 0;
  void add(double got, double ref, double bound) {
    ++count;
    if (!std::isfinite(got)) {
      ++nonfinite;
      return;
    }
    const double err = std::fabs(got - ref);
    worst = std::max(worst, err / bound);
    bad += err > bound;
  }
};

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

template <typename T> void ffn_fwd_case(const FfnCase &cc, Result &res) {
  std::mt19937 rng(1234 + cc.tokens * 7 + cc.d_model * 13 + cc.d_hidden);
  const int slack = cc.unaligned ? 3 : 8; // 8: the 16-byte paths stay possible
  const int shift = cc.unaligned ? 1 : 0;
  Mat<T> x(cc.tokens, cc.d_model, slack, shift), w1(cc.d_hidden, cc.d_model, slack, shift);
  Mat<T> w3(cc.gated ? cc.d_hidden : 0, cc.d_model, 8), w2(cc.d_model, cc.d_hidden, 8);
  Mat<T> h(cc.tokens, cc.d_hidden, 8), y(cc.tokens, cc.d_model, 8);
  Mat<T> b1(1, cc.d_hidden, 0), b2(1, cc.d_model, 0), b3(1, cc.d_hidden, 0);
  // nn.Linear's scale: pre-activations O(1), so every activation's curved part is used.
  const float s1 = 2.f / std::sqrt(float(cc.d_model)), s2 = 2.f / std::sqrt(float(cc.d_hidden));
  x.fill(rng, 1.f), w1.fill(rng, s1), w2.fill(rng, s2);
  if (cc.gated) w3.fill(rng, s1);
  b1.fill(rng, 0.5f), b2.fill(rng, 0.5f), b3.fill(rng, 0.5f);

  fk_ffn_params p{};
  p.x = x.ptr(), p.w1 = w1.ptr(), p.w2 = w2.ptr(), p.w3 = cc.gated ? w3.ptr() : nullptr;
  p.b1 = cc.biases ? b1.ptr() : nullptr, p.b2 = cc.biases ? b2.ptr() : nullptr;
  p.b3 = cc.biases && cc.gated ? b3.ptr() : nullptr;
  p.h = h.ptr(), p.y = y.ptr();
  p.x_stride = x.ld, p.w1_stride = w1.ld, p.w2_stride = w2.ld, p.w3_stride = w3.ld;
  p.h_stride = h.ld, p.y_stride = y.ld;
  p.tokens = cc.tokens, p.d_model = cc.d_model, p.d_hidden = cc.d_hidden;
  p.activation = cc.act, p.residual = cc.residual, p.dtype = cc.dtype;
  const int rc = fk_ffn_fwd(&p, nullptr);
  if (rc != 0) return res.fail("rc " + std::to_string(rc));

  // The definition in f64 from the stored inputs; bounds from the unit roundoff u: h is
  // rounded once (2 u |h|), y once (2 u |y|) after h's rounding went through W2
  // (2 u (|h| |W2|ᵀ)); the f32 accumulations add about K 2^-24 of the absolute products
  // (1e-5 of them, with margin); f16 subnormals 2^-25 per rounding.
  const double u = cc.dtype == FK_DTYPE_F16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
  const double sub = cc.dtype == FK_DTYPE_F16 ? std::ldexp(1.0, -25) : 0.0;
  std::vector<double> hv(cc.d_hidden);
  Check ch, cy;
  for (int t = 0; t < cc.tokens; ++t) {
    for (int j = 0; j < cc.d_hidden; ++j) {
      double a = cc.biases ? b1.get(0, j) : 0.0, g = cc.biases && cc.gated ? b3.get(0, j) : 0.0;
      double mag_a = std::fabs(a), mag_g = std::fabs(g);
      for (int k = 0; k < cc.d_model; ++k) {
        a += x.get(t, k) * w1.get(j, k);
        mag_a += std::fabs(x.get(t, k) * w1.get(j, k));
        if (cc.gated) {
          g += x.get(t, k) * w3.get(j, k);
          mag_g += std::fabs(x.get(t, k) * w3.get(j, k));
        }
      }
      // |act'| <= 1.13 for every activation here.
      hv[j] = act_ref(cc.act, a) * (cc.gated ? g : 1.0);
      const double acc_err = 1e-5 * (cc.gated ? 1.13 * mag_a * std::fabs(g) +
                                                    std::fabs(act_ref(cc.act, a)) * mag_g
                                              : 1.13 * mag_a);
      ch.add(h.get(t, j), hv[j], 2 * u * std::fabs(hv[j]) + acc_err + sub + 1e-30);
    }
    for (int i = 0; i < cc.d_model; ++i) {
      double v = cc.biases ? b2.get(0, i) : 0.0, prop = 0, w2abs = 0;
      for (int j = 0; j < cc.d_hidden; ++j) {
        v += hv[j] * w2.get(i, j);
        prop += std::fabs(hv[j] * w2.get(i, j));
        w2abs += std::fabs(w2.get(i, j));
      }
      if (cc.residual) v += x.get(t, i);
      const double bound = (2 * u + 1e-5) * (prop + std::fabs(v)) + sub * (w2abs + 1) + 1e-30;
      cy.add(y.get(t, i), v, bound);
    }
  }
  res.check("h", ch, h.pad_touched());
  res.check("y", cy, y.pad_touched());
}

// The backward against the gradients' f64 definitions. Bounds: du and dg are stored once in
// the storage dtype and every gradient once more, so each is within 2 u of the absolute sum
// of its terms, the intermediates at their magnitudes (mdu = |dy| |W2| |g| |act'(u)|, mdg =
// |dy| |W2| |act(u)|), plus 2e-5 of it for the f32 accumulations, plus f16's subnormal floor
// per rounding.
template <typename T> void ffn_bwd_case(const FfnCase &cc, Result &res) {
  std::mt19937 rng(4321 + cc.tokens * 7 + cc.d_model * 13 + cc.d_hidden);
  const int slack = cc.unaligned ? 3 : 8, shift = cc.unaligned ? 1 : 0;
  const int T_ = cc.tokens, DM = cc.d_model, DH = cc.d_hidden;
  Mat<T> x(T_, DM, slack, shift), w1(DH, DM, slack, shift), w3(cc.gated ? DH : 0, DM, 8);
  Mat<T> w2(DM, DH, 8), dy(T_, DM, slack, shift);
  Mat<T> b1(1, DH, 0), b3(1, DH, 0);
  const float s1 = 2.f / std::sqrt(float(DM)), s2 = 2.f / std::sqrt(float(DH));
  x.fill(rng, 1.f), w1.fill(rng, s1), w2.fill(rng, s2), dy.fill(rng, 1.f);
  if (cc.gated) w3.fill(rng, s1);
  b1.fill(rng, 0.5f), b3.fill(rng, 0.5f);
  Mat<T> dx(T_, DM, 8), dw1(DH, DM, 8), dw2(DM, DH, 8), dw3(cc.gated ? DH : 0, DM, 8);
  Mat<T> db1(1, DH, 0), db2(1, DM, 0), db3(1, DH, 0);

  fk_ffn_bwd_params p{};
  p.x = x.ptr(), p.w1 = w1.ptr(), p.w2 = w2.ptr(), p.w3 = cc.gated ? w3.ptr() : nullptr;
  p.b1 = cc.biases ? b1.ptr() : nullptr, p.b3 = cc.biases && cc.gated ? b3.ptr() : nullptr;
  p.dy = dy.ptr(), p.dx = dx.ptr(), p.dw1 = dw1.ptr(), p.dw2 = dw2.ptr();
  p.dw3 = cc.gated ? dw3.ptr() : nullptr;
  p.db1 = db1.ptr(), p.db2 = db2.ptr(), p.db3 = cc.gated ? db3.ptr() : nullptr;
  p.x_stride = x.ld, p.w1_stride = w1.ld, p.w2_stride = w2.ld, p.w3_stride = w3.ld;
  p.dy_stride = dy.ld, p.dx_stride = dx.ld, p.dw1_stride = dw1.ld, p.dw2_stride = dw2.ld;
  p.dw3_stride = dw3.ld;
  p.tokens = T_, p.d_model = DM, p.d_hidden = DH;
  p.activation = cc.act, p.residual = cc.residual, p.dtype = cc.dtype;
  const int64_t ws_bytes = fk_ffn_bwd_workspace_bytes(&p);
  if (ws_bytes <= 0) return res.fail("workspace 0");
  emu::DeviceArray<unsigned char> ws(size_t(ws_bytes), 0xFF, 256); // NaN: unwritten shows
  p.workspace = ws.data();
  const int rc = fk_ffn_bwd(&p, nullptr);
  if (rc != 0) return res.fail("rc " + std::to_string(rc));

  const double u = cc.dtype == FK_DTYPE_F16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
  const double sub = cc.dtype == FK_DTYPE_F16 ? std::ldexp(1.0, -25) : 0.0;
  const double rel = 2 * u + 2e-5;
  // Per (t, j): h, du, dg and their magnitudes.
  std::vector<double> h(T_ * DH), du(T_ * DH), dg(T_ * DH), mdu(T_ * DH), mdg(T_ * DH);
  for (int t = 0; t < T_; ++t)
    for (int j = 0; j < DH; ++j) {
      double a = cc.biases ? b1.get(0, j) : 0.0, g = cc.biases && cc.gated ? b3.get(0, j) : 0.0;
      for (int k = 0; k < DM; ++k) {
        a += x.get(t, k) * w1.get(j, k);
        if (cc.gated) g += x.get(t, k) * w3.get(j, k);
      }
      double dh = 0, mdh = 0;
      for (int i = 0; i < DM; ++i) {
        dh += dy.get(t, i) * w2.get(i, j);
        mdh += std::fabs(dy.get(t, i) * w2.get(i, j));
      }
      const double gv = cc.gated ? g : 1.0, d = act_grad_ref(cc.act, a);
      const int k = t * DH + j;
      h[k] = act_ref(cc.act, a) * gv;
      du[k] = dh * gv * d, mdu[k] = mdh * std::fabs(gv) * (std::fabs(d) + 1e-5);
      dg[k] = dh * act_ref(cc.act, a), mdg[k] = mdh * (std::fabs(act_ref(cc.act, a)) + 1e-5);
    }
  Check cx, c1, c2, c3, cb1, cb2, cb3;
  for (int t = 0; t < T_; ++t)
    for (int c = 0; c < DM; ++c) {
      double v = cc.residual ? dy.get(t, c) : 0.0, m = 0, wabs = 0;
      for (int j = 0; j < DH; ++j) {
        v += du[t * DH + j] * w1.get(j, c);
        m += mdu[t * DH + j] * std::fabs(w1.get(j, c));
        wabs += std::fabs(w1.get(j, c));
        if (cc.gated) {
          v += dg[t * DH + j] * w3.get(j, c);
          m += mdg[t * DH + j] * std::fabs(w3.get(j, c));
          wabs += std::fabs(w3.get(j, c));
        }
      }
      cx.add(dx.get(t, c), v, rel * (m + std::fabs(v)) + sub * (wabs + 1) + 1e-30);
    }
  for (int j = 0; j < DH; ++j) {
    for (int c = 0; c < DM; ++c) {
      double v1 = 0, m1 = 0, v3 = 0, m3 = 0, xabs = 0;
      for (int t = 0; t < T_; ++t) {
        v1 += du[t * DH + j] * x.get(t, c), m1 += mdu[t * DH + j] * std::fabs(x.get(t, c));
        v3 += dg[t * DH + j] * x.get(t, c), m3 += mdg[t * DH + j] * std::fabs(x.get(t, c));
        xabs += std::fabs(x.get(t, c));
      }
      c1.add(dw1.get(j, c), v1, rel * (m1 + std::fabs(v1)) + sub * (xabs + 1) + 1e-30);
      if (cc.gated) c3.add(dw3.get(j, c), v3, rel * (m3 + std::fabs(v3)) + sub * (xabs + 1) + 1e-30);
    }
    double s1v = 0, s1m = 0, s3v = 0, s3m = 0;
    for (int t = 0; t < T_; ++t)
      s1v += du[t * DH + j], s1m += mdu[t * DH + j], s3v += dg[t * DH + j], s3m += mdg[t * DH + j];
    cb1.add(db1.get(0, j), s1v, rel * (s1m + std::fabs(s1v)) + sub * (T_ + 1) + 1e-30);
    if (cc.gated) cb3.add(db3.get(0, j), s3v, rel * (s3m + std::fabs(s3v)) + sub * (T_ + 1) + 1e-30);
  }
  for (int i = 0; i < DM; ++i) {
    for (int j = 0; j < DH; ++j) {
      double v = 0, m = 0, dyabs = 0;
      for (int t = 0; t < T_; ++t) {
        v += dy.get(t, i) * h[t * DH + j], m += std::fabs(dy.get(t, i) * h[t * DH + j]);
        dyabs += std::fabs(dy.get(t, i));
      }
      c2.add(dw2.get(i, j), v, rel * (m + std::fabs(v)) + sub * (dyabs + 1) + 1e-30);
    }
    double sv = 0, sm = 0;
    for (int t = 0; t < T_; ++t) sv += dy.get(t, i), sm += std::fabs(dy.get(t, i));
    cb2.add(db2.get(0, i), sv, rel * (sm + std::fabs(sv)) + 1e-30);
  }
  res.check("dx", cx, dx.pad_touched());
  res.check("dW1", c1, dw1.pad_touched());
  res.check("dW2", c2, dw2.pad_touched());
  res.check("db1", cb1, 0);
  res.check("db2", cb2, 0);
  if (cc.gated) {
    res.check("dW3", c3, dw3.pad_touched());
    res.check("db3", cb3, 0);
  }
}

struct Entry {
  std::string name;
  std::function<void(Result &)> run;
};

std::vector<Entry> all_cases() {
  const int F16 = FK_DTYPE_F16, BF16 = FK_DTYPE_BF16;
  const int RELU = FK_FFN_RELU, TANH = FK_FFN_GELU_TANH, GELU = FK_FFN_GELU_ERF,
            SILU = FK_FFN_SILU;
  // tokens d_model d_hidden act gated biases residual dtype [unaligned]
  const FfnCase cases[] = {
      {1, 8, 8, RELU, false, false, false, F16},
      {7, 24, 40, GELU, false, true, true, BF16},
      {33, 72, 136, SILU, true, true, false, F16}, // SwiGLU; 2 d_hidden spans 5 blocks
      {129, 64, 96, GELU, true, false, true, BF16}, // GeGLU; tokens cross a 128-row tile
      {33, 136, 24, TANH, false, true, true, F16},  // d_model: 3 k-tiles, 3 output blocks
      {7, 40, 72, TANH, true, true, true, BF16},
      {129, 16, 8, RELU, true, true, true, BF16},
      {1, 8, 200, SILU, false, false, true, F16},
      {33, 56, 48, SILU, true, true, true, F16, true},   // gathers, element stores
      {7, 24, 16, GELU, false, true, false, BF16, true},
      {130, 32, 64, RELU, false, true, true, F16},
      {3, 8, 72, GELU, true, false, false, F16},
  };
  std::vector<Entry> out;
  for (const FfnCase &c : cases)
    out.push_back({"fwd " + describe(c), [c](Result &r) {
                     if (c.dtype == FK_DTYPE_F16)
                       ffn_fwd_case<__half>(c, r);
                     else
                       ffn_fwd_case<__nv_bfloat16>(c, r);
                   }});
  // The forward again on an emulated Hopper device (fk_ffn_fwd takes the TMA + wgmma path of
  // ffn_sm90.cuh where every matrix is TMA-describable, the sm80 path otherwise), plus
  // shapes for its pipeline: k-tiles past the 4 stages (the barriers' phases wrap), more
  // tiles than the 3 emulated SMs (the persistent loop), a partial last k-tile.
  const FfnCase sm90_extra[] = {
      {300, 520, 136, GELU, true, true, true, BF16},
      {260, 136, 392, SILU, false, true, true, F16},
  };
  std::vector<FfnCase> on_sm90(std::begin(cases), std::end(cases));
  on_sm90.insert(on_sm90.end(), std::begin(sm90_extra), std::end(sm90_extra));
  for (const FfnCase &c : on_sm90)
    out.push_back({"fwd sm90 " + describe(c), [c](Result &r) {
                     const int n = fk::sm90_launches_of(true, [&] {
                       if (c.dtype == FK_DTYPE_F16)
                         ffn_fwd_case<__half>(c, r);
                       else
                         ffn_fwd_case<__nv_bfloat16>(c, r);
                     });
                     const int want = c.unaligned ? 0 : 2; // unaligned: the sm80 fallback
                     if (n != want)
                       r.fail("sm90 launches " + std::to_string(n) + ", want " +
                              std::to_string(want));
                   }});
  const FfnCase bwd[] = {
      {1, 8, 8, RELU, false, false, false, F16},
      {7, 24, 40, GELU, false, true, true, BF16},
      {33, 72, 136, SILU, true, true, false, F16},
      {129, 64, 24, GELU, true, false, true, BF16}, // tokens: 3 k-tiles of the dW GEMMs
      {33, 136, 24, TANH, false, true, true, F16},
      {7, 40, 72, TANH, true, true, true, BF16, true},
      {130, 16, 8, SILU, false, true, false, F16},
  };
  for (const FfnCase &c : bwd)
    out.push_back({"bwd " + describe(c), [c](Result &r) {
                     if (c.dtype == FK_DTYPE_F16)
                       ffn_bwd_case<__half>(c, r);
                     else
                       ffn_bwd_case<__nv_bfloat16>(c, r);
                   }});
  // The backward on the emulated Hopper device too (all of its GEMMs on the TMA + wgmma
  // path, transposed operands MN-major), plus shapes that cross its 128-wide tiles and k
  // tiles (gated dx: the stacked W1 / W3 reduction with d_hidden not a multiple of 64).
  std::vector<FfnCase> bwd_sm90(std::begin(bwd), std::end(bwd));
  bwd_sm90.push_back({200, 136, 200, SILU, true, true, true, BF16});
  bwd_sm90.push_back({130, 72, 264, GELU, false, true, false, F16});
  for (const FfnCase &c : bwd_sm90)
    out.push_back({"bwd sm90 " + describe(c), [c](Result &r) {
                     const int n = fk::sm90_launches_of(true, [&] {
                       if (c.dtype == FK_DTYPE_F16)
                         ffn_bwd_case<__half>(c, r);
                       else
                         ffn_bwd_case<__nv_bfloat16>(c, r);
                     });
                     // recompute, dh, dx, dW1 [, dW3], dW2; unaligned: the sm80 fallback
                     const int want = c.unaligned ? 0 : c.gated ? 6 : 5;
                     if (n != want)
                       r.fail("sm90 launches " + std::to_string(n) + ", want " +
                              std::to_string(want));
                   }});
  return out;
}

// What the device would mis-handle is refused before any launch.
int api_checks() {
  int bad = 0;
  auto expect = [&](const char *what, bool ok) {
    if (!ok) {
      printf("api %s  <-- BAD\n", what);
      ++bad;
    }
  };
  alignas(16) static __half dummy[4096];
  fk_ffn_params p{};
  p.x = p.w1 = p.w2 = dummy, p.h = p.y = dummy;
  p.tokens = 4, p.d_model = 8, p.d_hidden = 16;
  p.x_stride = p.y_stride = 8, p.w1_stride = 8, p.w2_stride = 16, p.h_stride = 16;
  p.activation = FK_FFN_RELU, p.dtype = FK_DTYPE_F16;
  auto refused = [&](const char *what, fk_ffn_params r) {
    const int launches0 = fk::g_emu_launches;
    expect(what, fk_ffn_fwd(&r, nullptr) == cudaErrorInvalidValue &&
                     fk::g_emu_launches == launches0);
  };
  auto q = p;
  q.d_model = 12, q.x_stride = q.y_stride = q.w1_stride = 12;
  refused("d_model 12", q);
  q = p, q.d_hidden = 20, q.w2_stride = q.h_stride = 20;
  refused("d_hidden 20", q);
  q = p, q.h = nullptr, refused("null h", q);
  q = p, q.y = nullptr, refused("null y", q);
  q = p, q.b3 = dummy, refused("b3 without w3", q);
  q = p, q.x_stride = 4, refused("x row stride below d_model", q);
  q = p, q.h_stride = 8, refused("h row stride below d_hidden", q);
  q = p, q.activation = 0, refused("activation 0", q);
  q = p, q.activation = 5, refused("activation 5", q);
  q = p, q.dtype = 3, refused("f32", q);
  q = p, q.tokens = -1, refused("negative tokens", q);
  q = p, q.residual = 2, refused("residual 2", q);
  expect("null params", fk_ffn_fwd(nullptr, nullptr) == cudaErrorInvalidValue);
  fk_ffn_bwd_params b{};
  b.x = b.w1 = b.w2 = b.dy = dummy, b.dx = b.dw1 = b.dw2 = dummy;
  b.tokens = 4, b.d_model = 8, b.d_hidden = 16;
  b.x_stride = b.dy_stride = b.dx_stride = b.w1_stride = b.dw1_stride = 8;
  b.w2_stride = b.dw2_stride = 16;
  b.activation = FK_FFN_GELU_ERF, b.dtype = FK_DTYPE_BF16;
  expect("bwd workspace", fk_ffn_bwd_workspace_bytes(&b) == 256 + 256 + 256);
  auto bwd_refused = [&](const char *what, fk_ffn_bwd_params r) {
    const int launches0 = fk::g_emu_launches;
    expect(what, fk_ffn_bwd(&r, nullptr) == cudaErrorInvalidValue &&
                     fk::g_emu_launches == launches0);
  };
  bwd_refused("bwd without workspace", b);
  alignas(256) static unsigned char wsp[1024];
  b.workspace = wsp;
  auto r = b;
  r.workspace = wsp + 16, bwd_refused("bwd workspace not 256-aligned", r);
  r = b, r.tokens = 0, bwd_refused("bwd no tokens", r);
  r = b, r.dw3 = dummy, bwd_refused("bwd dw3 without w3", r);
  r = b, r.w3 = dummy, r.w3_stride = 8, bwd_refused("bwd gated without dw3", r);
  r = b, r.dx = nullptr, bwd_refused("bwd null dx", r);
  r = b, r.d_hidden = 12, bwd_refused("bwd d_hidden 12", r);
  r = b, r.dw2_stride = 8, bwd_refused("bwd dw2 row stride below d_hidden", r);
  q = p, q.tokens = 0;
  const int launches0 = fk::g_emu_launches;
  expect("no tokens: success, nothing launched",
         fk_ffn_fwd(&q, nullptr) == 0 && fk::g_emu_launches == launches0);
  return bad;
}

} // namespace

int main(int argc, char **argv) {
  const auto cases = all_cases();
  const int api_failed = argc == 1 ? api_checks() : 0;
  if (argc == 1) printf("api checks: %s\n", api_failed ? "FAILED" : "ok");
  int failed = 0, ran = 0;
  printf("per case and output: worst |error| / bound, 1 = at the bound\n");
  for (int i = 0; i < int(cases.size()); ++i) {
    if (!emu::case_selected(size_t(i), argc, argv)) continue;
    Result r;
    const std::string label = "case " + std::to_string(i) + " (" + cases[i].name + ")";
    emu::g_case = label.c_str();
    cases[i].run(r);
    emu::g_case = nullptr;
    printf("%2d %-52s%s\n", i, cases[i].name.c_str(), r.line.c_str());
    fflush(stdout);
    failed += !r.ok;
    ++ran;
  }
  printf("%d of %d cases failed\n", failed, ran);
  return failed || api_failed ? 1 : 0;
}

