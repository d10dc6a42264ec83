// Linformer projection suite: fk_linformer_proj_fwd and fk_linformer_proj_bwd
// (kernels/linformer/, on kernels/common/gemm_sm80.cuh) on the emulator against an f64
// definition. Every tensor lives in a strided layout with gaps that are NaN, allocated to
// its exact bound: a gap that is read shows up as NaN in the results, a gap that is written
// is counted (pad-touched); outputs start as NaN, so an element never written fails too.
// What must not be read is NaN as well: the rows of padded keys in K and V, E's and F's
// columns >= N in the forward, the split workspace. Bounds per element: one rounding of the
// output (2 u |ref|), the f32 accumulation (1e-5 of the absolute terms), f16's subnormal
// floor; rows / columns the header defines as 0 must be exactly 0. Runs twice where the
// case asks and compares the outputs bit for bit (determinism).
// Usage: linformer_test [case index...] (all cases by default).
#include "emu.h"
#include "strided.h"

#include "emulated/linformer/linformer_api.cu"
#include "emulated/linformer/linformer_bwd_bf16.cu"
#include "emulated/linformer/linformer_bwd_f16.cu"
#include "emulated/linformer/linformer_fwd_bf16.cu"
#include "emulated/linformer/linformer_fwd_f16.cu"

#include <array>
#include <cstring>
#include <functional>
#include <random>
#include <string>

