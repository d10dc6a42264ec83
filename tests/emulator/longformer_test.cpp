// Longformer forward suite: fk_longformer_fwd (kernels/attention/longformer_fwd_*) on the
// emulator against an f64 reference of the local rule (include/fk_longformer.h): a
// non-global, non-padded query i of head h sees the non-padded keys i + d_h t, t in [-w, w]
// (causal: [-w, 0]), inside [0, N), plus every non-padded global key (causal: j <= i).
// Checks: O and LSE of local rows; padded rows O = 0 and LSE = -inf exactly; global rows,
// and everything outside the tensors, untouched (NaN); padded tokens' Q, K and V are NaN,
// so any leak of them shows up. The work list (CSR of key tiles per (sequence, dilation
// class, query tile)) is built here as the Rust plan builds it: exact, from the rule.
// Usage: longformer_test [case index...] (all cases by default).
#include "harness.h"

#include "emulated/attention/longformer_fwd_sm80.cuh"
#include "emulated/attention/longformer_fwd_api.cu"

#include <map>
#include <set>

using namespace harness;

struct LCase {
  std::string name;
  int dtype;
  int B, N, H, D;
  int window;
  std::vector<int> dilation;                // per head
  bool causal;
  std::vector<std::vector<int>> globals;    // per sequence
  std::vector<std::vector<int>> padded;     // per sequence
  bool full_plan = false;                   // visit every key tile (superset work list)
};

// The rule (the brief's / rust LongformerProblem::keys for non-global rows).
struct Rule {
  const LCase &c;
  std::vector<uint8_t> glob, pad; // (B, N)
  explicit Rule(const LCase &c_) : c(c_), glob(size_t(c_.B) * c_.N, 0), pad(size_t(c_.B) * c_.N, 0) {
    for (int b = 0; b < c.B; ++b) {
      for (int i : c.globals[b]) glob[size_t(b) * c.N + i] = 1;
      for (int i : c.padded[b]) pad[size_t(b) * c.N + i] = 1;
    }
  }
  bool is_glob(int b, int i) const { return glob[size_t(b) * c.N + i]; }
  bool is_pad(int b, int i) const { return pad[size_t(b) * c.N + i]; }
  bool local_row(int b, int i) const { return !is_glob(b, i) && !is_pad(b, i); }
  // Keys of local row i, increasing, each once (enumerated as in LongformerProblem::keys).
  std::vector<int> keys(int b, int h, int i) const {
    const int64_t n = c.N, d = std::min<int64_t>(c.dilation[h], n), w = std::min<int64_t>(c.window, n);
    const int64_t hi = c.causal ? 0 : w;
    std::set<int> ks;
    for (int64_t tt = -w; tt <= hi; ++tt) {
      const int64_t j = i + d * tt;
      if (j >= 0 && j < n && !is_pad(b, int(j))) ks.insert(int(j));
    }
    for (int g : c.globals[b])
      if (!is_pad(b, g) && (!c.causal || g <= i)) ks.insert(g);
    return std::vector<int>(ks.begin(), ks.end());
  }
};

