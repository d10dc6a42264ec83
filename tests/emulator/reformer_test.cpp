// Reformer LSH attention forward and backward suite: fk_reformer_fwd and fk_reformer_bwd
// (kernels/reformer/) on the emulator against this file's own f64 definition of HF's
// LSHSelfAttention semantics (rust/ops/reformer/mod.rs): hashing (first argmax of [xR ; -xR], HF's
// round offsets and padding bucket), one stable sort of the concatenated rounds by bucket, chunks
// with circular look-back / look-ahead over all rounds, masks that replace scores (causal and
// padding, then self by token position; f16's values), per-round logsumexp and output,
// the rounds' logsumexp combination, the unsort; N <= C: full attention, one round.
// qk, v, O live in strided layouts with NaN gaps, allocated to their exact bound (a gap
// read shows up as NaN, a gap written is counted as pad-touched); O and LSE start as NaN,
// the buckets as a sentinel, the workspace as 0xFF bytes, so anything not written (or read
// before written) fails. Buckets must match exactly, except at a near tie of the f64
// projections (f32 on the device), where the device's choice is then used by the
// reference. The sorted order itself (perm, read from the workspace, forward and backward)
// must equal std::stable_sort of the buckets, given ones clamped into their round's range
// first (as the kernels do; "given+wild" cases plant out-of-range values). Bounds: O one
// rounding (2 u |ref|) + 1e-4 (f32 scores, fast-math exp / log, inputs in [-1, 1]); LSE
// 1e-5 (|lse| + 8). Runs twice where the case asks (the second time on a zeroed workspace)
// and compares every output, and the forward's perm, bit for bit.
// The backward (fk_reformer_bwd, "bwd" cases): the forward on the device gives O, the
// per-round lse and the buckets (given or hashed), then the backward with those buckets
// and a random dO against this file's f64 backward definition (Def, from reference.rs:
// the rounds one softmax, Delta = rowsum(dO o O), replaced scores constants, the key
// normalisation's Jacobian) fed the same stored O and f32 lse; the definition itself is
// checked against central differences of sum(dO o O) on one tiny case. dqk, dv strided
// and NaN-poisoned like O, the workspace 0xFF; bounds one rounding (2 u |ref|) + 2e-4.
// Usage: reformer_test [case index...] (all cases by default).
#include "emu.h"
#include "strided.h"

#include "emulated/reformer/reformer_api.cu"
#include "emulated/reformer/reformer_bwd_bf16.cu"
#include "emulated/reformer/reformer_bwd_f16.cu"
#include "emulated/reformer/reformer_fwd_bf16.cu"
#include "emulated/reformer/reformer_fwd_f16.cu"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>

