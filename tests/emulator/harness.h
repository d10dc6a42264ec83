// Test harness shared by the emulator drivers: problem cases, tensors with padded and
// NaN-poisoned layouts, the f64 reference of attention forward and backward, and the
// comparisons.
#pragma once
#include "emu.h"
#include "kernels/include/flashkernels.h"

#include <random>
#include <string>
#include <vector>

namespace harness {

template <typename T> T to_e(float x);
template <> inline __half to_e<__half>(float x) { return __float2half_rn(x); }
template <> inline __nv_bfloat16 to_e<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

struct Case {
  std::string name;
  int dtype; // FK_DTYPE_*
  int H, Hkv, D;
  std::vector<int> nq, nk; // per sequence; all equal unless varlen
  bool varlen;
  int wl, wr;              // window sides, -1 = unbounded (causal: wr = 0)
  bool head_major = false; // dense only: (B, H, N, D) strides instead of (B, N, H, D)
  bool fwd_then_bwd = false; // backward suite: O and LSE from the forward kernel
};

// Sequence bookkeeping: logical row r of sequence b is start[b] + r (dense batches too).
struct Seqs {
  int B = 0, maxq = 0, maxk = 0;
  std::vector<int> cq, ck;
  explicit Seqs(const Case &c) : B(int(c.nq.size())), cq(B + 1, 0), ck(B + 1, 0) {
    for (int b = 0; b < B; ++b) {
      maxq = std::max(maxq, c.nq[b]);
      maxk = std::max(maxk, c.nk[b]);
      cq[b + 1] = cq[b] + c.nq[b];
      ck[b + 1] = ck[b] + c.nk[b];
      if (!c.varlen && (c.nq[b] != c.nq[0] || c.nk[b] != c.nk[0])) {
        fprintf(stderr, "%s: a dense batch needs equal lengths\n", c.name.c_str());
        abort();
      }
    }
  }
  int totq() const { return cq[B]; }
  int totk() const { return ck[B]; }
};

// A (rows, heads, D) tensor in a padded layout. Every element that is not part of a
// sequence (head-dim padding, row / head / batch gaps) starts as NaN: inputs there must
// never be read (a read shows up as NaN in the results), outputs there must stay NaN. The
// allocation (emu::DeviceArray) ends right after the last element of the last row, so a
// read or write past it is caught (ASan build: at once; elsewhere: a guard page). Varlen
// batch strides are set to nonsense since the ABI says they are ignored (if used, accesses
// land in other rows or past the end).
template <typename T> struct Tensor {
  emu::DeviceArray<T> data;
  int64_t bs = 0, rs = 0, hs = 0;
  bool varlen = false;
  std::vector<int> start; // varlen: first packed row of each sequence
  int heads = 0, D = 0;

  Tensor(const Case &c, const std::vector<int> &cu, int maxn, int heads_, int D_)
      : varlen(c.varlen), start(cu), heads(heads_), D(D_) {
    const int B = int(cu.size()) - 1;
    const int64_t Dalloc = D + 16; // two 16-byte chunks of garbage after each head's row
    if (varlen) {
      hs = Dalloc;
      rs = heads * Dalloc + 8;
      bs = 7 * rs;
    } else if (!c.head_major) {
      hs = Dalloc;
      rs = heads * Dalloc + 8;
      bs = maxn * rs + 8;
    } else {
      rs = Dalloc;
      hs = maxn * Dalloc + 8;
      bs = heads * hs + 8;
    }
    // Exactly up to the last valid element.
    int64_t count = 0;
    for (int b = 0; b < B; ++b) {
      const int n = varlen ? cu[b + 1] - cu[b] : maxn;
      if (n > 0 && heads > 0 && D > 0) count = std::max(count, index(b, n - 1, heads - 1, D - 1) + 1);
    }
    data.assign(size_t(count), to_e<T>(NAN));
  }
  int64_t index(int b, int i, int h, int d) const {
    return varlen ? (start[b] + i) * rs + h * hs + d : b * bs + i * rs + h * hs + d;
  }
  T &at(int b, int i, int h, int d) { return data[index(b, i, h, d)]; }
  float get(int b, int i, int h, int d) const { return to_f(data[index(b, i, h, d)]); }
};

// LSE-like (B, H, Nq) f32 with a padded head stride, or (H, total_q) for varlen; the
// allocation ends at the last valid element.
struct Lse {
  emu::DeviceArray<float> data;
  int64_t bs = 0, hs = 0;
  bool varlen;
  std::vector<int> start;
  Lse(const Case &c, const Seqs &s) : varlen(c.varlen), start(s.cq) {
    int64_t count = 0;
    if (varlen) {
      hs = s.totq() + 4;
      bs = 3; // ignored by contract
      if (s.totq() > 0) count = (c.H - 1) * hs + s.totq();
    } else {
      hs = s.maxq + 4;
      bs = c.H * hs + 4;
      if (s.maxq > 0) count = (s.B - 1) * bs + (c.H - 1) * hs + s.maxq;
    }
    data.assign(size_t(count), NAN);
  }
  int64_t index(int b, int h, int i) const {
    return varlen ? h * hs + start[b] + i : b * bs + h * hs + i;
  }
  float &at(int b, int h, int i) { return data[index(b, h, i)]; }
};

// Query i of a sequence with lengths nq, nk sees key j (the ABI's mask, bottom-right).
inline bool visible(const Case &c, int nq, int nk, int i, int j) {
  const int64_t diag = nk - nq;
  if (c.wl >= 0 && j < i + diag - c.wl) return false;
  if (c.wr >= 0 && j > i + diag + c.wr) return false;
  return true;
}

// The problem's inputs, random N(0, 1) where valid.
template <typename T> struct Problem {
  Case c;
  Seqs s;
  float scale;
  Tensor<T> Q, K, V, dO;
  Problem(const Case &c_, uint32_t seed)
      : c(c_), s(c_), scale(1.f / std::sqrt(float(c_.D))), Q(c, s.cq, s.maxq, c.H, c.D),
        K(c, s.ck, s.maxk, c.Hkv, c.D), V(c, s.ck, s.maxk, c.Hkv, c.D),
        dO(c, s.cq, s.maxq, c.H, c.D) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    for (int b = 0; b < s.B; ++b)
      for (int i = 0; i < c.nq[b]; ++i)
        for (int h = 0; h < c.H; ++h)
          for (int d = 0; d < c.D; ++d) {
            Q.at(b, i, h, d) = to_e<T>(nd(rng));
            dO.at(b, i, h, d) = to_e<T>(nd(rng));
          }
    for (int b = 0; b < s.B; ++b)
      for (int j = 0; j < c.nk[b]; ++j)
        for (int h = 0; h < c.Hkv; ++h)
          for (int d = 0; d < c.D; ++d) {
            K.at(b, j, h, d) = to_e<T>(nd(rng));
            V.at(b, j, h, d) = to_e<T>(nd(rng));
          }
  }
  Tensor<T> like_q() const { return Tensor<T>(c, s.cq, s.maxq, c.H, c.D); }
  Tensor<T> like_k() const { return Tensor<T>(c, s.ck, s.maxk, c.Hkv, c.D); }
  int kv_head(int h) const { return h / (c.H / c.Hkv); }
};