template <typename T> void lf_case(const LCase &lc, Report &r) {
  Case c{lc.name, lc.dtype, lc.H, lc.H, lc.D, std::vector<int>(lc.B, lc.N),
         std::vector<int>(lc.B, lc.N), false, -1, -1};
  Problem<T> p(c, 4321);
  Rule rule(lc);
  // Padded tokens' inputs are poison: they must never reach the results.
  for (int b = 0; b < lc.B; ++b)
    for (int i : lc.padded[b])
      for (int h = 0; h < lc.H; ++h)
        for (int d = 0; d < lc.D; ++d)
          p.Q.at(b, i, h, d) = p.K.at(b, i, h, d) = p.V.at(b, i, h, d) = to_e<T>(NAN);
  Tensor<T> O = p.like_q();
  Lse lse(c, p.s);

  // Work list: classes = distinct dilations; per (b, class, q tile) the sorted key tiles
  // holding an allowed pair of a local row (or all tiles with full_plan).
  const int BM = FK_LONGFORMER_BLOCK_M, BN = FK_LONGFORMER_BLOCK_N;
  const int mt = (lc.N + BM - 1) / BM, nt = (lc.N + BN - 1) / BN;
  std::map<int, int> cls;
  std::vector<int32_t> head_class(lc.H), rep_head;
  for (int h = 0; h < lc.H; ++h) {
    auto it = cls.find(lc.dilation[h]);
    if (it == cls.end()) {
      it = cls.emplace(lc.dilation[h], int(rep_head.size())).first;
      rep_head.push_back(h);
    }
    head_class[h] = it->second;
  }
  const int C = int(rep_head.size());
  std::vector<int32_t> offs{0}, ids;
  for (int b = 0; b < lc.B; ++b)
    for (int cc = 0; cc < C; ++cc)
      for (int m = 0; m < mt; ++m) {
        std::set<int> tiles;
        if (lc.full_plan) {
          for (int n = 0; n < nt; ++n) tiles.insert(n);
        } else {
          for (int i = m * BM; i < std::min(lc.N, (m + 1) * BM); ++i)
            if (rule.local_row(b, i))
              for (int j : rule.keys(b, rep_head[cc], i)) tiles.insert(j / BN);
        }
        ids.insert(ids.end(), tiles.begin(), tiles.end());
        offs.push_back(int32_t(ids.size()));
      }
  std::vector<int32_t> dil(lc.dilation.begin(), lc.dilation.end());

  fk_longformer_fwd_params q{};
  q.q = p.Q.data.data(), q.k = p.K.data.data(), q.v = p.V.data.data();
  q.o = O.data.data(), q.lse = lse.data.data();
  q.q_batch_stride = p.Q.bs, q.q_row_stride = p.Q.rs, q.q_head_stride = p.Q.hs;
  q.k_batch_stride = p.K.bs, q.k_row_stride = p.K.rs, q.k_head_stride = p.K.hs;
  q.v_batch_stride = p.V.bs, q.v_row_stride = p.V.rs, q.v_head_stride = p.V.hs;
  q.o_batch_stride = O.bs, q.o_row_stride = O.rs, q.o_head_stride = O.hs;
  q.lse_batch_stride = lse.bs, q.lse_head_stride = lse.hs;
  q.batch = lc.B, q.seqlen = lc.N, q.heads = lc.H, q.head_dim = lc.D;
  q.window = lc.window, q.causal = lc.causal;
  q.dilation = dil.data();
  q.global_mask = rule.glob.data(), q.padding_mask = rule.pad.data();
  q.head_class = head_class.data(), q.num_classes = C;
  static const int32_t no_tile = 0; // an empty list still needs a pointer
  q.tile_offsets = offs.data(), q.tile_ids = ids.empty() ? &no_tile : ids.data();
  q.softmax_scale = p.scale, q.dtype = lc.dtype, q.device = 0;
  const long sw0 = emu::g_switches;
  const int rc = fk_longformer_fwd(&q, nullptr);
  if (rc != 0) return r.fail(format("fk_longformer_fwd returned %d", rc));

  Stats so, sl;
  long global_touched = 0, padded_rows = 0, global_rows = 0;
  std::vector<double> s, o(lc.D);
  for (int b = 0; b < lc.B; ++b)
    for (int h = 0; h < lc.H; ++h)
      for (int i = 0; i < lc.N; ++i) {
        const float kl = lse.at(b, h, i);
        if (rule.is_pad(b, i)) { // padding wins over global
          ++padded_rows;
          for (int d = 0; d < lc.D; ++d) so.not_zero += O.get(b, i, h, d) != 0.f;
          sl.not_zero += kl != -INFINITY;
          continue;
        }
        if (rule.is_glob(b, i)) {
          ++global_rows;
          for (int d = 0; d < lc.D; ++d) global_touched += !std::isnan(O.get(b, i, h, d));
          global_touched += !std::isnan(kl);
          continue;
        }
        const std::vector<int> ks = rule.keys(b, h, i);
        s.assign(ks.size(), 0.0);
        double mx = -INFINITY;
        for (size_t x = 0; x < ks.size(); ++x) {
          double a = 0;
          for (int d = 0; d < lc.D; ++d) a += double(p.Q.get(b, i, h, d)) * p.K.get(b, ks[x], h, d);
          s[x] = a * double(p.scale);
          mx = std::max(mx, s[x]);
        }
        double l = 0;
        for (double &e : s) l += (e = std::exp(e - mx));
        std::fill(o.begin(), o.end(), 0.0);
        for (size_t x = 0; x < ks.size(); ++x)
          for (int d = 0; d < lc.D; ++d) o[d] += s[x] / l * p.V.get(b, ks[x], h, d);
        for (int d = 0; d < lc.D; ++d) so.add(O.get(b, i, h, d), o[d]);
        sl.add(kl, mx + std::log(l));
      }
  so.pad_touched = count_pad_touched(O, c.nq);
  sl.pad_touched = count_pad_touched(lse, c.nq, c.H);
  r.info(format("%ld fiber switches, %d classes, %zu tiles visited of %d, %ld padded / %ld global "
                "rows", emu::g_switches - sw0, C, ids.size(), lc.B * C * mt * nt, padded_rows,
                global_rows));
  if (global_touched) r.fail(format("global rows written: %ld elements", global_touched));
  r.check("O", so, rel_tol(lc.dtype), abs_tol(lc.dtype));
  r.check("LSE", sl, 1e-5, 1e-4);
}

