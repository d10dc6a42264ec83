// Longformer forward suite: fk_longformer_fwd (kernels/attention/longformer_fwd_*), both
// passes, on the emulator against an f64 reference of the rule of include/fk_longformer.h.
//   LOCAL: a non-global, non-padded query i of head h sees the non-padded keys i + d_h t,
//     t in [-w, w] (causal: [-w, 0]), inside [0, N), plus every non-padded global key
//     (causal: j <= i). Uses Q, K, V.
//   GLOBAL_ROWS: a listed (global) query i sees every non-padded key (causal: j <= i). Uses
//     distinct tensors Q_g, K_g, V_g; its rows are gathered through q_rows.
// Modes: LOCAL only (the pass alone: local rows checked, padded rows O = 0 and LSE = -inf
// exactly, global rows untouched), GLOBAL_ROWS only (listed rows checked, every other row
// untouched), and end to end (LOCAL with Q, K, V, then GLOBAL_ROWS with Q_g, K_g, V_g into
// the same O and LSE: every row checked against the full Longformer forward). Everything
// outside the tensors must stay NaN; padded tokens' Q, K, V (and Q_g, K_g, V_g) are NaN, so
// any leak of them shows up. The work lists (CSR of key tiles per (sequence, class, query
// tile)) are built here as the host builds them: LOCAL exactly from the rule; GLOBAL_ROWS per
// gathered tile, every key tile holding a non-padded key j with (not causal or j <= the
// tile's last row). Also: the entry point's argument checks.
// Packed global keys (LOCAL with k_rows = the listed global tokens): the work list holds the
// contiguous key tiles with a LOCAL_BAND pair (global keys excluded) plus nkt + m for each
// gathered key tile m with a listed key some local row of the tile sees; checked against the
// same reference (a global key inside a window counts once). Split over keys (GLOBAL_ROWS
// num_splits > 1): the workspace starts as NaN; checked against the same reference.
// Usage: longformer_test [case index...] (all cases by default).
#include "harness.h"

#include "emulated/attention/longformer_fwd_sm80.cuh"
#include "emulated/attention/longformer_fwd_api.cu"

#include <map>
#include <set>

using namespace harness;

enum Mode { LOCAL_ONLY, GLOBAL_ONLY, BOTH };

struct LCase {
  std::string name;
  int dtype;
  int B, N, H, D;
  int window;
  std::vector<int> dilation;                // per head
  bool causal;
  std::vector<std::vector<int>> globals;    // per sequence
  std::vector<std::vector<int>> padded;     // per sequence
  bool full_plan = false;                   // visit every key tile (superset work lists)
  int mode = LOCAL_ONLY;
  int extra_slots = 0;      // q_rows_per_seq = the largest count + this (more -1 entries)
  bool one_class = false;   // GLOBAL_ROWS work list with one class for every head
  bool list_padded = false; // q_rows (and k_rows) also list padded global tokens (stored O =
                            // 0, LSE = -inf; as keys they take part in no pair)
  bool packed = false;      // LOCAL with packed global keys (k_rows, gathered key tiles)
  int splits = 1;           // GLOBAL_ROWS num_splits (flash-decoding split over keys)
};

// A copy of c with packed global keys in LOCAL and / or GLOBAL_ROWS split over keys.
static LCase variant(LCase c, bool packed, int splits, const char *tag) {
  c.packed = packed, c.splits = splits;
  c.name = std::string(tag) + " " + c.name;
  return c;
}

// Tokens a, a + step, ... below e.
static std::vector<int> range(int a, int e, int step = 1) {
  std::vector<int> v;
  for (int i = a; i < e; i += step) v.push_back(i);
  return v;
}