// f64 reference forward of one query row: normalized P over the sequence's keys, O, LSE.
template <typename T>
void ref_row(const Problem<T> &p, int b, int h, int i, std::vector<double> &P,
             std::vector<double> &O, double &L) {
  const int nq = p.c.nq[b], nk = p.c.nk[b], hk = p.kv_head(h), D = p.c.D;
  P.assign(nk, 0.0);
  O.assign(D, 0.0);
  double mx = -INFINITY;
  for (int j = 0; j < nk; ++j) {
    if (!visible(p.c, nq, nk, i, j)) {
      P[j] = -INFINITY;
      continue;
    }
    double a = 0;
    for (int d = 0; d < D; ++d) a += double(p.Q.get(b, i, h, d)) * p.K.get(b, j, hk, d);
    P[j] = a * double(p.scale);
    mx = std::max(mx, P[j]);
  }
  double l = 0;
  for (int j = 0; j < nk; ++j) {
    P[j] = mx == -INFINITY ? 0.0 : std::exp(P[j] - mx);
    l += P[j];
  }
  L = l > 0 ? mx + std::log(l) : -INFINITY;
  for (int j = 0; j < nk; ++j) {
    if (l > 0) P[j] /= l;
    if (P[j] != 0.0)
      for (int d = 0; d < D; ++d) O[d] += P[j] * p.V.get(b, j, hk, d);
  }
}

// Fills params' tensor fields shared by forward and backward.
template <typename Params, typename T>
void set_common(Params &q, const Problem<T> &p, const Lse &lse,
                const emu::DeviceArray<int32_t> &cuq, const emu::DeviceArray<int32_t> &cuk) {
  q.cu_seqlens_q = p.c.varlen ? cuq.data() : nullptr;
  q.cu_seqlens_k = p.c.varlen ? cuk.data() : nullptr;
  q.base.q_stride.batch = p.Q.bs, q.base.q_stride.row = p.Q.rs, q.base.q_stride.head = p.Q.hs;
  q.base.k_stride.batch = p.K.bs, q.base.k_stride.row = p.K.rs, q.base.k_stride.head = p.K.hs;
  q.base.v_stride.batch = p.V.bs, q.base.v_stride.row = p.V.rs, q.base.v_stride.head = p.V.hs;
  q.base.lse_stride.batch = lse.bs, q.base.lse_stride.head = lse.hs;
  q.base.shape.batch = p.s.B, q.base.shape.heads = p.c.H, q.base.shape.heads_kv = p.c.Hkv;
  q.base.shape.seqlen_q = p.s.maxq, q.base.shape.seqlen_k = p.s.maxk;
  q.base.shape.head_dim = p.c.D, q.base.shape.softmax_scale = p.scale;
  q.window_left = p.c.wl, q.window_right = p.c.wr;
  q.base.shape.dtype = p.c.dtype, q.base.shape.device = 0;
}