namespace {

using suite::Strided;
using suite::to_e;
using suite::to_f;

// (head, row, col) strides of an E / F view (d[0] = 1 for E's (heads, k, n_max) in dims 1..3).
template <typename T> fk_proj_strides pst(const Strided<T> &t) { return {t.s[1], t.s[2], t.s[3]}; }

struct LinCase {
  int batch, seqlen, n_max, heads, head_dim, k_proj;
  bool e_per_head, f_per_head;
  int splits, dtype;
  int pad;         // 0 none, 1 random keys, 2 random keys and sequence 0 fully padded
  bool e_t;        // E (and F) given as transposed views (row stride 1)
  bool bhnd;       // K, V, and their gradients in (B, H, N, D) memory
  bool shared;     // f = e (forward), shared_kv (backward)
  bool unaligned;  // odd row gaps and one-element shifts: no 16-byte paths
  bool twice;      // run twice, compare bits
};

std::string describe(const LinCase &c) {
  char buf[220];
  snprintf(buf, sizeof buf, "%s B%d N%d/%d H%d D%d k%d E%s F%s s%d%s%s%s%s%s",
           c.dtype == FK_DTYPE_F16 ? "f16" : "bf16", c.batch, c.seqlen, c.n_max, c.heads,
           c.head_dim, c.k_proj, c.e_per_head ? "h" : "1", c.f_per_head ? "h" : "1", c.splits,
           c.pad == 0   ? ""
           : c.pad == 1 ? " pad"
                        : " pad+full",
           c.e_t ? " Et" : "", c.bhnd ? " bhnd" : "", c.shared ? " shared" : "",
           c.unaligned ? " unaligned" : "");
  return buf;
}

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
    worst = std::max(worst, bound > 0 ? err / bound : (err > 0 ? 1e9 : 0));
    bad += bound > 0 ? err > bound : err != 0;
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

// The problem's inputs, shared by the forward and the backward.
template <typename T> struct Inputs {
  const LinCase &c;
  int gap, shift, eh, fh;
  std::vector<uint8_t> padv;
  emu::DeviceArray<uint8_t> pad;
  Strided<T> k, v, e, f;

  // (B, rows, H, D) with row gaps, in (B, N, H, D) or (B, H, N, D) memory.
  static Strided<T> bnhd(const LinCase &c, int rows, int gap, int shift) {
    const int64_t ld = c.head_dim + gap;
    if (c.bhnd)
      return Strided<T>({c.batch, rows, c.heads, c.head_dim},
                        {int64_t(c.heads) * rows * ld, ld, int64_t(rows) * ld, 1}, shift);
    return Strided<T>({c.batch, rows, c.heads, c.head_dim},
                      {int64_t(rows) * c.heads * ld, c.heads * ld, ld, 1}, shift);
  }
  // (heads, k_proj, n_max) with gaps, row-major or a transposed view.
  static Strided<T> proj(const LinCase &c, int heads, int gap, bool t) {
    if (t) {
      const int64_t ld = c.k_proj + gap;
      return Strided<T>({1, heads, c.k_proj, c.n_max}, {0, c.n_max * ld, 1, ld});
    }
    const int64_t ld = c.n_max + gap;
    return Strided<T>({1, heads, c.k_proj, c.n_max}, {0, c.k_proj * ld, ld, 1});
  }

  explicit Inputs(const LinCase &c_)
      : c(c_), gap(c_.unaligned ? 3 : 8), shift(c_.unaligned ? 1 : 0),
        eh(c_.e_per_head ? c_.heads : 1), fh(c_.f_per_head ? c_.heads : 1),
        padv(size_t(c_.batch) * c_.seqlen, 0), pad(padv.size() ? padv.size() : 1),
        k(bnhd(c_, c_.seqlen, gap, shift)), v(bnhd(c_, c_.seqlen, gap, 0)),
        e(proj(c_, eh, gap, c_.e_t)), f(proj(c_, c_.shared ? eh : fh, gap, c_.e_t)) {
    std::mt19937 rng(77 + c.seqlen * 13 + c.k_proj * 7 + c.head_dim + c.batch);
    std::uniform_real_distribution<float> u(-1.f, 1.f), p01(0.f, 1.f);
    if (c.pad != 0)
      for (int b = 0; b < c.batch; ++b)
        for (int i = 0; i < c.seqlen; ++i) padv[b * c.seqlen + i] = p01(rng) < 0.3f;
    if (c.pad == 2)
      for (int i = 0; i < c.seqlen; ++i) padv[i] = 1;
    for (size_t i = 0; i < padv.size(); ++i) pad[i] = padv[i];
    const float se = 2.f / std::sqrt(float(c.seqlen));
    for (int b = 0; b < c.batch; ++b)
      for (int i = 0; i < c.seqlen; ++i)
        for (int h = 0; h < c.heads; ++h)
          for (int d = 0; d < c.head_dim; ++d) {
            // Padded keys' rows stay NaN: they must never be read.
            if (padded(b, i)) continue;
            k.set(b, i, h, d, u(rng));
            v.set(b, i, h, d, u(rng));
          }
    for (Strided<T> *m : {&e, &f})
      for (int h = 0; h < m->d[1]; ++h)
        for (int j = 0; j < c.k_proj; ++j)
          for (int i = 0; i < c.seqlen; ++i) m->set(0, h, j, i, se * u(rng));
  }
  bool padded(int b, int i) const { return c.pad != 0 && padv[b * c.seqlen + i] != 0; }
  const uint8_t *pad_ptr() { return c.pad != 0 ? pad.data() : nullptr; }
  Strided<T> &fmat() { return c.shared ? e : f; }
  int fheads() const { return c.shared ? eh : fh; }
};

double unit(int dtype) {
  return dtype == FK_DTYPE_F16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
}
double subn(int dtype) { return dtype == FK_DTYPE_F16 ? std::ldexp(1.0, -25) : 0.0; }

template <typename T> void fwd_case(const LinCase &c, Result &res) {
  Inputs<T> in(c);
  auto kp = Inputs<T>::bnhd(c, c.k_proj, 8, 0), vp = Inputs<T>::bnhd(c, c.k_proj, 8, 0);
  fk_linformer_proj_params p{};
  p.k = in.k.ptr(), p.v = in.v.ptr(), p.e = in.e.ptr();
  p.f = c.shared ? in.e.ptr() : in.f.ptr();
  p.key_padding = in.pad_ptr();
  p.kp = kp.ptr(), p.vp = vp.ptr();
  p.k_stride = in.k.st(), p.v_stride = in.v.st(), p.kp_stride = kp.st(), p.vp_stride = vp.st();
  p.e_stride = pst(in.e), p.f_stride = pst(in.fmat());
  p.batch = c.batch, p.seqlen = c.seqlen, p.heads_kv = c.heads, p.head_dim = c.head_dim;
  p.k_proj = c.k_proj, p.n_max = c.n_max, p.e_heads = in.eh, p.f_heads = in.fheads();
  p.splits = c.splits, p.dtype = c.dtype;
  const int64_t ws_bytes = fk_linformer_proj_workspace_bytes(&p);
  if ((ws_bytes > 0) != (c.splits > 1)) return res.fail("workspace " + std::to_string(ws_bytes));
  emu::DeviceArray<unsigned char> ws(size_t(ws_bytes > 0 ? ws_bytes : 1), 0xFF, 256);
  p.workspace = ws_bytes > 0 ? ws.data() : nullptr;
  int rc = fk_linformer_proj_fwd(&p, nullptr);
  if (rc != 0) return res.fail("rc " + std::to_string(rc));

  const double u = unit(c.dtype), sub = subn(c.dtype);
  Check ck, cv;
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.heads; ++h)
      for (int j = 0; j < c.k_proj; ++j)
        for (int d = 0; d < c.head_dim; ++d) {
          double sk = 0, mk = 0, sv = 0, mv = 0;
          const int he = c.e_per_head ? h : 0, hf = c.shared ? he : c.f_per_head ? h : 0;
          for (int i = 0; i < c.seqlen; ++i) {
            if (in.padded(b, i)) continue;
            const double tk = in.e.get(0, he, j, i) * in.k.get(b, i, h, d);
            const double tv = in.fmat().get(0, hf, j, i) * in.v.get(b, i, h, d);
            sk += tk, mk += std::fabs(tk), sv += tv, mv += std::fabs(tv);
          }
          // A sequence with every key padded: exactly 0.
          ck.add(kp.get(b, j, h, d), sk, mk == 0 ? 0 : 2 * u * std::fabs(sk) + 1e-5 * mk + sub);
          cv.add(vp.get(b, j, h, d), sv, mv == 0 ? 0 : 2 * u * std::fabs(sv) + 1e-5 * mv + sub);
        }
  res.check("kp", ck, kp.pad_touched());
  res.check("vp", cv, vp.pad_touched());
  if (c.twice) {
    auto kp2 = Inputs<T>::bnhd(c, c.k_proj, 8, 0), vp2 = Inputs<T>::bnhd(c, c.k_proj, 8, 0);
    p.kp = kp2.ptr(), p.vp = vp2.ptr();
    rc = fk_linformer_proj_fwd(&p, nullptr);
    if (rc != 0) return res.fail("second run rc " + std::to_string(rc));
    const bool same = kp.same_bits(kp2) && vp.same_bits(vp2);
    res.line += same ? " bitwise-repeat ok" : "";
    if (!same) res.fail("second run differs");
  }
}