namespace {

using suite::Strided;
using suite::to_e;
using suite::to_f;

struct RefCase {
  int batch, seqlen, heads, head_dim, n_hashes, n_buckets, chunk, before, after;
  bool causal;
  int pad;   // 0 none, 1 random tokens, 2 random tokens and sequence 0 fully padded,
             // 3 a mask with no token padded (the flag's 0: nb' = nb)
  int given; // buckets given: 0 no, 1 random valid ones, 2 with ~30% out of their round's
             // range (clamped by the sort: the reference clamps them too)
  int dtype;
  bool bhnd;      // qk, v, O in (B, H, N, D) memory
  bool unaligned; // odd row gaps and one-element shifts
  bool twice;     // run twice, compare bits
};

std::string describe(const RefCase &c) {
  char buf[240];
  snprintf(buf, sizeof buf, "%s B%d N%d H%d D%d R%d nb%d C%d %d/%d%s%s%s%s%s",
           c.dtype == FK_DTYPE_F16 ? "f16" : "bf16", c.batch, c.seqlen, c.heads, c.head_dim,
           c.n_hashes, c.n_buckets, c.chunk, c.before, c.after, c.causal ? " causal" : "",
           c.pad == 0   ? ""
           : c.pad == 1 ? " pad"
           : c.pad == 2 ? " pad+full"
                        : " pad:none",
           c.given == 0   ? ""
           : c.given == 1 ? " given"
                          : " given+wild",
           c.bhnd ? " bhnd" : "", c.unaligned ? " unaligned" : "");
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

double unit(int dtype) {
  return dtype == FK_DTYPE_F16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
}

constexpr int32_t kSentinel = -777;

template <typename T> struct Problem {
  const RefCase &c;
  int n, hh, d, nh, nb, half, gap, shift;
  bool hashed, pad_any = false;
  int nbp; // buckets per round
  std::vector<uint8_t> padv;
  emu::DeviceArray<uint8_t> pad;
  emu::DeviceArray<float> rot;
  emu::DeviceArray<int32_t> given;
  Strided<T> qk, v;

  static Strided<T> bnhd(const RefCase &c, int gap, int shift) {
    const int64_t ld = c.head_dim + gap;
    if (c.bhnd)
      return Strided<T>({c.batch, c.seqlen, c.heads, c.head_dim},
                        {int64_t(c.heads) * c.seqlen * ld, ld, int64_t(c.seqlen) * ld, 1}, shift);
    return Strided<T>({c.batch, c.seqlen, c.heads, c.head_dim},
                      {int64_t(c.seqlen) * c.heads * ld, c.heads * ld, ld, 1}, shift);
  }

  explicit Problem(const RefCase &c_)
      : c(c_), n(c_.seqlen), hh(c_.heads), d(c_.head_dim), nh(c_.n_hashes), nb(c_.n_buckets),
        half(c_.n_buckets / 2), gap(c_.unaligned ? 3 : 8), shift(c_.unaligned ? 1 : 0),
        hashed(c_.seqlen > c_.chunk), nbp(0), padv(size_t(c_.batch) * c_.seqlen, 0),
        pad(padv.size()), rot(size_t(c_.heads) * c_.head_dim * c_.n_hashes * (c_.n_buckets / 2)),
        given(size_t(c_.batch) * c_.heads * c_.n_hashes * c_.seqlen), qk(bnhd(c_, gap, shift)),
        v(bnhd(c_, gap, 0)) {
    std::mt19937 rng(1234 + n * 7 + d * 13 + nh * 3 + c.chunk + c.batch);
    std::uniform_real_distribution<float> u(-1.f, 1.f), p01(0.f, 1.f);
    std::normal_distribution<float> g(0.f, 1.f);
    if (c.pad == 1 || c.pad == 2)
      for (int b = 0; b < c.batch; ++b)
        for (int i = 0; i < n; ++i) padv[size_t(b) * n + i] = p01(rng) < 0.25f;
    if (c.pad == 2)
      for (int i = 0; i < n; ++i) padv[size_t(i)] = 1;
    for (size_t i = 0; i < padv.size(); ++i) pad[i] = padv[i], pad_any = pad_any || padv[i];
    nbp = nb + (pad_any ? 1 : 0);
    for (int b = 0; b < c.batch; ++b)
      for (int i = 0; i < n; ++i)
        for (int h = 0; h < hh; ++h)
          for (int e = 0; e < d; ++e) {
            // Some all-zero rows: every rotated value ties, the first argmax is bucket 0.
            qk.set(b, i, h, e, i % 11 == 5 ? 0.f : u(rng));
            v.set(b, i, h, e, u(rng));
          }
    for (size_t i = 0; i < rot.size(); ++i) rot[i] = g(rng);
    // Given: valid buckets (round r's in [r nb', (r + 1) nb'), padded tokens anywhere),
    // few values so that equal buckets (the sort's stability) are common.
    std::uniform_int_distribution<int> ub(0, nbp - 1);
    for (size_t i = 0; i < given.size(); ++i) {
      const int r = int(i / size_t(n)) % nh;
      given[i] = r * nbp + ub(rng);
    }
    // Wild: values outside round r's range (below, above, the neighbours' ranges, the int32
    // extremes), from their own generator (the valid draws above stay as they were).
    std::mt19937 wild_rng(4321 + n);
    for (size_t i = 0; c.given == 2 && i < given.size(); ++i) {
      const int r = int(i / size_t(n)) % nh;
      if (wild_rng() % 10 >= 3) continue;
      const int32_t k = int32_t(wild_rng() % 5);
      switch (wild_rng() % 6) {
      case 0: given[i] = INT32_MIN + k; break;
      case 1: given[i] = INT32_MAX - k; break;
      case 2: given[i] = r * nbp - 1 - k; break;   // below: the previous round's, or negative
      case 3: given[i] = (r + 1) * nbp + k; break; // above: the next round's
      case 4: given[i] = -1000000 - k; break;
      default: given[i] = (nh + 3) * nbp + k; break;
      }
    }
  }
  // Round r's bucket as the sort uses it: clamped into [r nb', (r + 1) nb').
  int32_t clamped(size_t at) const {
    const int64_t base = int64_t(at / size_t(n) % size_t(nh)) * nbp;
    const int64_t v = std::min<int64_t>(std::max<int64_t>(int64_t(given[at]) - base, 0), nbp - 1);
    return int32_t(base + v);
  }
  bool padded(int b, int i) const { return padv[size_t(b) * n + i] != 0; }
  // x R_r[:, k] in f64 from the stored values.
  double proj(int b, int h, int i, int r, int k) const {
    double s = 0;
    for (int e = 0; e < d; ++e)
      s += qk.get(b, i, h, e) * double(rot[((size_t(h) * d + e) * nh + r) * half + k]);
    return s;
  }
  double rot_val(int b, int h, int i, int r, int k) const {
    return k < half ? proj(b, h, i, r, k) : -proj(b, h, i, r, k - half);
  }
  // The round-local bucket (HF's hashing, first maximum).
  int hash(int b, int h, int i, int r) const {
    if (pad_any && padded(b, i)) return nb;
    int best = 0;
    double bv = rot_val(b, h, i, r, 0);
    for (int k = 1; k < 2 * half; ++k) {
      const double x = rot_val(b, h, i, r, k);
      if (x > bv) bv = x, best = k;
    }
    return best;
  }
};

// The device's sorted order (perm (B, H, R N) from the workspace: tokens) against the stable
// sort of the buckets the reference uses (bk (B, H, R, N), in range), position by position.
Check perm_check(const int32_t *dev, const int32_t *bk, int batch, int hh, int nh, int n) {
  Check cp;
  const size_t L = size_t(nh) * n;
  std::vector<int> perm(L);
  for (size_t bh = 0; bh < size_t(batch) * hh; ++bh) {
    const int32_t *k = bk + bh * L;
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(), [&](int x, int y) { return k[x] < k[y]; });
    for (size_t s = 0; s < L; ++s) cp.add(dev[bh * L + s] == perm[s] % n ? 0 : 1, 0, 0);
  }
  return cp;
}

template <typename T> void fwd_case(const RefCase &c, Result &res) {
  Problem<T> pr(c);
  const int n = pr.n, hh = pr.hh, d = pr.d, nh = pr.nh;
  const int rounds = pr.hashed ? nh : 1;
  auto out = Problem<T>::bnhd(c, 8, 0);
  const size_t bk_n = size_t(c.batch) * hh * nh * n;
  emu::DeviceArray<float> lse(size_t(c.batch) * hh * rounds * n, NAN);
  emu::DeviceArray<int32_t> buckets(bk_n, kSentinel);
  fk_reformer_fwd_params p{};
  p.qk = pr.qk.ptr(), p.v = pr.v.ptr(), p.rotations = pr.rot.data();
  p.key_padding = c.pad != 0 ? pr.pad.data() : nullptr;
  p.given_buckets = c.given ? pr.given.data() : nullptr;
  p.out = out.ptr(), p.lse = lse.data(), p.buckets = buckets.data();
  p.qk_stride = pr.qk.st(), p.v_stride = pr.v.st(), p.out_stride = out.st();
  p.batch = c.batch, p.seqlen = n, p.heads = hh, p.head_dim = d;
  p.n_hashes = nh, p.n_buckets = c.n_buckets, p.chunk_length = c.chunk;
  p.chunks_before = c.before, p.chunks_after = c.after, p.causal = c.causal;
  p.dtype = c.dtype;
  const int64_t ws_bytes = fk_reformer_fwd_workspace_bytes(&p);
  if ((ws_bytes > 0) != pr.hashed) return res.fail("workspace " + std::to_string(ws_bytes));
  emu::DeviceArray<unsigned char> ws(size_t(ws_bytes > 0 ? ws_bytes : 1), 0xFF, 256);
  p.workspace = ws_bytes > 0 ? ws.data() : nullptr;
  int rc = fk_reformer_fwd(&p, nullptr);
  if (rc != 0) return res.fail("rc " + std::to_string(rc));

  // ---- Buckets: the ones the reference uses (given, hashed and checked, or none).
  std::vector<int32_t> used(bk_n, 0);
  Check cb;
  long bk_untouched_bad = 0, ties = 0;
  for (size_t at = 0; at < bk_n; ++at) {
    const int i = int(at % size_t(n)), r = int(at / size_t(n)) % nh;
    const int h = int(at / (size_t(n) * nh)) % hh, b = int(at / (size_t(n) * nh * hh));
    if (!pr.hashed || c.given) {
      bk_untouched_bad += buckets[at] != kSentinel;
      used[at] = c.given ? pr.clamped(at) : 0;
      continue;
    }
    const int want = pr.hash(b, h, i, r);
    const int32_t got = buckets[at];
    used[at] = got;
    const int got_local = got - r * pr.nbp;
    bool ok = got == want + r * pr.nbp;
    if (!ok && got_local >= 0 && got_local < 2 * pr.half && want < 2 * pr.half) {
      // A near tie: the device's choice must be within f32 error of the maximum.
      double mag = 0;
      for (int e = 0; e < d; ++e) mag += std::fabs(pr.qk.get(b, i, h, e));
      const double gap = pr.rot_val(b, h, i, r, want) - pr.rot_val(b, h, i, r, got_local);
      ok = mag > 0 && gap <= 1e-5 * mag * 4; // an all-zero row ties exactly: bucket 0
      ties += ok;
    }
    cb.add(ok ? 0 : 1, 0, 0);
  }
  if (pr.hashed && !c.given) res.check("buckets", cb, 0);
  if (bk_untouched_bad) res.fail("buckets written " + std::to_string(bk_untouched_bad));
  if (ties) res.line += " (ties " + std::to_string(ties) + ")";
  const int64_t perm_at = fk::reformer::FwdWorkspace(p).perm;
  auto dev_perm = [&](const emu::DeviceArray<unsigned char> &w) {
    return reinterpret_cast<const int32_t *>(w.data() + perm_at);
  };
  if (pr.hashed) res.check("perm", perm_check(dev_perm(ws), used.data(), c.batch, hh, nh, n), 0);

  // ---- The f64 definition, per (b, h).
  const double mask = c.dtype == FK_DTYPE_F16 ? -1e4 : -1e9;
  const double self_mask = c.dtype == FK_DTYPE_F16 ? -1e3 : -1e5;
  const double u = unit(c.dtype);
  const int64_t L = int64_t(rounds) * n;
  Check co, cl;
  // o_abs: sum_k w_k |v_k| per (round, token, e), the scale of the rounding of P to the
  // dtype before P V (the tensor-core attn, as the dense kernels).
  std::vector<double> keys(size_t(n) * d), o_r(size_t(L) * d), o_abs(size_t(L) * d),
      lse_r(static_cast<size_t>(L));
  std::vector<int> perm(static_cast<size_t>(L)), undo(static_cast<size_t>(L)), win;
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < hh; ++h) {
      for (int j = 0; j < n; ++j) {
        double s2 = 0;
        for (int e = 0; e < d; ++e) s2 += pr.qk.get(b, j, h, e) * pr.qk.get(b, j, h, e);
        const double g = 1.0 / std::sqrt(s2 / d + 1e-6) / std::sqrt(double(d));
        for (int e = 0; e < d; ++e) keys[size_t(j) * d + e] = pr.qk.get(b, j, h, e) * g;
      }
      std::iota(perm.begin(), perm.end(), 0);
      const int32_t *bk = used.data() + (size_t(b) * hh + h) * nh * n;
      if (pr.hashed)
        std::stable_sort(perm.begin(), perm.end(), [&](int x, int y) { return bk[x] < bk[y]; });
      for (int s = 0; s < int(L); ++s) undo[size_t(perm[size_t(s)])] = s;
      const int64_t cl_ = pr.hashed ? c.chunk : n, nc = pr.hashed ? L / c.chunk : 1;
      const int before = pr.hashed ? c.before : 0, after = pr.hashed ? c.after : 0;
      for (int r = 0; r < rounds; ++r)
        for (int i = 0; i < n; ++i) {
          const int64_t chunk = undo[size_t(r) * n + i] / cl_;
          win.clear();
          for (int w = -before; w <= after; ++w) {
            const int64_t cc = ((chunk + w) % nc + nc) % nc;
            for (int64_t s = cc * cl_; s < (cc + 1) * cl_; ++s) win.push_back(perm[size_t(s)] % n);
          }
          std::vector<double> sc(win.size());
          double m = -INFINITY;
          for (size_t k = 0; k < win.size(); ++k) {
            const int j = win[k];
            double x;
            if (j == i)
              x = self_mask;
            else if ((c.causal && i < j) || pr.padded(b, j))
              x = mask;
            else {
              x = 0;
              for (int e = 0; e < d; ++e) x += pr.qk.get(b, i, h, e) * keys[size_t(j) * d + e];
            }
            sc[k] = x, m = std::max(m, x);
          }
          double sum = 0;
          for (double x : sc) sum += std::exp(x - m);
          const double l = m + std::log(sum);
          lse_r[size_t(r) * n + i] = l;
          cl.add(lse[((size_t(b) * hh + h) * rounds + r) * n + i], l, 1e-5 * (std::fabs(l) + 8));
          double *o = &o_r[(size_t(r) * n + i) * d], *oa = &o_abs[(size_t(r) * n + i) * d];
          std::fill(o, o + d, 0.0);
          std::fill(oa, oa + d, 0.0);
          for (size_t k = 0; k < win.size(); ++k) {
            const double w = std::exp(sc[k] - l);
            for (int e = 0; e < d; ++e) {
              o[e] += w * pr.v.get(b, win[k], h, e);
              oa[e] += w * std::fabs(pr.v.get(b, win[k], h, e));
            }
          }
        }
      for (int i = 0; i < n; ++i) {
        double m = -INFINITY, sum = 0;
        for (int r = 0; r < rounds; ++r) m = std::max(m, lse_r[size_t(r) * n + i]);
        for (int r = 0; r < rounds; ++r) sum += std::exp(lse_r[size_t(r) * n + i] - m);
        const double all = m + std::log(sum);
        for (int e = 0; e < d; ++e) {
          double acc = 0, acc_abs = 0;
          for (int r = 0; r < rounds; ++r) {
            const double wr = std::exp(lse_r[size_t(r) * n + i] - all);
            acc += wr * o_r[(size_t(r) * n + i) * d + e];
            acc_abs += wr * o_abs[(size_t(r) * n + i) * d + e];
          }
          // O's rounding, P's (tensor-core path), f32 accumulation.
          co.add(out.get(b, i, h, e), acc, 2 * u * std::fabs(acc) + u * acc_abs + 1e-4);
        }
      }
    }
  res.check("O", co, out.pad_touched());
  res.check("lse", cl, 0);
  if (c.twice) {
    auto out2 = Problem<T>::bnhd(c, 8, 0);
    emu::DeviceArray<float> lse2(lse.size(), NAN);
    emu::DeviceArray<int32_t> buckets2(bk_n, kSentinel);
    emu::DeviceArray<unsigned char> ws2(ws.size(), 0x00, 256);
    p.out = out2.ptr(), p.lse = lse2.data(), p.buckets = buckets2.data();
    p.workspace = ws_bytes > 0 ? ws2.data() : nullptr;
    rc = fk_reformer_fwd(&p, nullptr);
    if (rc != 0) return res.fail("second run rc " + std::to_string(rc));
    const bool same =
        out.same_bits(out2) && std::memcmp(lse.data(), lse2.data(), lse.size() * 4) == 0 &&
        std::memcmp(buckets.data(), buckets2.data(), bk_n * 4) == 0 &&
        (!pr.hashed || std::memcmp(dev_perm(ws), dev_perm(ws2), bk_n * 4) == 0);
    res.line += same ? " bitwise-repeat ok" : "";
    if (!same) res.fail("second run differs");
  }
}