int main(int argc, char **argv) {
  const int F = FK_DTYPE_F16, BF = FK_DTYPE_BF16;
  const std::vector<LCase> cases = {
      {"d64 f16 w1 d1 no globals", F, 1, 200, 1, 64, 1, {1}, false, {{}}, {{}}},
      {"d64 bf16 w3 dil 1..4 globals start/mid/end", BF, 1, 300, 4, 64, 3, {1, 2, 3, 4}, false,
       {{0, 150, 299}}, {{}}},
      {"d64 f16 w8 dil(2,1) globals inside windows, padding tail, batch2", F, 2, 270, 2, 64, 8,
       {2, 1}, false, {{5, 7, 130}, {0, 1, 260}}, {{260, 261, 262, 263, 264, 265, 266, 267, 268, 269}, {}}},
      {"d64 bf16 causal w5 dil(1,3) globals, padding", BF, 1, 333, 2, 64, 5, {1, 3}, true,
       {{0, 64, 200, 332}}, {{10, 11, 127, 128, 300, 332}}},
      {"d40 f16 w > N (every key) dil(1,2)", F, 1, 100, 2, 40, 500, {1, 2}, false, {{50}}, {{99}}},
      {"d64 f16 causal w 1e9 dil 4", F, 1, 150, 1, 64, 1000000000, {4}, true, {{3}}, {{}}},
      {"d128 f16 w16 dil(1,2) globals, padding head", F, 1, 260, 2, 128, 16, {1, 2}, false,
       {{0, 129, 259}}, {{0, 1, 2, 3}}},
      {"d96 bf16 causal w2 dil(3,4) padding middle", BF, 1, 200, 2, 96, 2, {3, 4}, true,
       {{100, 150}}, {{60, 61, 62, 63, 64, 65, 199}}},
      {"d64 f16 w0 (self + globals)", F, 1, 140, 1, 64, 0, {1}, false, {{1, 70}}, {{}}},
      {"d64 bf16 dilation > N", BF, 1, 90, 2, 64, 4, {1000, 1}, false, {{}}, {{5}}},
      {"d64 f16 w6 dil(1,2) full plan (superset)", F, 1, 200, 2, 64, 6, {1, 2}, false,
       {{0, 100}}, {{199}}, true},
      {"d64 f16 all padded / global", F, 1, 70, 1, 64, 2, {1}, false, {{0, 1, 2}},
       {{3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
         27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48,
         49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69}}},
      {"d8 bf16 N=1", BF, 1, 1, 1, 8, 3, {2}, true, {{}}, {{}}},
  };
  int bad = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    bool selected = argc <= 1;
    for (int a = 1; a < argc; ++a) selected |= std::to_string(i) == argv[a];
    if (!selected) continue;
    Report r;
    cases[i].dtype == FK_DTYPE_F16 ? lf_case<__half>(cases[i], r)
                                   : lf_case<__nv_bfloat16>(cases[i], r);
    if (r.ok && argc <= 1)
      printf("[%zu] %s: %s\n", i, cases[i].name.c_str(), r.brief.c_str());
    else
      printf("[%zu] %s%s\n%s", i, cases[i].name.c_str(), r.ok ? "" : ": FAILED", r.detail.c_str());
    fflush(stdout);
    bad += !r.ok;
  }
  printf(bad ? "longformer: %d FAILED\n" : "longformer: all passed\n", bad);
  return bad != 0;
}