template <typename T> void bwd_case(const LinCase &c, Result &res) {
  Inputs<T> in(c);
  std::mt19937 rng(99 + c.seqlen + c.k_proj * 5 + c.head_dim * 3);
  std::uniform_real_distribution<float> u01(-1.f, 1.f);
  auto dkp = Inputs<T>::bnhd(c, c.k_proj, in.gap, in.shift),
       dvp = Inputs<T>::bnhd(c, c.k_proj, 8, 0);
  for (int b = 0; b < c.batch; ++b)
    for (int j = 0; j < c.k_proj; ++j)
      for (int h = 0; h < c.heads; ++h)
        for (int d = 0; d < c.head_dim; ++d) {
          dkp.set(b, j, h, d, u01(rng));
          dvp.set(b, j, h, d, u01(rng));
        }
  auto dk = Inputs<T>::bnhd(c, c.seqlen, 8, 0), dv = Inputs<T>::bnhd(c, c.seqlen, 8, 0);
  auto de = Inputs<T>::proj(c, in.eh, 8, false), df = Inputs<T>::proj(c, in.fh, 8, false);
  fk_linformer_proj_bwd_params p{};
  p.k = in.k.ptr(), p.v = in.v.ptr(), p.e = in.e.ptr();
  p.f = c.shared ? in.e.ptr() : in.f.ptr();
  p.key_padding = in.pad_ptr();
  p.dkp = dkp.ptr(), p.dvp = dvp.ptr(), p.dk = dk.ptr(), p.dv = dv.ptr();
  p.de = de.ptr(), p.df = c.shared ? nullptr : df.ptr();
  p.k_stride = in.k.st(), p.v_stride = in.v.st(), p.dkp_stride = dkp.st();
  p.dvp_stride = dvp.st(), p.dk_stride = dk.st(), p.dv_stride = dv.st();
  p.e_stride = pst(in.e), p.f_stride = pst(in.fmat()), p.de_stride = pst(de);
  p.df_stride = pst(df);
  p.shared_kv = c.shared;
  p.batch = c.batch, p.seqlen = c.seqlen, p.heads_kv = c.heads, p.head_dim = c.head_dim;
  p.k_proj = c.k_proj, p.n_max = c.n_max, p.e_heads = in.eh, p.f_heads = in.fheads();
  p.dtype = c.dtype;
  if (fk_linformer_proj_bwd_workspace_bytes(&p) != 0) return res.fail("workspace");
  int rc = fk_linformer_proj_bwd(&p, nullptr);
  if (rc != 0) return res.fail("rc " + std::to_string(rc));

  const double u = unit(c.dtype), sub = subn(c.dtype);
  Check cdk, cdv, cde, cdf;
  for (int b = 0; b < c.batch; ++b)
    for (int i = 0; i < c.seqlen; ++i)
      for (int h = 0; h < c.heads; ++h)
        for (int d = 0; d < c.head_dim; ++d) {
          const int he = c.e_per_head ? h : 0, hf = c.shared ? he : c.f_per_head ? h : 0;
          double sk = 0, mk = 0, sv = 0, mv = 0;
          if (!in.padded(b, i))
            for (int j = 0; j < c.k_proj; ++j) {
              const double tk = in.e.get(0, he, j, i) * dkp.get(b, j, h, d);
              const double tv = in.fmat().get(0, hf, j, i) * dvp.get(b, j, h, d);
              sk += tk, mk += std::fabs(tk), sv += tv, mv += std::fabs(tv);
            }
          cdk.add(dk.get(b, i, h, d), sk, mk == 0 ? 0 : 2 * u * std::fabs(sk) + 1e-5 * mk + sub);
          cdv.add(dv.get(b, i, h, d), sv, mv == 0 ? 0 : 2 * u * std::fabs(sv) + 1e-5 * mv + sub);
        }
  // dP[hp][j][i] over the batches and the heads using hp (and V's terms when shared).
  auto grad = [&](Strided<T> &out, int heads, bool per_head, bool use_k, bool use_v, Check &chk) {
    for (int hp = 0; hp < heads; ++hp)
      for (int j = 0; j < c.k_proj; ++j)
        for (int i = 0; i < c.n_max; ++i) {
          double s = 0, m = 0;
          if (i < c.seqlen)
            for (int b = 0; b < c.batch; ++b) {
              if (in.padded(b, i)) continue;
              for (int h = 0; h < c.heads; ++h) {
                if (per_head && h != hp) continue;
                for (int d = 0; d < c.head_dim; ++d) {
                  if (use_k) {
                    const double t = dkp.get(b, j, h, d) * in.k.get(b, i, h, d);
                    s += t, m += std::fabs(t);
                  }
                  if (use_v) {
                    const double t = dvp.get(b, j, h, d) * in.v.get(b, i, h, d);
                    s += t, m += std::fabs(t);
                  }
                }
              }
            }
          chk.add(out.get(0, hp, j, i), s, m == 0 ? 0 : 2 * u * std::fabs(s) + 1e-5 * m + sub);
        }
  };
  grad(de, in.eh, c.e_per_head, true, c.shared, cde);
  if (!c.shared) grad(df, in.fh, c.f_per_head, false, true, cdf);
  res.check("dK", cdk, dk.pad_touched());
  res.check("dV", cdv, dv.pad_touched());
  res.check("dE", cde, de.pad_touched());
  if (!c.shared) res.check("dF", cdf, df.pad_touched());
  if (c.shared && df.pad_touched() + long(df.data.size()) -
                          long(std::count_if(df.data.begin(), df.data.end(),
                                             [](T x) { return std::isnan(to_f(x)); })) !=
                      0)
    res.fail("df written with shared_kv");
  if (c.twice) {
    auto dk2 = Inputs<T>::bnhd(c, c.seqlen, 8, 0), dv2 = Inputs<T>::bnhd(c, c.seqlen, 8, 0);
    auto de2 = Inputs<T>::proj(c, in.eh, 8, false), df2 = Inputs<T>::proj(c, in.fh, 8, false);
    p.dk = dk2.ptr(), p.dv = dv2.ptr(), p.de = de2.ptr(), p.df = c.shared ? nullptr : df2.ptr();
    rc = fk_linformer_proj_bwd(&p, nullptr);
    if (rc != 0) return res.fail("second run rc " + std::to_string(rc));
    const bool same = dk.same_bits(dk2) && dv.same_bits(dv2) && de.same_bits(de2) &&
                      (c.shared || df.same_bits(df2));
    res.line += same ? " bitwise-repeat ok" : "";
    if (!same) res.fail("second run differs");
  }
}