// ---- The backward's f64 definition (rust/ops/reformer/reference.rs try_reformer_backward):
// the buckets fixed, the rounds one softmax over the union of their windows,
// P = exp(score - logsumexp_r lse_r), Delta = rowsum(dO o O), dS = P (dO . v - Delta) where
// the score was computed (replaced scores are constants; their P still reaches dv), dqk the
// query's dS k plus the key's dS q through the normalisation's Jacobian. Tensors (B, N, H, D)
// contiguous f64; lse (B, H, rounds, N).
struct Def {
  int batch, n, hh, d, nh, chunk, before, after;
  bool causal, hashed;
  double mask, self_mask;
  std::vector<uint8_t> pad;    // (B, N)
  std::vector<int32_t> bk;     // (B, H, nh, N) when hashed
  int rounds() const { return hashed ? nh : 1; }
  size_t at(int b, int i, int h) const { return ((size_t(b) * n + i) * hh + h) * d; }
  // Sorted order of (b, h) and, per (r, i), the window's key tokens in HF's order.
  void windows(int b, int h, std::vector<std::vector<int>> &win) const {
    const int64_t L = int64_t(rounds()) * n;
    std::vector<int> perm(static_cast<size_t>(L)), undo(static_cast<size_t>(L));
    std::iota(perm.begin(), perm.end(), 0);
    if (hashed) {
      const int32_t *k = bk.data() + (size_t(b) * hh + h) * nh * n;
      std::stable_sort(perm.begin(), perm.end(), [&](int x, int y) { return k[x] < k[y]; });
    }
    for (int s = 0; s < int(L); ++s) undo[size_t(perm[size_t(s)])] = s;
    const int64_t cl = hashed ? chunk : n, nc = hashed ? L / chunk : 1;
    const int bf = hashed ? before : 0, af = hashed ? after : 0;
    win.assign(static_cast<size_t>(L), {});
    for (int64_t p = 0; p < L; ++p) {
      const int64_t c = undo[size_t(p)] / cl;
      for (int w = -bf; w <= af; ++w) {
        const int64_t cc = ((c + w) % nc + nc) % nc;
        for (int64_t s = cc * cl; s < (cc + 1) * cl; ++s)
          win[size_t(p)].push_back(perm[size_t(s)] % n);
      }
    }
  }
  void keys(const std::vector<double> &qk, int b, int h, std::vector<double> &k) const {
    k.assign(size_t(n) * d, 0);
    for (int j = 0; j < n; ++j) {
      const double *x = &qk[at(b, j, h)];
      double s2 = 0;
      for (int e = 0; e < d; ++e) s2 += x[e] * x[e];
      const double g = 1.0 / std::sqrt(s2 / d + 1e-6) / std::sqrt(double(d));
      for (int e = 0; e < d; ++e) k[size_t(j) * d + e] = x[e] * g;
    }
  }
  double score(const std::vector<double> &qk, const std::vector<double> &k, int b, int h, int i,
               int j, bool &replaced) const {
    replaced = true;
    if (j == i) return self_mask;
    if ((causal && i < j) || pad[size_t(b) * n + j]) return mask;
    replaced = false;
    double s = 0;
    for (int e = 0; e < d; ++e) s += qk[at(b, i, h) + e] * k[size_t(j) * d + e];
    return s;
  }
  void forward(const std::vector<double> &qk, const std::vector<double> &v,
               std::vector<double> &out, std::vector<double> &lse) const {
    const int R = rounds();
    out.assign(qk.size(), 0), lse.assign(size_t(batch) * hh * R * n, 0);
    std::vector<std::vector<int>> win;
    std::vector<double> k;
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < hh; ++h) {
        windows(b, h, win), keys(qk, b, h, k);
        std::vector<double> o_r(size_t(R) * n * d, 0);
        for (int r = 0; r < R; ++r)
          for (int i = 0; i < n; ++i) {
            const auto &wk = win[size_t(r) * n + i];
            std::vector<double> sc(wk.size());
            double m = -INFINITY;
            bool rep;
            for (size_t x = 0; x < wk.size(); ++x)
              sc[x] = score(qk, k, b, h, i, wk[x], rep), m = std::max(m, sc[x]);
            double sum = 0;
            for (double x : sc) sum += std::exp(x - m);
            const double l = m + std::log(sum);
            lse[((size_t(b) * hh + h) * R + r) * n + i] = l;
            for (size_t x = 0; x < wk.size(); ++x)
              for (int e = 0; e < d; ++e)
                o_r[(size_t(r) * n + i) * d + e] += std::exp(sc[x] - l) * v[at(b, wk[x], h) + e];
          }
        for (int i = 0; i < n; ++i) {
          const double all = lse_all(lse, b, h, i);
          for (int r = 0; r < R; ++r)
            for (int e = 0; e < d; ++e)
              out[at(b, i, h) + e] += std::exp(lse[((size_t(b) * hh + h) * R + r) * n + i] - all) *
                                      o_r[(size_t(r) * n + i) * d + e];
        }
      }
  }
  double lse_all(const std::vector<double> &lse, int b, int h, int i) const {
    const int R = rounds();
    double m = -INFINITY, s = 0;
    for (int r = 0; r < R; ++r) m = std::max(m, lse[((size_t(b) * hh + h) * R + r) * n + i]);
    for (int r = 0; r < R; ++r) s += std::exp(lse[((size_t(b) * hh + h) * R + r) * n + i] - m);
    return m + std::log(s);
  }
  void backward(const std::vector<double> &qk, const std::vector<double> &v,
                const std::vector<double> &out, const std::vector<double> &lse,
                const std::vector<double> &dout, std::vector<double> &dqk,
                std::vector<double> &dv) const {
    const int R = rounds();
    dqk.assign(qk.size(), 0), dv.assign(v.size(), 0);
    std::vector<std::vector<int>> win;
    std::vector<double> k, dk;
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < hh; ++h) {
        windows(b, h, win), keys(qk, b, h, k);
        dk.assign(size_t(n) * d, 0);
        for (int i = 0; i < n; ++i) {
          const double all = lse_all(lse, b, h, i);
          const double *doi = &dout[at(b, i, h)];
          double delta = 0;
          for (int e = 0; e < d; ++e) delta += doi[e] * out[at(b, i, h) + e];
          for (int r = 0; r < R; ++r)
            for (int j : win[size_t(r) * n + i]) {
              bool rep;
              const double p = std::exp(score(qk, k, b, h, i, j, rep) - all);
              double dp = 0;
              for (int e = 0; e < d; ++e) {
                dv[at(b, j, h) + e] += p * doi[e];
                dp += doi[e] * v[at(b, j, h) + e];
              }
              if (rep) continue;
              const double ds = p * (dp - delta);
              for (int e = 0; e < d; ++e) {
                dqk[at(b, i, h) + e] += ds * k[size_t(j) * d + e];
                dk[size_t(j) * d + e] += ds * qk[at(b, i, h) + e];
              }
            }
        }
        for (int j = 0; j < n; ++j) { // dx = (g dk - x (x . dk) g^3 / D) / sqrt(D)
          const double *x = &qk[at(b, j, h)];
          double s2 = 0, xdk = 0;
          for (int e = 0; e < d; ++e) s2 += x[e] * x[e], xdk += x[e] * dk[size_t(j) * d + e];
          const double g = 1.0 / std::sqrt(s2 / d + 1e-6);
          for (int e = 0; e < d; ++e)
            dqk[at(b, j, h) + e] +=
                (g * dk[size_t(j) * d + e] - x[e] * xdk * g * g * g / d) / std::sqrt(double(d));
        }
      }
  }
};