// Runs the forward through the C entry point into O and lse (poisoned beforehand).
template <typename T>
int run_fwd(const Problem<T> &p, Tensor<T> &O, Lse &lse) {
  const emu::DeviceArray<int32_t> cuq(p.s.cq), cuk(p.s.ck);
  fk_attention_fwd_params q{};
  q.base.q = p.Q.data.data(), q.base.k = p.K.data.data(), q.base.v = p.V.data.data();
  q.o = O.data.data(), q.lse = lse.data.data();
  set_common(q, p, lse, cuq, cuk);
  q.base.o_stride.batch = O.bs, q.base.o_stride.row = O.rs, q.base.o_stride.head = O.hs;
  q.total_q = p.s.cq.back(), q.total_k = p.s.ck.back();
  return fk_attention_fwd(&q, nullptr);
}

// Accumulates error statistics of a kernel output against a reference.
struct Stats {
  double err2 = 0, ref2 = 0, max_abs = 0;
  long nonfinite = 0, pad_touched = 0, not_zero = 0;
  void add(double k, double r) {
    if (!std::isfinite(k)) {
      ++nonfinite;
      return;
    }
    err2 += (k - r) * (k - r);
    ref2 += r * r;
    max_abs = std::max(max_abs, std::abs(k - r));
  }
  double rel() const { return ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2); }
};

// Checks that every element of `t` outside the sequences (padding, gaps) is still NaN.
template <typename T> long count_pad_touched(const Tensor<T> &t, const std::vector<int> &n) {
  std::vector<char> valid(t.data.size(), 0);
  for (size_t b = 0; b < n.size(); ++b)
    for (int i = 0; i < n[b]; ++i)
      for (int h = 0; h < t.heads; ++h)
        for (int d = 0; d < t.D; ++d) valid[t.index(int(b), i, h, d)] = 1;
  long touched = 0;
  for (size_t x = 0; x < t.data.size(); ++x) touched += !valid[x] && !std::isnan(to_f(t.data[x]));
  return touched;
}

// The same for an LSE-like buffer.
inline long count_pad_touched(const Lse &l, const std::vector<int> &nq, int heads) {
  std::vector<char> valid(l.data.size(), 0);
  for (size_t b = 0; b < nq.size(); ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < nq[b]; ++i) valid[l.index(int(b), h, i)] = 1;
  long touched = 0;
  for (size_t x = 0; x < l.data.size(); ++x) touched += !valid[x] && !std::isnan(l.data[x]);
  return touched;
}

inline double rel_tol(int dtype) { return dtype == FK_DTYPE_BF16 ? 1.2e-2 : 2e-3; }
inline double abs_tol(int dtype) { return dtype == FK_DTYPE_BF16 ? 4e-2 : 6e-3; }

template <typename... A> std::string format(const char *fmt, A... args) {
  char buf[512];
  snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

// One case's results: a single line when everything passed, every check otherwise.
struct Report {
  bool ok = true;
  std::string brief, detail;
  void fail(const std::string &what) {
    ok = false;
    detail += "  " + what + "  <-- BAD\n";
  }
  void info(const std::string &what) { detail += "  " + what + "\n"; }
  void check(const char *what, const Stats &st, double rtol, double atol) {
    const bool good = st.nonfinite == 0 && st.pad_touched == 0 && st.not_zero == 0 &&
                      st.rel() < rtol && st.max_abs < atol;
    ok &= good;
    detail += format("  %-5s rel %.2e (< %.0e) max %.2e (< %.1e) nonfinite %ld pad-touched %ld "
                     "nonzero-where-zero %ld%s\n",
                     what, st.rel(), rtol, st.max_abs, atol, st.nonfinite, st.pad_touched,
                     st.not_zero, good ? "" : "  <-- BAD");
    brief += format("%s%s %.1e/%.1e", brief.empty() ? "" : ", ", what, st.rel(), st.max_abs);
  }
};

// Runs the cases whose index is given (all when none), returns the number that failed.
// run_one(case, report) fills the report; a failed case prints every check.
template <typename F>
int run_cases(const std::vector<Case> &cases, int argc, char **argv, F &&run_one) {
  int bad = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (!emu::case_selected(i, argc, argv)) continue;
    Report r;
    const std::string label = format("case %zu (%s)", i, cases[i].name.c_str());
    emu::g_case = label.c_str();
    run_one(cases[i], r);
    emu::g_case = nullptr;
    if (r.ok && argc <= 1)
      printf("[%zu] %s: %s\n", i, cases[i].name.c_str(), r.brief.c_str());
    else
      printf("[%zu] %s%s\n%s", i, cases[i].name.c_str(), r.ok ? "" : ": FAILED", r.detail.c_str());
    fflush(stdout);
    bad += !r.ok;
  }
  return bad;
}

} // namespace harness

// dense_fwd_api.cu's fk_error_string calls into the CUDA runtime, which is not linked:
// each test binary is a single translation unit, and this is its stand-in.
const char *cudaGetErrorString(cudaError_t) { return "(error string: not emulated)"; }