// The rule (fk_longformer.h / rust LongformerProblem::keys).
struct Rule {
  const LCase &c;
  std::vector<uint8_t> glob, pad;       // (B, N)
  std::vector<std::vector<int>> listed; // per sequence: q_rows' valid entries, increasing
  explicit Rule(const LCase &c_)
      : c(c_), glob(size_t(c_.B) * c_.N, 0), pad(size_t(c_.B) * c_.N, 0), listed(c_.B) {
    for (int b = 0; b < c.B; ++b) {
      for (int i : c.globals[b]) glob[size_t(b) * c.N + i] = 1;
      for (int i : c.padded[b]) pad[size_t(b) * c.N + i] = 1;
      for (int i = 0; i < c.N; ++i)
        if (is_glob(b, i) && (c.list_padded || !is_pad(b, i))) listed[b].push_back(i);
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
  // LOCAL_BAND keys of local row i: the band's non-padded, non-global keys.
  std::vector<int> band_keys(int b, int h, int i) const {
    const int64_t n = c.N, d = std::min<int64_t>(c.dilation[h], n), w = std::min<int64_t>(c.window, n);
    const int64_t hi = c.causal ? 0 : w;
    std::vector<int> ks;
    for (int64_t tt = -w; tt <= hi; ++tt) {
      const int64_t j = i + d * tt;
      if (j >= 0 && j < n && !is_pad(b, int(j)) && !is_glob(b, int(j))) ks.push_back(int(j));
    }
    return ks;
  }
  // Keys of global row i: every non-padded key (causal: j <= i); none for a padded row.
  std::vector<int> global_keys(int b, int i) const {
    std::vector<int> ks;
    if (is_pad(b, i)) return ks;
    for (int j = 0; j < (c.causal ? i + 1 : c.N); ++j)
      if (!is_pad(b, j)) ks.push_back(j);
    return ks;
  }
};

// f64 reference of one row over the keys ks; false when there is none (O = 0, LSE = -inf).
template <typename T>
void ref_keys(const Problem<T> &p, int b, int h, int i, const std::vector<int> &ks,
              std::vector<double> &o, double &lse) {
  const int D = p.c.D;
  std::vector<double> s(ks.size());
  double mx = -INFINITY;
  for (size_t x = 0; x < ks.size(); ++x) {
    double a = 0;
    for (int d = 0; d < D; ++d) a += double(p.Q.get(b, i, h, d)) * p.K.get(b, ks[x], h, d);
    s[x] = a * double(p.scale);
    mx = std::max(mx, s[x]);
  }
  double l = 0;
  for (double &e : s) l += (e = std::exp(e - mx));
  o.assign(D, 0.0);
  for (size_t x = 0; x < ks.size(); ++x)
    for (int d = 0; d < D; ++d) o[d] += s[x] / l * p.V.get(b, ks[x], h, d);
  lse = mx + std::log(l);
}

// A pass's schedule: classes, CSR, and (GLOBAL_ROWS) q_rows.
struct Plan {
  std::vector<int32_t> head_class, offs{0}, ids, q_rows, k_rows;
  int C = 0, outer_tiles = 0, per_seq = 0, k_per_seq = 0;
};

// Classes = distinct dilations (rep_head: one head per class), or one class for all.
static void classes(const LCase &lc, bool one, Plan &pl, std::vector<int> &rep_head) {
  pl.head_class.assign(lc.H, 0);
  rep_head.clear();
  if (one) {
    rep_head.push_back(0);
  } else {
    std::map<int, int> cls;
    for (int h = 0; h < lc.H; ++h) {
      auto it = cls.find(lc.dilation[h]);
      if (it == cls.end()) {
        it = cls.emplace(lc.dilation[h], int(rep_head.size())).first;
        rep_head.push_back(h);
      }
      pl.head_class[h] = it->second;
    }
  }
  pl.C = int(rep_head.size());
}

// LOCAL: per (b, class, q tile) the sorted key tiles holding an allowed pair of a local row
// (or every tile with full_plan). Packed (k_rows = the global tokens, non-padded ones unless
// list_padded, per_seq = the largest count + extra_slots, at least 1): the contiguous key
// tiles holding a LOCAL_BAND pair of a local row of the tile, then nkt + m for each gathered
// key tile m holding a listed key some local row of the tile sees (causal: key <= the
// tile's last local row); full_plan: every contiguous and every gathered tile.
static Plan local_plan(const LCase &lc, const Rule &rule) {
  const int BM = FK_LONGFORMER_BLOCK_M, BN = FK_LONGFORMER_BLOCK_N;
  const int nt = (lc.N + BN - 1) / BN;
  Plan pl;
  std::vector<int> rep_head;
  classes(lc, false, pl, rep_head);
  pl.outer_tiles = (lc.N + BM - 1) / BM;
  if (lc.packed) {
    for (int b = 0; b < lc.B; ++b)
      pl.k_per_seq = std::max(pl.k_per_seq, int(rule.listed[b].size()));
    pl.k_per_seq = std::max(pl.k_per_seq + lc.extra_slots, 1);
    pl.k_rows.assign(size_t(lc.B) * pl.k_per_seq, -1);
    for (int b = 0; b < lc.B; ++b)
      for (size_t x = 0; x < rule.listed[b].size(); ++x)
        pl.k_rows[size_t(b) * pl.k_per_seq + x] = rule.listed[b][x];
    const int gt = (pl.k_per_seq + BN - 1) / BN;
    for (int b = 0; b < lc.B; ++b)
      for (int cc = 0; cc < pl.C; ++cc)
        for (int m = 0; m < pl.outer_tiles; ++m) {
          std::set<int> tiles;
          int last_local = -1;
          for (int i = m * BM; i < std::min(lc.N, (m + 1) * BM); ++i)
            if (rule.local_row(b, i)) {
              last_local = i;
              for (int j : rule.band_keys(b, rep_head[cc], i)) tiles.insert(j / BN);
            }
          for (int x = 0; x < pl.k_per_seq; ++x) {
            const int j = pl.k_rows[size_t(b) * pl.k_per_seq + x];
            if (j >= 0 && !rule.is_pad(b, j) && last_local >= 0 && (!lc.causal || j <= last_local))
              tiles.insert(nt + x / BN);
          }
          if (lc.full_plan)
            for (int n = 0; n < nt + gt; ++n) tiles.insert(n);
          pl.ids.insert(pl.ids.end(), tiles.begin(), tiles.end());
          pl.offs.push_back(int32_t(pl.ids.size()));
        }
    return pl;
  }
  for (int b = 0; b < lc.B; ++b)
    for (int cc = 0; cc < pl.C; ++cc)
      for (int m = 0; m < pl.outer_tiles; ++m) {
        std::set<int> tiles;
        if (lc.full_plan) {
          for (int n = 0; n < nt; ++n) tiles.insert(n);
        } else {
          for (int i = m * BM; i < std::min(lc.N, (m + 1) * BM); ++i)
            if (rule.local_row(b, i))
              for (int j : rule.keys(b, rep_head[cc], i)) tiles.insert(j / BN);
        }
        pl.ids.insert(pl.ids.end(), tiles.begin(), tiles.end());
        pl.offs.push_back(int32_t(pl.ids.size()));
      }
  return pl;
}

// GLOBAL_ROWS: q_rows (B, per_seq), per_seq = the largest count (+ extra_slots), -1 after
// each sequence's entries; per (b, class, gathered tile) every key tile holding a non-padded
// key j with (not causal or j <= the tile's last row) (or every tile with full_plan).
static Plan global_plan(const LCase &lc, const Rule &rule) {
  const int BM = FK_LONGFORMER_BLOCK_M, BN = FK_LONGFORMER_BLOCK_N;
  const int nt = (lc.N + BN - 1) / BN;
  Plan pl;
  std::vector<int> rep_head;
  classes(lc, lc.one_class, pl, rep_head);
  for (int b = 0; b < lc.B; ++b) pl.per_seq = std::max(pl.per_seq, int(rule.listed[b].size()));
  if (pl.per_seq == 0) return pl; // no global row anywhere: the host skips the pass
  pl.per_seq += lc.extra_slots;
  pl.outer_tiles = (pl.per_seq + BM - 1) / BM;
  pl.q_rows.assign(size_t(lc.B) * pl.per_seq, -1);
  for (int b = 0; b < lc.B; ++b)
    for (size_t x = 0; x < rule.listed[b].size(); ++x)
      pl.q_rows[size_t(b) * pl.per_seq + x] = rule.listed[b][x];
  for (int b = 0; b < lc.B; ++b)
    for (int cc = 0; cc < pl.C; ++cc)
      for (int m = 0; m < pl.outer_tiles; ++m) {
        int last = -1;
        for (int x = m * BM; x < std::min(pl.per_seq, (m + 1) * BM); ++x)
          last = std::max(last, pl.q_rows[size_t(b) * pl.per_seq + x]);
        if (last >= 0)
          for (int n = 0; n < nt; ++n) {
            bool any = lc.full_plan;
            for (int j = n * BN; j < std::min(lc.N, (n + 1) * BN) && !any; ++j)
              any = !rule.is_pad(b, j) && (!lc.causal || j <= last);
            if (any) pl.ids.push_back(n);
          }
        pl.offs.push_back(int32_t(pl.ids.size()));
      }
  return pl;
}

template <typename T>
int run_pass(int pass, const LCase &lc, const Rule &rule, const Problem<T> &p, const Plan &pl,
             Tensor<T> &O, Lse &lse, const std::vector<int32_t> &dil) {
  fk_longformer_fwd_params q{};
  q.base.q = p.Q.data.data(), q.base.k = p.K.data.data(), q.base.v = p.V.data.data();
  q.o = O.data.data(), q.lse = lse.data.data();
  q.base.q_stride.batch = p.Q.bs, q.base.q_stride.row = p.Q.rs, q.base.q_stride.head = p.Q.hs;
  q.base.k_stride.batch = p.K.bs, q.base.k_stride.row = p.K.rs, q.base.k_stride.head = p.K.hs;
  q.base.v_stride.batch = p.V.bs, q.base.v_stride.row = p.V.rs, q.base.v_stride.head = p.V.hs;
  q.base.o_stride.batch = O.bs, q.base.o_stride.row = O.rs, q.base.o_stride.head = O.hs;
  q.base.lse_stride.batch = lse.bs, q.base.lse_stride.head = lse.hs;
  fk_longformer_common &c = q.c;
  fk_attention_shape &sh = q.base.shape;
  sh.batch = lc.B, sh.seqlen_q = sh.seqlen_k = lc.N, sh.heads = sh.heads_kv = lc.H;
  sh.head_dim = lc.D;
  c.window = lc.window, c.causal = lc.causal;
  // Every list the kernels read is its own exact allocation, as the host uploads it.
  const emu::DeviceArray<int32_t> d_dil(dil), d_q_rows(pl.q_rows), d_k_rows(pl.k_rows);
  const emu::DeviceArray<int32_t> d_class(pl.head_class), d_offs(pl.offs), d_ids(pl.ids);
  const emu::DeviceArray<uint8_t> d_glob(rule.glob), d_pad(rule.pad);
  c.dilation = d_dil.data();
  c.global_mask = d_glob.data(), c.padding_mask = d_pad.data();
  c.pass = pass;
  c.q_rows = pass == FK_LONGFORMER_GLOBAL_ROWS ? d_q_rows.data() : nullptr;
  c.q_rows_per_seq = pass == FK_LONGFORMER_GLOBAL_ROWS ? pl.per_seq : 0;
  c.k_rows = pl.k_rows.empty() ? nullptr : d_k_rows.data();
  c.k_rows_per_seq = pl.k_rows.empty() ? 0 : pl.k_per_seq;
  // Split over keys (GLOBAL_ROWS): the workspace starts as NaN, so any entry the combine
  // reads that no split wrote shows up.
  emu::DeviceArray<float> ws_o, ws_lse;
  q.num_splits = pass == FK_LONGFORMER_GLOBAL_ROWS ? lc.splits : 1;
  if (q.num_splits > 1) {
    const size_t rows = size_t(q.num_splits) * lc.B * lc.H * pl.per_seq;
    ws_o.assign(rows * lc.D, NAN), ws_lse.assign(rows, NAN);
    q.partial_o = ws_o.data(), q.partial_lse = ws_lse.data();
  }
  c.head_class = d_class.data(), c.num_classes = pl.C;
  static const int32_t no_tile = 0; // an empty list still needs a pointer
  c.tile_offsets = d_offs.data(), c.tile_ids = pl.ids.empty() ? &no_tile : d_ids.data();
  sh.softmax_scale = p.scale, sh.dtype = lc.dtype, sh.device = 0;
  return fk_longformer_fwd(&q, nullptr);
}

template <typename T> void lf_case(const LCase &lc, Report &r) {
  Case c{lc.name, lc.dtype, lc.H, lc.H, lc.D, std::vector<int>(lc.B, lc.N),
         std::vector<int>(lc.B, lc.N), false, -1, -1};
  Problem<T> p(c, 4321), pg(c, 8765); // Q, K, V and Q_g, K_g, V_g
  Rule rule(lc);
  // Padded tokens' inputs are poison: they must never reach the results.
  for (int b = 0; b < lc.B; ++b)
    for (int i : lc.padded[b])
      for (int h = 0; h < lc.H; ++h)
        for (int d = 0; d < lc.D; ++d) {
          p.Q.at(b, i, h, d) = p.K.at(b, i, h, d) = p.V.at(b, i, h, d) = to_e<T>(NAN);
          pg.Q.at(b, i, h, d) = pg.K.at(b, i, h, d) = pg.V.at(b, i, h, d) = to_e<T>(NAN);
        }
  Tensor<T> O = p.like_q();
  Lse lse(c, p.s);
  std::vector<int32_t> dil(lc.dilation.begin(), lc.dilation.end());
  const bool run_local = lc.mode != GLOBAL_ONLY, run_global = lc.mode != LOCAL_ONLY;
  const Plan lp = local_plan(lc, rule), gp = global_plan(lc, rule);
  const int nt = (lc.N + FK_LONGFORMER_BLOCK_N - 1) / FK_LONGFORMER_BLOCK_N;

  const long sw0 = emu::g_switches;
  if (run_local) {
    const int rc = run_pass(FK_LONGFORMER_LOCAL, lc, rule, p, lp, O, lse, dil);
    if (rc != 0) return r.fail(format("fk_longformer_fwd LOCAL returned %d", rc));
  }
  if (run_global && gp.per_seq > 0) {
    const int rc = run_pass(FK_LONGFORMER_GLOBAL_ROWS, lc, rule, pg, gp, O, lse, dil);
    if (rc != 0) return r.fail(format("fk_longformer_fwd GLOBAL_ROWS returned %d", rc));
  }

  Stats so, sl;
  long untouched_bad = 0, padded_rows = 0, global_rows = 0, local_rows = 0;
  std::vector<double> o;
  double L;
  for (int b = 0; b < lc.B; ++b) {
    std::vector<uint8_t> listed(lc.N, 0);
    for (int i : rule.listed[b]) listed[i] = 1;
    for (int h = 0; h < lc.H; ++h)
      for (int i = 0; i < lc.N; ++i) {
        const float kl = lse.at(b, h, i);
        // Which pass writes row i (the last one run wins), and what.
        const bool by_local = run_local && !(rule.is_glob(b, i) && !rule.is_pad(b, i));
        const bool by_global = run_global && listed[i];
        if (!by_local && !by_global) { // must be untouched
          for (int d = 0; d < lc.D; ++d) untouched_bad += !std::isnan(O.get(b, i, h, d));
          untouched_bad += !std::isnan(kl);
          continue;
        }
        if (rule.is_pad(b, i)) { // padding wins over global, in both passes
          ++padded_rows;
          for (int d = 0; d < lc.D; ++d) so.not_zero += O.get(b, i, h, d) != 0.f;
          sl.not_zero += kl != -INFINITY;
          continue;
        }
        if (by_global) {
          ++global_rows;
          ref_keys(pg, b, h, i, rule.global_keys(b, i), o, L);
        } else {
          ++local_rows;
          ref_keys(p, b, h, i, rule.keys(b, h, i), o, L);
        }
        for (int d = 0; d < lc.D; ++d) so.add(O.get(b, i, h, d), o[d]);
        sl.add(kl, L);
      }
  }
  so.pad_touched = count_pad_touched(O, c.nq);
  sl.pad_touched = count_pad_touched(lse, c.nq, c.H);
  r.info(format("%ld fiber switches; LOCAL %d classes, %zu tiles of %d (k_rows per_seq %d); "
                "GLOBAL_ROWS per_seq %d, %d splits, "
                "%d classes, %zu tiles of %d; rows x heads: %ld local, %ld global, %ld padded",
                emu::g_switches - sw0, lp.C, run_local ? lp.ids.size() : 0,
                lc.B * lp.C * lp.outer_tiles * nt, lp.k_per_seq, gp.per_seq, lc.splits, gp.C,
                run_global ? gp.ids.size() : 0, lc.B * gp.C * gp.outer_tiles * nt, local_rows,
                global_rows, padded_rows));
  if (untouched_bad)
    r.fail(format("rows no pass writes were written: %ld elements", untouched_bad));
  r.check("O", so, rel_tol(lc.dtype), abs_tol(lc.dtype));
  r.check("LSE", sl, 1e-5, 1e-4);
}

// The entry point's argument checks (nothing is launched: every call fails or has N = 0).
static void api_checks(Report &r) {
  alignas(16) static uint16_t buf[64] = {};
  static float lse_buf[4];
  static const int32_t one = 1, zero = 0, offs[2] = {0, 0}, rows[1] = {0};
  auto base = [&] {
    fk_longformer_fwd_params q{};
    q.base.q = q.base.k = q.base.v = buf, q.o = buf, q.lse = lse_buf;
    fk_attention_shape &s = q.base.shape;
    s.batch = 1, s.seqlen_q = s.seqlen_k = 0, s.heads = s.heads_kv = 1, s.head_dim = 8;
    q.c.window = 1;
    q.c.dilation = &one, q.c.head_class = &zero, q.c.num_classes = 1;
    q.c.tile_offsets = offs, q.c.tile_ids = &zero, q.base.shape.dtype = FK_DTYPE_F16;
    q.c.pass = FK_LONGFORMER_LOCAL;
    q.num_splits = 1;
    return q;
  };
  struct Check {
    const char *what;
    std::function<void(fk_longformer_fwd_params &)> edit;
    int want;
  };
  const int bad = cudaErrorInvalidValue;
  const std::vector<Check> checks = {
      {"LOCAL, N = 0", [](fk_longformer_fwd_params &) {}, 0},
      {"GLOBAL_ROWS, N = 0",
       [](fk_longformer_fwd_params &q) {
         q.c.pass = FK_LONGFORMER_GLOBAL_ROWS, q.c.q_rows = rows, q.c.q_rows_per_seq = 1;
       },
       0},
      {"LOCAL with q_rows", [](fk_longformer_fwd_params &q) { q.c.q_rows = rows; }, bad},
      {"GLOBAL_ROWS without q_rows",
       [](fk_longformer_fwd_params &q) {
         q.c.pass = FK_LONGFORMER_GLOBAL_ROWS, q.c.q_rows_per_seq = 1;
       },
       bad},
      {"GLOBAL_ROWS, q_rows_per_seq 0",
       [](fk_longformer_fwd_params &q) {
         q.c.pass = FK_LONGFORMER_GLOBAL_ROWS, q.c.q_rows = rows;
       },
       bad},
      {"pass LOCAL_BAND",
       [](fk_longformer_fwd_params &q) { q.c.pass = FK_LONGFORMER_LOCAL_BAND; }, bad},
      {"pass GLOBAL_COLS",
       [](fk_longformer_fwd_params &q) { q.c.pass = FK_LONGFORMER_GLOBAL_COLS; }, bad},
      {"pass -1", [](fk_longformer_fwd_params &q) { q.c.pass = -1; }, bad},
      {"pass 4", [](fk_longformer_fwd_params &q) { q.c.pass = 4; }, bad},
      {"head_dim 12", [](fk_longformer_fwd_params &q) { q.base.shape.head_dim = 12; }, bad},
      {"heads_kv != heads (GQA)", [](fk_longformer_fwd_params &q) { q.base.shape.heads = 2; }, bad},
      {"seqlen_k != seqlen_q", [](fk_longformer_fwd_params &q) { q.base.shape.seqlen_k = 1; }, bad},
      {"tile_ids NULL", [](fk_longformer_fwd_params &q) { q.c.tile_ids = nullptr; }, bad},
      {"num_splits 0", [](fk_longformer_fwd_params &q) { q.num_splits = 0; }, bad},
      {"num_splits -1", [](fk_longformer_fwd_params &q) { q.num_splits = -1; }, bad},
      {"LOCAL, num_splits 2 with workspaces",
       [](fk_longformer_fwd_params &q) {
         q.num_splits = 2, q.partial_o = lse_buf, q.partial_lse = lse_buf;
       },
       bad},
      {"GLOBAL_ROWS, num_splits 2 with workspaces, N = 0",
       [](fk_longformer_fwd_params &q) {
         q.c.pass = FK_LONGFORMER_GLOBAL_ROWS, q.c.q_rows = rows, q.c.q_rows_per_seq = 1;
         q.num_splits = 2, q.partial_o = lse_buf, q.partial_lse = lse_buf;
       },
       0},
      {"GLOBAL_ROWS, num_splits 2, partial_o NULL",
       [](fk_longformer_fwd_params &q) {
         q.c.pass = FK_LONGFORMER_GLOBAL_ROWS, q.c.q_rows = rows, q.c.q_rows_per_seq = 1;
         q.num_splits = 2, q.partial_lse = lse_buf;
       },
       bad},
      {"GLOBAL_ROWS, num_splits 2, partial_lse NULL",
       [](fk_longformer_fwd_params &q) {
         q.c.pass = FK_LONGFORMER_GLOBAL_ROWS, q.c.q_rows = rows, q.c.q_rows_per_seq = 1;
         q.num_splits = 2, q.partial_o = lse_buf;
       },
       bad},
      {"GLOBAL_ROWS, num_splits 1, no workspace, N = 0",
       [](fk_longformer_fwd_params &q) {
         q.c.pass = FK_LONGFORMER_GLOBAL_ROWS, q.c.q_rows = rows, q.c.q_rows_per_seq = 1;
       },
       0},
      {"LOCAL with k_rows, N = 0",
       [](fk_longformer_fwd_params &q) { q.c.k_rows = rows, q.c.k_rows_per_seq = 1; }, 0},
      {"LOCAL with k_rows, k_rows_per_seq 0",
       [](fk_longformer_fwd_params &q) { q.c.k_rows = rows; }, bad},
  };
  for (const Check &ch : checks) {
    fk_longformer_fwd_params q = base();
    ch.edit(q);
    const int rc = fk_longformer_fwd(&q, nullptr);
    if (rc != ch.want) r.fail(format("%s: returned %d, want %d", ch.what, rc, ch.want));
  }
  if (fk_longformer_fwd(nullptr, nullptr) != bad) r.fail("NULL params accepted");
  if (r.ok) r.brief = format("%zu checks", checks.size() + 1);
}

int main(int argc, char **argv) {
  const int F = FK_DTYPE_F16, BF = FK_DTYPE_BF16;
  const int G = GLOBAL_ONLY, E = BOTH;
  std::vector<LCase> cases = {
      // LOCAL alone.
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
       {range(3, 70)}},
      {"d8 bf16 N=1", BF, 1, 1, 1, 8, 3, {2}, true, {{}}, {{}}},
      // GLOBAL_ROWS alone.
      {"GLOBAL_ROWS d64 f16 causal, 150 globals (2 gathered tiles) + a 0-global sequence, "
       "padded (global) tokens", F, 2, 333, 2, 64, 3, {1, 2}, true, {range(0, 300, 2), {}},
       {{7, 8, 130, 131, 301, 302}, {}}, false, G},
      {"GLOBAL_ROWS d128 bf16 full plan, a tile of -1 only, one class", BF, 2, 200, 2, 128, 2,
       {3, 1}, false, {{0, 99, 199}, {50}}, {{10, 11}, range(190, 200)}, true, G, 130, true},
      {"GLOBAL_ROWS d8 bf16 N=1 causal", BF, 1, 1, 1, 8, 0, {1}, true, {{0}}, {{}}, false, G},
      {"GLOBAL_ROWS d72 f16 listed padded globals -> O = 0, LSE = -inf", F, 1, 150, 2, 72, 1,
       {1, 4}, false, {{0, 20, 21, 149}}, {{20, 149}}, false, G, 0, false, true},
      // End to end: LOCAL (Q, K, V) then GLOBAL_ROWS (Q_g, K_g, V_g), every row checked.
      {"e2e d64 f16 w3 dil 1..4, globals start/mid/end/in windows, padding middle + tail", F, 2,
       333, 4, 64, 3, {1, 2, 3, 4}, false, {{0, 1, 5, 166, 168, 332}, {10, 100, 101, 250}},
       {{50, 51, 168, 200}, range(320, 333)}, false, E},
      {"e2e d128 bf16 causal w4 dil(1,3), 150 globals, a 0-global sequence, padded tail", BF, 3,
       300, 2, 128, 4, {1, 3}, true, {range(1, 300, 2), {}, {0, 150, 299}},
       {{}, range(250, 300), {5, 299}}, false, E},
      {"e2e d8 f16 causal w0 dil(2,1)", F, 1, 130, 2, 8, 0, {2, 1}, true, {{0, 64, 129}}, {{3}},
       false, E},
      {"e2e d72 bf16 w > N dil(1,4)", BF, 2, 200, 2, 72, 1000, {1, 4}, false, {{199}, {0, 100}},
       {{0, 1}, {}}, false, E},
      {"e2e d64 bf16 causal w1 dil(4,3,2,1), 129 globals, -1 slots, one class", BF, 2, 257, 4, 64,
       1, {4, 3, 2, 1}, true, {range(0, 257, 2), {3}}, {{}, range(200, 257)}, false, E, 5, true},
      {"e2e d128 f16 w1 dil(1,2) full plans, seq 1's only global padded", F, 2, 190, 2, 128, 1,
       {1, 2}, false, {{64, 65, 127, 128}, {30}}, {{100}, {30}}, true, E},
      {"e2e d40 f16 causal w2 no globals (GLOBAL_ROWS not run)", F, 1, 100, 1, 40, 2, {1}, true,
       {{}}, {{}}, false, E},
  };
  // Packed global keys (LOCAL with k_rows): variants of LOCAL-alone cases, then new ones.
  for (size_t i : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12})
    cases.push_back(variant(cases[i], true, 1, "packed"));
  const std::vector<LCase> packed = {
      {"d128 f16 causal w8 dil(1,3), 150 globals (3 gathered tiles) in windows, padding", F, 1,
       400, 2, 128, 8, {1, 3}, true, {range(0, 300, 2)}, {{7, 8, 9, 131, 133, 250, 399}}},
      {"d72 bf16 w4 dil(2,1), 100 globals, listed padded globals, -1 slots, batch 2", BF, 2, 300,
       2, 72, 4, {2, 1}, false, {range(3, 300, 3), {0, 5, 150}},
       {{6, 9, 12, 100, 101, 299}, {5, 200, 201}}, false, LOCAL_ONLY, 3, false, true},
      {"d64 f16 causal w16 dil(1,2,4), 70 globals (2 gathered tiles), padding head", F, 1, 333,
       3, 64, 16, {1, 2, 4}, true, {range(20, 300, 4)}, {{0, 1, 2}}},
      {"d8 bf16 w2 no globals (k_rows all -1)", BF, 1, 130, 1, 8, 2, {1}, false, {{}}, {{}}},
      {"d128 bf16 w1 dil(1,2) 65 globals, 2 gathered tiles, full plan", BF, 1, 260, 2, 128, 1,
       {1, 2}, false, {range(0, 260, 4)}, {{1, 259}}, true},
  };
  for (const LCase &c : packed) cases.push_back(variant(c, true, 1, "packed"));
  // GLOBAL_ROWS split over keys: variants of GLOBAL_ROWS-alone cases, then new ones.
  const std::pair<size_t, int> split_of[] = {{13, 2}, {14, 3}, {15, 5}, {16, 7}, {13, 40}};
  for (auto [i, S] : split_of)
    cases.push_back(variant(cases[i], false, S, format("split %d", S).c_str()));
  const std::vector<LCase> split = {
      {"GLOBAL_ROWS d128 f16 causal N=700, globals early/late, padded head", F, 1, 700, 2, 128,
       3, {1, 2}, true, {{0, 1, 5, 64, 300, 699}}, {{2, 3, 4, 10}}, false, G},
      {"GLOBAL_ROWS d64 bf16 N=200 (4 key tiles), batch 2, padding", BF, 2, 200, 2, 64, 3, {1, 1},
       false, {{0, 199}, {50}}, {{100}, range(150, 200)}, false, G},
      {"GLOBAL_ROWS d72 f16 causal, listed padded + early rows", F, 1, 300, 1, 72, 1, {2}, true,
       {{0, 3, 4, 150, 299}}, {{3, 200}}, false, G, 2, false, true},
  };
  for (int S : {2, 3, 7}) cases.push_back(variant(split[0], false, S, format("split %d", S).c_str()));
  cases.push_back(variant(split[1], false, 9, "split 9 (> CSR entries)"));
  cases.push_back(variant(split[2], false, 3, "split 3"));
  cases.push_back(variant(split[2], false, 12, "split 12 (> CSR entries)"));
  // End to end with both: packed LOCAL then split GLOBAL_ROWS.
  const std::pair<size_t, int> e2e_of[] = {{17, 2}, {18, 3}, {19, 7}, {20, 2}, {21, 3}, {22, 4}, {23, 2}};
  for (auto [i, S] : e2e_of)
    cases.push_back(variant(cases[i], true, S, format("packed + split %d", S).c_str()));
  int bad = 0;
  for (size_t i = 0; i <= cases.size(); ++i) {
    if (!emu::case_selected(i, argc, argv)) continue;
    Report r;
    const std::string name = i < cases.size() ? cases[i].name : "entry point argument checks";
    if (i == cases.size())
      api_checks(r);
    else
      cases[i].dtype == FK_DTYPE_F16 ? lf_case<__half>(cases[i], r)
                                     : lf_case<__nv_bfloat16>(cases[i], r);
    if (r.ok && argc <= 1)
      printf("[%zu] %s: %s\n", i, name.c_str(), r.brief.c_str());
    else
      printf("[%zu] %s%s\n%s", i, name.c_str(), r.ok ? "" : ": FAILED", r.detail.c_str());
    fflush(stdout);
    bad += !r.ok;
  }
  printf(bad ? "longformer: %d FAILED\n" : "longformer: all passed\n", bad);
  return bad != 0;
}