// The definition against central differences of sum(dO o O) on a tiny case (buckets fixed;
// random scores well inside the masks' gaps). Returns the worst relative error.
double finite_difference_check() {
  Def df{1, 12, 1, 4, 2, 4, 1, 1, true, true, -1e4, -1e3, {}, {}};
  std::mt19937 rng(77);
  std::uniform_real_distribution<double> u(-1, 1);
  df.pad.assign(12, 0), df.pad[5] = 1;
  df.bk.resize(size_t(df.nh) * df.n);
  for (size_t i = 0; i < df.bk.size(); ++i) df.bk[i] = int(i / 12) * 3 + int(rng() % 3);
  const size_t sz = size_t(df.n) * df.d;
  std::vector<double> qk(sz), v(sz), dout(sz), out, lse, dqk, dv;
  for (size_t i = 0; i < sz; ++i) qk[i] = u(rng), v[i] = u(rng), dout[i] = u(rng);
  df.forward(qk, v, out, lse);
  df.backward(qk, v, out, lse, dout, dqk, dv);
  auto loss = [&](const std::vector<double> &q, const std::vector<double> &vv) {
    std::vector<double> o, l;
    df.forward(q, vv, o, l);
    double s = 0;
    for (size_t i = 0; i < sz; ++i) s += o[i] * dout[i];
    return s;
  };
  double worst = 0, scale = 0;
  for (size_t i = 0; i < sz; ++i) scale = std::max({scale, std::fabs(dqk[i]), std::fabs(dv[i])});
  const double eps = 1e-6;
  for (int which = 0; which < 2; ++which)
    for (size_t i = 0; i < sz; ++i) {
      auto q = qk, vv = v;
      auto &x = which == 0 ? q : vv;
      x[i] += eps;
      const double up = loss(q, vv);
      x[i] -= 2 * eps;
      const double fd = (up - loss(q, vv)) / (2 * eps);
      const double an = which == 0 ? dqk[i] : dv[i];
      worst = std::max(worst, std::fabs(fd - an) / scale);
    }
  return worst;
}