struct Entry {
  std::string name;
  std::function<void(Result &)> run;
};

std::vector<Entry> all_cases() {
  const int F16 = FK_DTYPE_F16, BF16 = FK_DTYPE_BF16;
  // B N n_max H D k E_per_head F_per_head splits dtype pad Et bhnd shared unaligned twice
  const LinCase cases[] = {
      {1, 37, 64, 1, 8, 1, false, false, 1, F16, 0, false, false, false, false, false},
      {2, 100, 130, 2, 16, 5, true, true, 2, BF16, 1, true, false, false, false, true},
      {2, 200, 200, 2, 64, 17, false, false, 3, F16, 2, false, true, true, false, true},
      {1, 130, 150, 3, 24, 40, true, false, 1, BF16, 1, false, false, false, true, false},
      {1, 333, 400, 1, 128, 130, true, true, 6, F16, 1, true, false, false, false, true},
      {3, 65, 65, 2, 40, 64, false, true, 2, BF16, 0, false, true, true, false, false},
      {1, 70, 90, 1, 72, 1024, false, false, 1, F16, 1, false, false, false, false, false},
      {2, 9, 16, 1, 8, 3, false, false, 1, F16, 2, true, false, false, true, true},
      {1, 20, 24, 1, 256, 8, true, true, 1, BF16, 1, false, true, false, false, false},
      {1, 1000, 1100, 1, 8, 200, false, false, 4, BF16, 1, true, false, true, false, true},
      {2, 129, 129, 2, 32, 33, true, true, 3, F16, 2, false, false, true, true, true},
      {2, 2500, 2600, 2, 64, 256, true, false, 8, BF16, 1, false, true, false, false, true},
      {1, 777, 800, 2, 128, 1024, false, true, 5, F16, 1, true, false, false, false, false},
      {4, 47, 50, 4, 8, 1, false, false, 1, BF16, 2, false, false, false, true, false},
      {1, 4100, 4100, 1, 16, 64, true, true, 65, F16, 0, false, false, false, false, true},
  };
  std::vector<Entry> out;
  for (const LinCase &c : cases)
    out.push_back({"fwd " + describe(c), [c](Result &r) {
                     if (c.dtype == FK_DTYPE_F16)
                       fwd_case<__half>(c, r);
                     else
                       fwd_case<__nv_bfloat16>(c, r);
                   }});
  for (const LinCase &c : cases)
    out.push_back({"bwd " + describe(c), [c](Result &r) {
                     if (c.dtype == FK_DTYPE_F16)
                       bwd_case<__half>(c, r);
                     else
                       bwd_case<__nv_bfloat16>(c, r);
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
  alignas(256) static __half dummy[4096];
  fk_linformer_proj_params p{};
  p.k = p.v = p.e = p.f = dummy, p.kp = p.vp = dummy;
  p.k_stride = p.v_stride = p.kp_stride = p.vp_stride = {1024, 8, 8};
  p.e_stride = p.f_stride = {1024, 128, 1};
  p.batch = 1, p.seqlen = 100, p.heads_kv = 2, p.head_dim = 8, p.k_proj = 4, p.n_max = 128;
  p.e_heads = 1, p.f_heads = 2, p.splits = 1, p.dtype = FK_DTYPE_F16;
  // Refused, nothing launched, and (unless only the workspace is wrong) no workspace size.
  auto refused = [&](const char *what, fk_linformer_proj_params r, bool sized = false) {
    const int launches0 = fk::g_emu_launches;
    expect(what, fk_linformer_proj_fwd(&r, nullptr) == cudaErrorInvalidValue &&
                     fk::g_emu_launches == launches0 &&
                     (sized || fk_linformer_proj_workspace_bytes(&r) == 0));
  };
  auto q = p;
  q.head_dim = 12, refused("head_dim 12", q);
  q = p, q.head_dim = 264, refused("head_dim 264", q);
  q = p, q.seqlen = 129, refused("seqlen > n_max", q);
  q = p, q.seqlen = 0, refused("seqlen 0", q);
  q = p, q.k_proj = 0, refused("k_proj 0", q);
  q = p, q.e_heads = 3, refused("e_heads 3", q);
  q = p, q.f_heads = 0, refused("f_heads 0", q);
  q = p, q.splits = 0, refused("splits 0", q);
  q = p, q.splits = 3, refused("splits > ceil(N / 64)", q);
  q = p, q.splits = 2, refused("splits 2 without workspace", q, true);
  q = p, q.splits = 2, q.workspace = reinterpret_cast<char *>(dummy) + 16;
  refused("workspace not 256-aligned", q, true);
  q = p, q.dtype = 3, refused("f32", q);
  q = p, q.kp = nullptr, refused("null kp", q);
  q = p, q.f = nullptr, refused("null f", q);
  q = p, q.batch = 65535, q.splits = 2, q.seqlen = 128, refused("grid z", q);
  expect("null params", fk_linformer_proj_fwd(nullptr, nullptr) == cudaErrorInvalidValue);
  q = p, q.splits = 2;
  expect("workspace bytes", fk_linformer_proj_workspace_bytes(&q) == 2 * 512);
  fk_linformer_proj_bwd_params b{};
  b.k = b.v = b.e = b.f = b.dkp = b.dvp = dummy, b.dk = b.dv = b.de = b.df = dummy;
  b.k_stride = b.v_stride = b.dkp_stride = b.dvp_stride = b.dk_stride = b.dv_stride = {1024, 8, 8};
  b.e_stride = b.f_stride = b.de_stride = b.df_stride = {1024, 128, 1};
  b.batch = 1, b.seqlen = 100, b.heads_kv = 2, b.head_dim = 8, b.k_proj = 4, b.n_max = 128;
  b.e_heads = 1, b.f_heads = 2, b.dtype = FK_DTYPE_BF16;
  auto bwd_refused = [&](const char *what, fk_linformer_proj_bwd_params r) {
    const int launches0 = fk::g_emu_launches;
    expect(what, fk_linformer_proj_bwd(&r, nullptr) == cudaErrorInvalidValue &&
                     fk::g_emu_launches == launches0);
  };
  auto r = b;
  r.df = nullptr, bwd_refused("bwd null df", r);
  r = b, r.shared_kv = 1, bwd_refused("bwd shared with df", r);
  r = b, r.shared_kv = 1, r.df = nullptr, bwd_refused("bwd shared, f_heads differ", r);
  r = b, r.shared_kv = 1, r.df = nullptr, r.f_heads = 1, r.f = dummy + 8;
  bwd_refused("bwd shared, f != e", r);
  r = b, r.shared_kv = 1, r.df = nullptr, r.f_heads = 1, r.f_stride.row = 64;
  bwd_refused("bwd shared, f strides differ", r);
  r = b, r.shared_kv = 2, bwd_refused("bwd shared_kv 2", r);
  r = b, r.de = nullptr, bwd_refused("bwd null de", r);
  r = b, r.dk = nullptr, bwd_refused("bwd null dk", r);
  r = b, r.head_dim = 4, bwd_refused("bwd head_dim 4", r);
  r = b, r.batch = 40000, r.heads_kv = 2, r.f_heads = 2, bwd_refused("bwd grid z", r);
  r = b, r.n_max = 65535 * 64 + 1, bwd_refused("bwd grid y", r);
  expect("bwd null params", fk_linformer_proj_bwd(nullptr, nullptr) == cudaErrorInvalidValue);
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
    printf("%2d %-62s%s\n", i, cases[i].name.c_str(), r.line.c_str());
    fflush(stdout);
    failed += !r.ok;
    ++ran;
  }
  printf("%d of %d cases failed\n", failed, ran);
  return failed || api_failed ? 1 : 0;
}