template <typename T> void bwd_case(const RefCase &c, Result &res) {
  Problem<T> pr(c);
  const int n = pr.n, hh = pr.hh, d = pr.d, nh = pr.nh;
  const int rounds = pr.hashed ? nh : 1;
  // The forward (device) gives O, the per-round lse and the buckets, all as stored.
  auto out = Problem<T>::bnhd(c, 8, 0);
  const size_t bk_n = size_t(c.batch) * hh * nh * n;
  emu::DeviceArray<float> lse(size_t(c.batch) * hh * rounds * n, NAN);
  emu::DeviceArray<int32_t> buckets(bk_n, kSentinel);
  fk_reformer_fwd_params f{};
  f.qk = pr.qk.ptr(), f.v = pr.v.ptr(), f.rotations = pr.rot.data();
  f.key_padding = c.pad != 0 ? pr.pad.data() : nullptr;
  f.given_buckets = c.given && pr.hashed ? pr.given.data() : nullptr;
  f.out = out.ptr(), f.lse = lse.data(), f.buckets = buckets.data();
  f.qk_stride = pr.qk.st(), f.v_stride = pr.v.st(), f.out_stride = out.st();
  f.batch = c.batch, f.seqlen = n, f.heads = hh, f.head_dim = d;
  f.n_hashes = nh, f.n_buckets = c.n_buckets, f.chunk_length = c.chunk;
  f.chunks_before = c.before, f.chunks_after = c.after, f.causal = c.causal, f.dtype = c.dtype;
  const int64_t fws = fk_reformer_fwd_workspace_bytes(&f);
  emu::DeviceArray<unsigned char> fw(size_t(fws > 0 ? fws : 1), 0, 256);
  f.workspace = fws > 0 ? fw.data() : nullptr;
  if (int rc = fk_reformer_fwd(&f, nullptr)) return res.fail("forward rc " + std::to_string(rc));
  // The buckets the backward is given (given ones as they are, wild values included), and
  // the ones the reference uses (given ones clamped, as the sort does).
  const int32_t *used = !pr.hashed ? nullptr : c.given ? pr.given.data() : buckets.data();
  std::vector<int32_t> ref_bk;
  if (used) ref_bk.assign(used, used + bk_n);
  for (size_t at = 0; c.given && at < ref_bk.size(); ++at) ref_bk[at] = pr.clamped(at);

  std::mt19937 rng(99 + n + d);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto dout = Problem<T>::bnhd(c, c.unaligned ? 5 : 8, c.unaligned ? 1 : 0);
  for (int b = 0; b < c.batch; ++b)
    for (int i = 0; i < n; ++i)
      for (int h = 0; h < hh; ++h)
        for (int e = 0; e < d; ++e) dout.set(b, i, h, e, u(rng));
  auto dqk = Problem<T>::bnhd(c, c.unaligned ? 3 : 8, c.unaligned ? 1 : 0);
  auto dv = Problem<T>::bnhd(c, 8, 0);
  fk_reformer_bwd_params p{};
  p.qk = pr.qk.ptr(), p.v = pr.v.ptr(), p.out = out.ptr(), p.dout = dout.ptr();
  p.lse = lse.data(), p.key_padding = f.key_padding, p.buckets = used;
  p.dqk = dqk.ptr(), p.dv = dv.ptr();
  p.qk_stride = pr.qk.st(), p.v_stride = pr.v.st(), p.out_stride = out.st();
  p.dout_stride = dout.st(), p.dqk_stride = dqk.st(), p.dv_stride = dv.st();
  p.batch = c.batch, p.seqlen = n, p.heads = hh, p.head_dim = d;
  p.n_hashes = nh, p.n_buckets = c.n_buckets, p.chunk_length = c.chunk;
  p.chunks_before = c.before, p.chunks_after = c.after, p.causal = c.causal, p.dtype = c.dtype;
  const int64_t ws_bytes = fk_reformer_bwd_workspace_bytes(&p);
  if (ws_bytes <= 0) return res.fail("workspace " + std::to_string(ws_bytes));
  emu::DeviceArray<unsigned char> ws(size_t(ws_bytes), 0xFF, 256);
  p.workspace = ws.data();
  if (int rc = fk_reformer_bwd(&p, nullptr)) return res.fail("rc " + std::to_string(rc));

  Def df{c.batch,
         n,
         hh,
         d,
         nh,
         c.chunk,
         c.before,
         c.after,
         c.causal,
         pr.hashed,
         c.dtype == FK_DTYPE_F16 ? -1e4 : -1e9,
         c.dtype == FK_DTYPE_F16 ? -1e3 : -1e5,
         pr.padv,
         {}};
  df.bk = ref_bk;
  const size_t sz = size_t(c.batch) * n * hh * d;
  std::vector<double> qk(sz), v(sz), o(sz), g(sz), l(lse.size()), rdq, rdv;
  for (int b = 0; b < c.batch; ++b)
    for (int i = 0; i < n; ++i)
      for (int h = 0; h < hh; ++h)
        for (int e = 0; e < d; ++e) {
          const size_t at = df.at(b, i, h) + size_t(e);
          qk[at] = pr.qk.get(b, i, h, e), v[at] = pr.v.get(b, i, h, e);
          o[at] = out.get(b, i, h, e), g[at] = dout.get(b, i, h, e);
        }
  for (size_t i = 0; i < l.size(); ++i) l[i] = lse[i];
  df.backward(qk, v, o, l, g, rdq, rdv);
  const double un = unit(c.dtype);
  Check cq, cv;
  for (int b = 0; b < c.batch; ++b)
    for (int i = 0; i < n; ++i)
      for (int h = 0; h < hh; ++h)
        for (int e = 0; e < d; ++e) {
          const size_t at = df.at(b, i, h) + size_t(e);
          cq.add(dqk.get(b, i, h, e), rdq[at], 2 * un * std::fabs(rdq[at]) + 2e-4);
          cv.add(dv.get(b, i, h, e), rdv[at], 2 * un * std::fabs(rdv[at]) + 2e-4);
        }
  const int64_t perm_at = fk::reformer::BwdWorkspace(p).perm;
  if (pr.hashed)
    res.check("perm",
              perm_check(reinterpret_cast<const int32_t *>(ws.data() + perm_at), ref_bk.data(),
                         c.batch, hh, nh, n),
              0);
  res.check("dqk", cq, dqk.pad_touched());
  res.check("dv", cv, dv.pad_touched());
  if (c.twice) {
    auto dqk2 = Problem<T>::bnhd(c, c.unaligned ? 3 : 8, c.unaligned ? 1 : 0);
    auto dv2 = Problem<T>::bnhd(c, 8, 0);
    emu::DeviceArray<unsigned char> ws2(ws.size(), 0x00, 256);
    p.dqk = dqk2.ptr(), p.dv = dv2.ptr(), p.workspace = ws2.data();
    if (int rc = fk_reformer_bwd(&p, nullptr))
      return res.fail("second run rc " + std::to_string(rc));
    const bool same = dqk.same_bits(dqk2) && dv.same_bits(dv2);
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
  // B N H D R nb C before after causal pad given dtype bhnd unaligned twice
  const RefCase cases[] = {
      {1, 64, 1, 8, 1, 4, 16, 1, 0, false, 0, false, F16, false, false, false},
      {2, 128, 2, 16, 3, 8, 32, 1, 0, true, 1, false, BF16, false, false, true},
      {1, 96, 2, 24, 2, 6, 16, 1, 1, false, 1, true, F16, true, false, false},
      {2, 32, 1, 64, 2, 4, 32, 1, 0, true, 1, false, BF16, false, true, false},
      {1, 20, 2, 40, 3, 4, 32, 1, 0, false, 1, false, F16, false, false, true},
      {1, 256, 1, 32, 4, 16, 32, 2, 1, true, 0, false, BF16, false, false, false},
      {2, 64, 1, 64, 3, 4, 8, 1, 0, true, 2, false, F16, false, true, true},
      {1, 48, 3, 8, 1, 2, 16, 1, 1, false, 0, true, BF16, true, false, false},
      {1, 32, 1, 128, 2, 4, 16, 1, 0, false, 1, false, BF16, false, false, false},
      {1, 32, 2, 16, 1, 8, 16, 3, 1, true, 0, false, F16, false, false, false},
      {2, 200, 1, 12, 2, 4, 100, 1, 0, false, 1, false, BF16, false, true, true},
      {2, 120, 1, 48, 3, 6, 40, 0, 1, true, 2, true, F16, false, false, false},
      {2, 70, 2, 32, 2, 4, 70, 1, 0, true, 2, false, F16, true, false, false},
      {1, 512, 1, 64, 2, 16, 64, 1, 0, true, 1, false, BF16, false, false, false},
      {1, 256, 1, 16, 2, 300, 32, 1, 0, false, 1, false, F16, false, true, true},
      {2, 64, 2, 24, 2, 8, 16, 0, 0, true, 0, false, BF16, true, false, false},
      // Tensor-core attn: C = 96 (two query blocks a chunk, key blocks across chunks), D = 128.
      {1, 384, 2, 64, 2, 8, 96, 1, 1, true, 1, false, F16, false, false, true},
      {2, 192, 1, 128, 3, 6, 64, 1, 0, false, 2, false, BF16, true, false, false},
      // The sort (segments of 1024 tokens): several segments, the last partial, 3 rounds.
      {1, 5000, 1, 8, 3, 16, 40, 1, 0, false, 0, 0, F16, false, false, true},
      // Two buckets (+ padding): long runs of equal buckets across segments.
      {1, 3000, 1, 8, 2, 2, 100, 1, 1, true, 1, 0, BF16, false, false, false},
      // Out-of-range given buckets (clamped), the padding bucket, a 52-token last segment.
      {2, 2100, 1, 8, 2, 8, 70, 1, 0, false, 2, 2, F16, false, false, false},
      // A mask with nothing padded (nb' = nb: a value nb clamps to nb - 1), N = 2 S, 4 rounds.
      {1, 2048, 1, 8, 4, 4, 64, 1, 0, true, 3, 2, BF16, false, false, true},
      // The most buckets (8192 + padding): the largest histogram, 9 scan tiles per round.
      {1, 1100, 1, 8, 2, 8192, 100, 1, 0, false, 1, 1, F16, false, false, false},
  };
  std::vector<Entry> out;
  for (const RefCase &c : cases)
    out.push_back({describe(c), [c](Result &r) {
                     if (c.dtype == FK_DTYPE_F16)
                       fwd_case<__half>(c, r);
                     else
                       fwd_case<__nv_bfloat16>(c, r);
                   }});
  // Backward cases: B N H D R nb C before after causal pad given dtype bhnd unaligned twice
  const RefCase bwd_cases[] = {
      {1, 64, 1, 8, 1, 4, 16, 1, 0, false, 0, false, F16, false, false, true},
      {2, 128, 2, 16, 3, 8, 32, 1, 0, true, 1, false, BF16, false, false, true},
      {1, 96, 2, 24, 3, 6, 16, 1, 1, false, 1, true, F16, true, false, false},
      {2, 64, 1, 64, 3, 4, 8, 1, 0, true, 2, false, F16, false, true, true},
      {1, 48, 1, 16, 1, 4, 16, 3, 2, true, 1, true, BF16, false, false, true},
      {1, 32, 2, 16, 1, 8, 16, 3, 1, true, 0, false, F16, false, true, false},
      {2, 32, 1, 40, 2, 4, 32, 1, 0, true, 1, false, BF16, false, true, true},
      {1, 20, 2, 40, 3, 4, 32, 1, 0, false, 1, false, F16, true, false, true},
      {2, 120, 1, 48, 3, 6, 40, 0, 1, true, 2, true, F16, false, false, false},
      {1, 64, 1, 128, 2, 4, 32, 1, 0, false, 0, false, BF16, false, false, false},
      {1, 100, 1, 12, 2, 4, 50, 2, 2, false, 1, true, BF16, false, true, false},
      {2, 96, 2, 32, 2, 8, 32, 1, 0, true, 2, false, BF16, true, false, true},
      {2, 40, 1, 24, 1, 4, 40, 1, 0, false, 2, false, BF16, false, true, false},
      // The sort again from given buckets (out of range ones clamped), 3 segments per round.
      {1, 3000, 1, 8, 2, 4, 100, 1, 0, true, 1, 2, BF16, false, false, true},
      // Hashed into 2 buckets (+ padding), 3 rounds of 3 segments.
      {1, 2500, 2, 8, 3, 2, 50, 1, 1, false, 1, 0, F16, false, false, false},
  };
  for (const RefCase &c : bwd_cases)
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
  alignas(256) static float fdummy[256];
  alignas(256) static int32_t idummy[256];
  fk_reformer_fwd_params p{};
  p.qk = p.v = p.out = dummy, p.rotations = fdummy, p.lse = fdummy, p.buckets = idummy;
  p.qk_stride = p.v_stride = p.out_stride = {1024, 8, 8};
  p.batch = 1, p.seqlen = 64, p.heads = 1, p.head_dim = 8, p.n_hashes = 2, p.n_buckets = 4;
  p.chunk_length = 16, p.chunks_before = 1, p.chunks_after = 0, p.dtype = FK_DTYPE_F16;
  auto refused = [&](const char *what, fk_reformer_fwd_params r, bool sized = false) {
    const int launches0 = fk::g_emu_launches;
    expect(what, fk_reformer_fwd(&r, nullptr) == cudaErrorInvalidValue &&
                     fk::g_emu_launches == launches0 &&
                     (sized || fk_reformer_fwd_workspace_bytes(&r) == 0));
  };
  auto q = p;
  refused("no workspace", q, true);
  q = p, q.workspace = reinterpret_cast<char *>(dummy) + 16;
  refused("workspace not 256-aligned", q, true);
  q = p, q.head_dim = 136, refused("head_dim 136", q);
  q = p, q.head_dim = 0, refused("head_dim 0", q);
  q = p, q.seqlen = 72, refused("N not a multiple of C", q);
  q = p, q.n_buckets = 5, refused("odd n_buckets", q);
  q = p, q.n_buckets = 8194, refused("n_buckets 8194", q);
  q = p, q.n_hashes = 0, refused("n_hashes 0", q);
  q = p, q.chunk_length = 0, refused("chunk 0", q);
  q = p, q.chunks_before = -1, refused("chunks_before -1", q);
  q = p, q.chunks_after = 65536, refused("chunks_after 65536", q);
  q = p, q.causal = 2, refused("causal 2", q);
  q = p, q.dtype = 3, refused("f32", q);
  q = p, q.rotations = nullptr, refused("null rotations", q);
  q = p, q.buckets = nullptr, refused("null buckets", q);
  q = p, q.lse = nullptr, refused("null lse", q);
  q = p, q.out = nullptr, refused("null out", q);
  q = p, q.batch = 65536, refused("batch 65536", q);
  q = p, q.seqlen = 16, q.given_buckets = idummy, refused("given buckets, N <= C", q);
  q = p, q.n_hashes = 1 << 16, q.seqlen = 1 << 15, refused("n_hashes N >= 2^31", q);
  expect("null params", fk_reformer_fwd(nullptr, nullptr) == cudaErrorInvalidValue);
  // Needed only where used: given buckets need neither rotations nor buckets; the
  // fallback no workspace.
  q = p, q.rotations = nullptr, q.buckets = nullptr, q.given_buckets = idummy;
  // perm 512, the sort's keys 512 and counts (2 rounds x 5 buckets x 1 segment) 256, the
  // per-round outputs 4096.
  expect("given: workspace", fk_reformer_fwd_workspace_bytes(&q) == 512 + 512 + 256 + 4096);
  q = p, q.seqlen = 16, q.rotations = nullptr, q.buckets = nullptr;
  expect("fallback: no workspace", fk_reformer_fwd_workspace_bytes(&q) == 0);
  q = p, q.key_padding = reinterpret_cast<const uint8_t *>(idummy), q.n_hashes = 1;
  // flag, perm, the sort's keys and counts, and the rotations split for the tensor-core
  // hash (hashed here, D % 8 == 0).
  expect("pad, one round: workspace",
         fk_reformer_fwd_workspace_bytes(&q) == 256 + 256 + 256 + 256 + 256);
  q.head_dim = 12;
  expect("D % 8 != 0: no rotations split",
         fk_reformer_fwd_workspace_bytes(&q) == 256 + 256 + 256 + 256);
  // The backward: the same checks, and its own required pointers.
  fk_reformer_bwd_params g{};
  g.qk = g.v = g.out = g.dout = g.dqk = g.dv = dummy, g.lse = fdummy, g.buckets = idummy;
  g.qk_stride = g.v_stride = g.out_stride = g.dout_stride = g.dqk_stride =
      g.dv_stride = {1024, 8, 8};
  g.batch = 1, g.seqlen = 64, g.heads = 1, g.head_dim = 8, g.n_hashes = 2, g.n_buckets = 4;
  g.chunk_length = 16, g.chunks_before = 1, g.chunks_after = 0, g.dtype = FK_DTYPE_BF16;
  auto brefused = [&](const char *what, fk_reformer_bwd_params r, bool sized = false) {
    const int launches0 = fk::g_emu_launches;
    expect(what, fk_reformer_bwd(&r, nullptr) == cudaErrorInvalidValue &&
                     fk::g_emu_launches == launches0 &&
                     (sized || fk_reformer_bwd_workspace_bytes(&r) == 0));
  };
  auto h = g;
  brefused("bwd: no workspace", h, true);
  h = g, h.workspace = reinterpret_cast<char *>(dummy) + 16;
  brefused("bwd: workspace not 256-aligned", h, true);
  h = g, h.buckets = nullptr, brefused("bwd: hashed without buckets", h);
  h = g, h.seqlen = 16, brefused("bwd: buckets, N <= C", h);
  h = g, h.seqlen = 72, brefused("bwd: N not a multiple of C", h);
  h = g, h.dout = nullptr, brefused("bwd: null dout", h);
  h = g, h.out = nullptr, brefused("bwd: null out", h);
  h = g, h.lse = nullptr, brefused("bwd: null lse", h);
  h = g, h.dqk = nullptr, brefused("bwd: null dqk", h);
  h = g, h.dv = nullptr, brefused("bwd: null dv", h);
  h = g, h.head_dim = 129, brefused("bwd: head_dim 129", h);
  h = g, h.n_buckets = 6, h.n_buckets = 3, brefused("bwd: odd n_buckets", h);
  h = g, h.chunks_after = -1, brefused("bwd: chunks_after -1", h);
  h = g, h.causal = 3, brefused("bwd: causal 3", h);
  h = g, h.dtype = 0, brefused("bwd: dtype 0", h);
  h = g, h.heads = 65536, brefused("bwd: heads 65536", h);
  expect("bwd: null params", fk_reformer_bwd(nullptr, nullptr) == cudaErrorInvalidValue);
  // flag 256, perm 512, the sort's keys 512 and counts 256, Delta 256, weights 512, 3
  // partials of 2 x 64 x 8 x 4 = 4096 each.
  h = g, h.key_padding = reinterpret_cast<const uint8_t *>(idummy);
  expect("bwd: workspace", fk_reformer_bwd_workspace_bytes(&h) ==
                               256 + 512 + 512 + 256 + 256 + 512 + 3 * 4096);
  h = g, h.seqlen = 16, h.buckets = nullptr; // fallback: Delta, weights, partials
  expect("bwd fallback: workspace", fk_reformer_bwd_workspace_bytes(&h) == 256 + 256 + 3 * 512);
  return bad;
}

} // namespace

int main(int argc, char **argv) {
  const auto cases = all_cases();
  const int api_failed = argc == 1 ? api_checks() : 0;
  if (argc == 1) printf("api checks: %s\n", api_failed ? "FAILED" : "ok");
  const double fd = argc == 1 ? finite_difference_check() : 0;
  if (argc == 1)
    printf("backward definition vs finite differences: worst %.2e%s\n", fd,
           fd < 1e-6 ? "" : " <-- BAD");
  const bool fd_failed = fd >= 1e-6;
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
  return failed || api_failed || fd_failed ? 1 : 0;
}
