// Longformer backward suite: fk_longformer_bwd_{delta,dq,dkdv} (kernels/attention/
// longformer_bwd_*) on the emulator against an f64 reference of the FULL Longformer forward
// and backward (include/fk_longformer.h): a local row (not global, not padded) attends with
// Q, K, V to the non-padded keys of its dilated band plus every non-padded global key; a
// global, non-padded row attends with Q_g, K_g, V_g to every non-padded key (causal:
// j <= i); a padded row has O = 0, LSE = -inf and no gradient. O and LSE are the f64
// reference's, rounded to the element type / f32. Steps 1-6 run in the header's order with
// work lists built here as the host builds them (exact, from the rule; or every inner tile
// with full_plan), in two modes:
// - separate: Q_g, K_g, V_g are their own tensors; steps 5-6 write dQ_g (pre-zeroed here,
//   as the host does) and overwrite dK_g, dV_g: six gradient tensors are checked;
// - shared: Q_g = Q, K_g = K, V_g = V; step 5 writes into dQ, step 6 accumulates into dK,
//   dV: three gradient tensors, each the sum of both paths.
// Step 4 (GLOBAL_COLS) writes in shared mode and accumulates in separate mode (LOCAL_BAND
// leaves global keys' rows at 0, so both are right; the Rust host writes).
// Variants: `packed` runs step 2 with k_rows = every token global_mask marks (padded ones
// included, increasing, then -1) and the packed work list (contiguous key tiles with a
// LOCAL_BAND pair, then nkt + m for each gathered key tile m with a GLOBAL_COLS pair), and
// step 4 with that list too (a padded listed key: no pair; left as is when accumulating);
// `splits` runs steps 4 and 5 with num_splits > 1 and a NaN-poisoned workspace.
// Outputs start as NaN (except what the contract has the host pre-zero); padded tokens'
// Q, K, V, dO, O (and Q_g, K_g, V_g) are NaN, so any leak shows; every element outside the
// tensors must stay NaN; gradient rows no pair touches must be exactly 0; Delta must be
// rowsum(dO * O) (0 for padded tokens).
// Usage: longformer_bwd_test [case index...] (all cases by default).
#include "harness.h"

#include "emulated/attention/longformer_bwd_sm80.cuh"
#include "emulated/attention/longformer_bwd_api.cu"

#include <functional>
#include <map>
#include <set>

using namespace harness;

struct BCase {
  std::string name;
  int dtype;
  int B, N, H, D;
  int window;
  std::vector<int> dilation; // per head
  bool causal;
  std::vector<std::vector<int>> globals; // per sequence
  std::vector<std::vector<int>> padded;  // per sequence
  bool shared;                           // Q_g = Q, K_g = K, V_g = V
  bool full_plan = false;                // visit every inner tile (superset work lists)
  int extra_slots = 0;                   // -1 entries past the longest global list
  bool packed = false; // step 2 with k_rows (packed global keys); step 4 lists padded globals
  int splits = 1;      // num_splits of steps 4 (dkdv GLOBAL_COLS) and 5 (dq GLOBAL_ROWS)
};

// The rule, written from the header independently of the kernels.
struct TRule {
  const BCase &c;
  std::vector<uint8_t> glob, pad; // (B, N)
  explicit TRule(const BCase &c_)
      : c(c_), glob(size_t(c_.B) * c_.N, 0), pad(size_t(c_.B) * c_.N, 0) {
    for (int b = 0; b < c.B; ++b) {
      for (int i : c.globals[b]) glob[size_t(b) * c.N + i] = 1;
      for (int i : c.padded[b]) pad[size_t(b) * c.N + i] = 1;
    }
  }
  bool is_glob(int b, int i) const { return glob[size_t(b) * c.N + i]; }
  bool is_pad(int b, int i) const { return pad[size_t(b) * c.N + i]; }
  bool local(int b, int i) const { return !is_glob(b, i) && !is_pad(b, i); }
  bool grow(int b, int i) const { return is_glob(b, i) && !is_pad(b, i); } // a listed row
  bool base(int b, int i, int j) const { return !is_pad(b, j) && (!c.causal || j <= i); }
  bool band(int h, int i, int j) const {
    const int64_t d = std::min<int64_t>(c.dilation[h], c.N), w = std::min<int64_t>(c.window, c.N);
    const int64_t t = j - i;
    return std::abs(t) <= w * d && t % d == 0;
  }
  bool pass_pair(int pass, int b, int h, int i, int j) const {
    if (!base(b, i, j)) return false;
    switch (pass) {
    case FK_LONGFORMER_LOCAL: return local(b, i) && (band(h, i, j) || is_glob(b, j));
    case FK_LONGFORMER_LOCAL_BAND: return local(b, i) && band(h, i, j) && !is_glob(b, j);
    case FK_LONGFORMER_GLOBAL_COLS: return local(b, i) && is_glob(b, j);
    default: return grow(b, i);
    }
  }
  // Keys of a local row, enumerated like the forward suite (band by steps, then globals).
  std::vector<int> local_keys(int b, int h, int i) const {
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
  std::vector<int> global_keys(int b, int i) const {
    std::vector<int> ks;
    for (int j = 0; j < c.N; ++j)
      if (!is_pad(b, j) && (!c.causal || j <= i)) ks.push_back(j);
    return ks;
  }
};

template <typename T> void lfb_case(const BCase &lc, Report &r) {
  constexpr int BK = FK_LONGFORMER_BWD_BLOCK;
  const int B = lc.B, N = lc.N, H = lc.H, D = lc.D;
  Case c{lc.name, lc.dtype, H, H, D, std::vector<int>(B, N), std::vector<int>(B, N), false, -1, -1};
  Problem<T> p(c, 4321), pg(c, 8765);
  TRule rule(lc);
  const bool shared = lc.shared;
  Tensor<T> &Qg = shared ? p.Q : pg.Q, &Kg = shared ? p.K : pg.K, &Vg = shared ? p.V : pg.V;
  const double scale = p.scale;

  // Reference forward (f64): O, LSE per row.
  Tensor<T> O = p.like_q();
  Lse lse(c, p.s), delta(c, p.s);
  std::vector<std::vector<int>> keys(size_t(B) * N * H);
  std::vector<std::vector<double>> P(keys.size());
  auto row = [&](int b, int i, int h) { return (size_t(b) * N + i) * H + h; };
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < N; ++i)
      for (int h = 0; h < H; ++h) {
        const size_t x = row(b, i, h);
        if (rule.is_pad(b, i)) {
          lse.at(b, h, i) = -INFINITY;
          continue;
        }
        const bool g = rule.is_glob(b, i);
        const Tensor<T> &q = g ? Qg : p.Q, &k = g ? Kg : p.K, &v = g ? Vg : p.V;
        keys[x] = g ? rule.global_keys(b, i) : rule.local_keys(b, h, i);
        std::vector<double> &s = P[x];
        s.assign(keys[x].size(), 0.0);
        double mx = -INFINITY;
        for (size_t y = 0; y < s.size(); ++y) {
          double a = 0;
          for (int d = 0; d < D; ++d) a += double(q.get(b, i, h, d)) * k.get(b, keys[x][y], h, d);
          s[y] = a * scale;
          mx = std::max(mx, s[y]);
        }
        double l = 0;
        for (double &e : s) l += (e = std::exp(e - mx));
        for (double &e : s) e /= l;
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (size_t y = 0; y < s.size(); ++y) o += s[y] * v.get(b, keys[x][y], h, d);
          O.at(b, i, h, d) = to_e<T>(float(o));
        }
        lse.at(b, h, i) = s.empty() ? -INFINITY : float(mx + std::log(l));
      }
  // Padded tokens' inputs are poison: they must never reach a result.
  for (int b = 0; b < B; ++b)
    for (int i : lc.padded[b])
      for (int h = 0; h < H; ++h)
        for (int d = 0; d < D; ++d)
          p.Q.at(b, i, h, d) = p.K.at(b, i, h, d) = p.V.at(b, i, h, d) = p.dO.at(b, i, h, d) =
              O.at(b, i, h, d) = pg.Q.at(b, i, h, d) = pg.K.at(b, i, h, d) =
                  pg.V.at(b, i, h, d) = to_e<T>(NAN);

  // Reference backward (f64), Delta from the O the kernels get.
  const size_t elems = size_t(B) * N * H * D;
  std::vector<double> rQ(elems, 0), rK(elems, 0), rV(elems, 0), rQg(elems, 0), rKg(elems, 0),
      rVg(elems, 0), rdelta(size_t(B) * N * H, 0);
  std::vector<char> sQ(size_t(B) * N * H, 0), sK(sQ.size(), 0), sQg(sQ.size(), 0),
      sKg(sQ.size(), 0);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < N; ++i)
      for (int h = 0; h < H; ++h) {
        if (rule.is_pad(b, i)) continue;
        const size_t x = row(b, i, h);
        const bool g = rule.is_glob(b, i);
        const Tensor<T> &q = g ? Qg : p.Q, &k = g ? Kg : p.K, &v = g ? Vg : p.V;
        std::vector<double> &dq = g ? rQg : rQ, &dk = g ? rKg : rK, &dv = g ? rVg : rV;
        std::vector<char> &qs = g ? sQg : sQ, &ks = g ? sKg : sK;
        double Delta = 0;
        for (int d = 0; d < D; ++d) Delta += double(O.get(b, i, h, d)) * p.dO.get(b, i, h, d);
        rdelta[x] = Delta;
        for (size_t y = 0; y < keys[x].size(); ++y) {
          const int j = keys[x][y];
          const size_t xj = row(b, j, h);
          const double pij = P[x][y];
          double dP = 0;
          for (int d = 0; d < D; ++d) dP += double(p.dO.get(b, i, h, d)) * v.get(b, j, h, d);
          const double dS = pij * (dP - Delta);
          qs[x] = ks[xj] = 1;
          for (int d = 0; d < D; ++d) {
            dq[x * D + d] += scale * dS * k.get(b, j, h, d);
            dk[xj * D + d] += scale * dS * q.get(b, i, h, d);
            dv[xj * D + d] += pij * p.dO.get(b, i, h, d);
          }
        }
      }
  if (shared) {
    for (size_t e = 0; e < elems; ++e) rQ[e] += rQg[e], rK[e] += rKg[e], rV[e] += rVg[e];
    for (size_t x = 0; x < sQ.size(); ++x) sQ[x] |= sQg[x], sK[x] |= sKg[x];
  }

  // Gathered rows: each sequence's non-padded globals, increasing, then -1.
  int most = 0;
  for (int b = 0; b < B; ++b) {
    int n = 0;
    for (int i = 0; i < N; ++i) n += rule.grow(b, i);
    most = std::max(most, n);
  }
  const bool any_global = most > 0;
  const int per_seq = most + (any_global ? lc.extra_slots : 0);
  std::vector<int32_t> grows(std::max(size_t(B) * per_seq, size_t(1)), -1);
  for (int b = 0; b < B; ++b) {
    int n = 0;
    for (int i = 0; i < N; ++i)
      if (rule.grow(b, i)) grows[size_t(b) * per_seq + n++] = i;
  }
  // Packed variant: every token global_mask marks (padded ones too), at least one entry.
  int most_all = 0;
  for (int b = 0; b < B; ++b) {
    int n = 0;
    for (int i = 0; i < N; ++i) n += rule.is_glob(b, i);
    most_all = std::max(most_all, n);
  }
  const int per_seq_all = std::max(most_all + lc.extra_slots, 1);
  std::vector<int32_t> gall(size_t(B) * per_seq_all, -1);
  for (int b = 0; b < B; ++b) {
    int n = 0;
    for (int i = 0; i < N; ++i)
      if (rule.is_glob(b, i)) gall[size_t(b) * per_seq_all + n++] = i;
  }

  // Classes: distinct dilations.
  std::map<int, int> cls;
  std::vector<int32_t> head_class(H), rep_head;
  for (int h = 0; h < H; ++h) {
    auto it = cls.find(lc.dilation[h]);
    if (it == cls.end()) {
      it = cls.emplace(lc.dilation[h], int(rep_head.size())).first;
      rep_head.push_back(h);
    }
    head_class[h] = it->second;
  }
  const int C = int(rep_head.size());
  // CSR: per (b, class, outer tile), the inner tiles holding a pair of `pass`.
  struct Csr {
    std::vector<int32_t> offs{0}, ids;
    emu::DeviceArray<int32_t> d_offs, d_ids; // as uploaded: exact allocations
  };
  // A side's rows: contiguous (list nullptr) or a gathered list of `per` entries per sequence.
  struct Side {
    const std::vector<int32_t> *list;
    int per;
  };
  const Side contiguous{nullptr, N}, gathered{&grows, per_seq}, gathered_all{&gall, per_seq_all};
  auto tok = [&](const Side &sd, int b, int idx) {
    if (idx >= sd.per) return -1;
    return sd.list ? (*sd.list)[size_t(b) * sd.per + idx] : idx;
  };
  long visited = 0;
  // Inner tiles of outer tile m holding a pair of `pass`, ids + id0 (all with full_plan).
  auto tiles_of = [&](std::set<int> &tiles, int pass, const Side &outer, const Side &inner,
                      bool outer_is_query, int b, int cc, int m, int id0) {
    const int nt = (inner.per + BK - 1) / BK;
    if (lc.full_plan) {
      for (int n = 0; n < nt; ++n) tiles.insert(id0 + n);
      return;
    }
    for (int x = m * BK; x < (m + 1) * BK; ++x) {
      const int o = tok(outer, b, x);
      if (o < 0) continue;
      for (int y = 0; y < inner.per; ++y) {
        const int u = tok(inner, b, y);
        if (u < 0 || tiles.count(id0 + y / BK)) continue;
        const bool hit = outer_is_query ? rule.pass_pair(pass, b, rep_head[cc], o, u)
                                        : rule.pass_pair(pass, b, rep_head[cc], u, o);
        if (hit) tiles.insert(id0 + y / BK);
      }
    }
  };
  // packed (dq LOCAL only): LOCAL_BAND contiguous tiles, then nkt + GLOBAL_COLS tiles of
  // gathered_all.
  auto build = [&](int pass, const Side &outer, const Side &inner, bool outer_is_query,
                   bool packed = false) {
    Csr csr;
    const int mt = (outer.per + BK - 1) / BK, nkt = (N + BK - 1) / BK;
    for (int b = 0; b < B; ++b)
      for (int cc = 0; cc < C; ++cc)
        for (int m = 0; m < mt; ++m) {
          std::set<int> tiles;
          if (packed) {
            tiles_of(tiles, FK_LONGFORMER_LOCAL_BAND, outer, inner, true, b, cc, m, 0);
            tiles_of(tiles, FK_LONGFORMER_GLOBAL_COLS, outer, gathered_all, true, b, cc, m, nkt);
          } else {
            tiles_of(tiles, pass, outer, inner, outer_is_query, b, cc, m, 0);
          }
          csr.ids.insert(csr.ids.end(), tiles.begin(), tiles.end());
          csr.offs.push_back(int32_t(csr.ids.size()));
        }
    visited += long(csr.ids.size());
    if (csr.ids.empty()) csr.ids.push_back(0); // an empty list still needs a pointer
    csr.d_offs = emu::DeviceArray<int32_t>(csr.offs), csr.d_ids = emu::DeviceArray<int32_t>(csr.ids);
    return csr;
  };
  // Split workspace, poisoned before every split launch.
  emu::DeviceArray<float> work;
  auto set_splits = [&](fk_longformer_bwd_params &q, int per, bool kv) {
    if (lc.splits <= 1) return;
    work.assign(size_t(lc.splits) * B * H * std::max(per, 1) * D * (kv ? 2 : 1), NAN);
    q.num_splits = lc.splits, q.partial = work.data();
  };

  // Outputs.
  Tensor<T> dQ = p.like_q(), dK = p.like_k(), dV = p.like_k();
  Tensor<T> dQg = p.like_q(), dKg = p.like_k(), dVg = p.like_k();
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < N; ++i)
      for (int h = 0; h < H; ++h)
        for (int d = 0; d < D; ++d) {
          dQg.at(b, i, h, d) = to_e<T>(0.f); // pre-zeroed by the host
          if (!any_global) dKg.at(b, i, h, d) = dVg.at(b, i, h, d) = to_e<T>(0.f); // steps skipped
        }
  std::vector<int32_t> dil(lc.dilation.begin(), lc.dilation.end());
  // What the kernels read, each its own exact allocation, as the host uploads it.
  const emu::DeviceArray<int32_t> d_dil(dil), d_head_class(head_class), d_grows(grows),
      d_gall(gall);
  const emu::DeviceArray<uint8_t> d_glob(rule.glob), d_pad(rule.pad);

  fk_longformer_bwd_params base{};
  fk_longformer_common &cm = base.c;
  fk_attention_shape &sh = base.base.shape;
  sh.batch = B, sh.seqlen_q = sh.seqlen_k = N, sh.heads = sh.heads_kv = H, sh.head_dim = D;
  cm.window = lc.window;
  cm.causal = lc.causal, cm.dilation = d_dil.data();
  cm.global_mask = d_glob.data(), cm.padding_mask = d_pad.data();
  cm.head_class = d_head_class.data(), cm.num_classes = C;
  sh.softmax_scale = p.scale, sh.dtype = lc.dtype, sh.device = 0;
  base.o = O.data.data(), base.dout = p.dO.data.data();
  base.lse = lse.data.data(), base.delta = delta.data.data();
  base.base.o_stride.batch = O.bs, base.base.o_stride.row = O.rs, base.base.o_stride.head = O.hs;
  base.do_stride.batch = p.dO.bs, base.do_stride.row = p.dO.rs, base.do_stride.head = p.dO.hs;
  base.base.lse_stride.batch = lse.bs, base.base.lse_stride.head = lse.hs;
  base.num_splits = 1;
  auto set_qkv = [&](fk_longformer_bwd_params &q, const Tensor<T> &Qt, const Tensor<T> &Kt,
                     const Tensor<T> &Vt) {
    q.base.q = Qt.data.data(), q.base.k = Kt.data.data(), q.base.v = Vt.data.data();
    q.base.q_stride.batch = Qt.bs, q.base.q_stride.row = Qt.rs, q.base.q_stride.head = Qt.hs;
    q.base.k_stride.batch = Kt.bs, q.base.k_stride.row = Kt.rs, q.base.k_stride.head = Kt.hs;
    q.base.v_stride.batch = Vt.bs, q.base.v_stride.row = Vt.rs, q.base.v_stride.head = Vt.hs;
  };
  auto set_dq = [&](fk_longformer_bwd_params &q, Tensor<T> &t) {
    q.dq = t.data.data(), q.dq_stride.batch = t.bs, q.dq_stride.row = t.rs, q.dq_stride.head = t.hs;
  };
  auto set_dkdv = [&](fk_longformer_bwd_params &q, Tensor<T> &tk, Tensor<T> &tv) {
    q.dk = tk.data.data(), q.dk_stride.batch = tk.bs, q.dk_stride.row = tk.rs,
    q.dk_stride.head = tk.hs;
    q.dv = tv.data.data(), q.dv_stride.batch = tv.bs, q.dv_stride.row = tv.rs,
    q.dv_stride.head = tv.hs;
  };
  auto set_csr = [&](fk_longformer_bwd_params &q, const Csr &csr) {
    q.c.tile_offsets = csr.d_offs.data(), q.c.tile_ids = csr.d_ids.data();
  };
  auto run = [&](const char *what, int rc) {
    if (rc != 0) r.fail(format("%s returned %d", what, rc));
    return rc == 0;
  };
  const long sw0 = emu::g_switches;
  const int launches0 = fk::g_emu_launches;

  // 1. Delta.
  if (!run("delta", fk_longformer_bwd_delta(&base, nullptr))) return;
  // 2. dQ, LOCAL.
  const Csr csr_local = build(FK_LONGFORMER_LOCAL, contiguous, contiguous, true, lc.packed);
  {
    fk_longformer_bwd_params q = base;
    q.c.pass = FK_LONGFORMER_LOCAL;
    if (lc.packed) q.c.k_rows = d_gall.data(), q.c.k_rows_per_seq = per_seq_all;
    set_qkv(q, p.Q, p.K, p.V), set_dq(q, dQ), set_csr(q, csr_local);
    if (!run("dq LOCAL", fk_longformer_bwd_dq(&q, nullptr))) return;
  }
  // 3. dK, dV, LOCAL_BAND.
  const Csr csr_band = build(FK_LONGFORMER_LOCAL_BAND, contiguous, contiguous, false);
  {
    fk_longformer_bwd_params q = base;
    q.c.pass = FK_LONGFORMER_LOCAL_BAND;
    set_qkv(q, p.Q, p.K, p.V), set_dkdv(q, dK, dV), set_csr(q, csr_band);
    if (!run("dkdv LOCAL_BAND", fk_longformer_bwd_dkdv(&q, nullptr))) return;
  }
  if (any_global) {
    // 4. dK, dV of the global keys from local rows. LOCAL_BAND left those rows at 0, so
    // writing them (as the Rust host does) and accumulating are the same: shared mode
    // writes, separate mode accumulates.
    const Side &cols = lc.packed ? gathered_all : gathered;
    const Csr csr_cols = build(FK_LONGFORMER_GLOBAL_COLS, cols, contiguous, false);
    {
      fk_longformer_bwd_params q = base;
      q.c.pass = FK_LONGFORMER_GLOBAL_COLS;
      q.c.k_rows = (cols.list == &gall ? d_gall : d_grows).data(), q.c.k_rows_per_seq = cols.per;
      set_splits(q, cols.per, true);
      q.accumulate = !shared;
      set_qkv(q, p.Q, p.K, p.V), set_dkdv(q, dK, dV), set_csr(q, csr_cols);
      if (!run("dkdv GLOBAL_COLS", fk_longformer_bwd_dkdv(&q, nullptr))) return;
      if (lc.splits > 1) {
        // accumulate = 1 onto nonzero rows: split (NaN-poisoned workspace) against unsplit,
        // both from the same random dK, dV; a padded listed key is left as it is by both.
        Tensor<T> aK = p.like_k(), aV = p.like_k(), bK = p.like_k(), bV = p.like_k();
        std::mt19937 rng(99);
        std::normal_distribution<float> nd;
        for (int b = 0; b < B; ++b)
          for (int i = 0; i < N; ++i)
            for (int h = 0; h < H; ++h)
              for (int d = 0; d < D; ++d) {
                aK.at(b, i, h, d) = bK.at(b, i, h, d) = to_e<T>(nd(rng));
                aV.at(b, i, h, d) = bV.at(b, i, h, d) = to_e<T>(nd(rng));
              }
        fk_longformer_bwd_params u = q, sp = q;
        u.accumulate = sp.accumulate = 1;
        u.num_splits = 1, u.partial = nullptr;
        set_dkdv(u, aK, aV), set_dkdv(sp, bK, bV), set_splits(sp, cols.per, true);
        if (!run("dkdv GLOBAL_COLS accumulate", fk_longformer_bwd_dkdv(&u, nullptr)) ||
            !run("dkdv GLOBAL_COLS accumulate split", fk_longformer_bwd_dkdv(&sp, nullptr)))
          return;
        long bad = 0;
        const double tol = lc.dtype == FK_DTYPE_BF16 ? 1.6e-2 : 2e-3;
        for (size_t e = 0; e < aK.data.size(); ++e) {
          const float x[2] = {float(aK.data[e]), float(aV.data[e])};
          const float y[2] = {float(bK.data[e]), float(bV.data[e])};
          for (int w = 0; w < 2; ++w)
            if (std::isnan(x[w]) != std::isnan(y[w]) ||
                (!std::isnan(x[w]) &&
                 std::abs(x[w] - y[w]) > tol * std::max(1.f, std::abs(x[w]))))
              ++bad;
        }
        if (bad) r.fail(format("split vs unsplit GLOBAL_COLS accumulate: %ld elements differ", bad));
      }
    }
    // 5. dQ (or dQ_g) of the global rows.
    const Csr csr_grows_q = build(FK_LONGFORMER_GLOBAL_ROWS, gathered, contiguous, true);
    {
      fk_longformer_bwd_params q = base;
      q.c.pass = FK_LONGFORMER_GLOBAL_ROWS;
      q.c.q_rows = d_grows.data(), q.c.q_rows_per_seq = per_seq;
      set_splits(q, per_seq, false);
      set_qkv(q, Qg, Kg, Vg), set_dq(q, shared ? dQ : dQg), set_csr(q, csr_grows_q);
      if (!run("dq GLOBAL_ROWS", fk_longformer_bwd_dq(&q, nullptr))) return;
    }
    // 6. dK, dV (accumulated) or dK_g, dV_g (written) of the global rows.
    const Csr csr_grows_kv = build(FK_LONGFORMER_GLOBAL_ROWS, contiguous, gathered, false);
    {
      fk_longformer_bwd_params q = base;
      q.c.pass = FK_LONGFORMER_GLOBAL_ROWS;
      q.c.q_rows = d_grows.data(), q.c.q_rows_per_seq = per_seq;
      q.accumulate = shared;
      set_qkv(q, Qg, Kg, Vg), set_csr(q, csr_grows_kv);
      if (shared)
        set_dkdv(q, dK, dV);
      else
        set_dkdv(q, dKg, dVg);
      if (!run("dkdv GLOBAL_ROWS", fk_longformer_bwd_dkdv(&q, nullptr))) return;
    }
  }
  r.info(format("%d launches, %ld fiber switches, %d classes, %ld inner tiles visited, "
                "%d gathered per sequence",
                fk::g_emu_launches - launches0, emu::g_switches - sw0, C, visited, per_seq));

  auto check = [&](const char *what, const Tensor<T> &t, const std::vector<double> &ref,
                   const std::vector<char> &seen) {
    Stats st;
    double ref_max = 0;
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < N; ++i)
        for (int h = 0; h < H; ++h) {
          const size_t x = row(b, i, h);
          for (int d = 0; d < D; ++d) {
            const float kv = t.get(b, i, h, d);
            if (!seen[x] && kv != 0.f) ++st.not_zero;
            st.add(kv, ref[x * D + d]);
            ref_max = std::max(ref_max, std::abs(ref[x * D + d]));
          }
        }
    st.pad_touched = count_pad_touched(t, c.nq);
    const bool bf = lc.dtype == FK_DTYPE_BF16;
    r.check(what, st, bf ? 1.5e-2 : 3e-3, (bf ? 4e-2 : 6e-3) * std::max(1.0, ref_max));
  };
  check("dQ", dQ, rQ, sQ);
  check("dK", dK, rK, sK);
  check("dV", dV, rV, sK);
  if (!shared) {
    check("dQg", dQg, rQg, sQg);
    check("dKg", dKg, rKg, sKg);
    check("dVg", dVg, rVg, sKg);
  }
  Stats sd;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < N; ++i) {
        const float kd = delta.at(b, h, i);
        if (rule.is_pad(b, i) && kd != 0.f) ++sd.not_zero;
        sd.add(kd, rdelta[row(b, i, h)]);
      }
  sd.pad_touched = count_pad_touched(delta, c.nq, H);
  r.check("Delta", sd, 1e-5, 1e-3);
}

// Launcher checks: what would be undefined behaviour on the device is refused, with no
// launch; N = 0 succeeds with no launch.
int api_checks() {
  int bad = 0;
  alignas(16) static int dummy[64];
  static const int32_t zeros[4] = {0, 0, 0, 0}, one[1] = {1};
  fk_longformer_bwd_params p{};
  p.base.q = p.base.k = p.base.v = p.o = p.dout = dummy;
  p.dq = p.dk = p.dv = dummy;
  p.lse = reinterpret_cast<float *>(dummy);
  p.delta = reinterpret_cast<float *>(dummy);
  fk_attention_shape &ps = p.base.shape;
  ps.batch = 1, ps.seqlen_q = ps.seqlen_k = 1, ps.heads = ps.heads_kv = 1, ps.head_dim = 64;
  p.c.window = 1;
  p.c.dilation = one, p.c.head_class = zeros, p.c.num_classes = 1;
  p.c.tile_offsets = zeros, p.c.tile_ids = zeros, p.base.shape.dtype = FK_DTYPE_F16;
  p.base.shape.softmax_scale = 1.f;
  using Fn = int32_t (*)(const fk_longformer_bwd_params *, void *);
  auto expect = [&](const char *what, Fn fn, fk_longformer_bwd_params q, int want) {
    const int launches0 = fk::g_emu_launches;
    const int rc = fn(&q, nullptr);
    if (rc != want || fk::g_emu_launches != launches0) {
      printf("api %s: rc %d (want %d), %d launches  <-- BAD\n", what, rc, want,
             fk::g_emu_launches - launches0);
      ++bad;
    }
  };
  const Fn dq = fk_longformer_bwd_dq, dkdv = fk_longformer_bwd_dkdv,
           dl = fk_longformer_bwd_delta;
  const int E = cudaErrorInvalidValue;
  p.num_splits = 1;
  auto q = p; q.c.pass = FK_LONGFORMER_LOCAL_BAND; expect("dq pass LOCAL_BAND", dq, q, E);
  q = p; q.c.pass = FK_LONGFORMER_LOCAL; expect("dkdv pass LOCAL", dkdv, q, E);
  q = p; q.c.pass = 7; expect("dkdv pass 7", dkdv, q, E);
  q = p; q.c.pass = FK_LONGFORMER_GLOBAL_ROWS; expect("dq GLOBAL_ROWS no q_rows", dq, q, E);
  q = p; q.c.pass = FK_LONGFORMER_GLOBAL_COLS; expect("dkdv GLOBAL_COLS no k_rows", dkdv, q, E);
  q = p; q.c.pass = FK_LONGFORMER_GLOBAL_ROWS; expect("dkdv GLOBAL_ROWS no q_rows", dkdv, q, E);
  q = p; q.base.shape.head_dim = 136; expect("head_dim 136", dq, q, E);
  q = p; q.base.shape.head_dim = 12; q.c.pass = FK_LONGFORMER_LOCAL_BAND; expect("head_dim 12", dkdv, q, E);
  q = p; q.base.shape.dtype = 9; expect("dtype 9", dl, q, E);
  q = p; q.base.shape.batch = 0; expect("batch 0", dl, q, E);
  q = p; q.base.shape.heads = q.base.shape.heads_kv = 0; expect("heads 0", dq, q, E);
  q = p; q.base.shape.heads = 2; expect("heads_kv != heads (GQA)", dq, q, E);
  q = p; q.base.shape.seqlen_k = 2; expect("seqlen_k != seqlen_q", dkdv, q, E);
  q = p; q.c.window = -1; expect("window -1", dq, q, E);
  q = p; q.c.num_classes = 0; q.c.pass = FK_LONGFORMER_LOCAL_BAND; expect("num_classes 0", dkdv, q, E);
  q = p; q.c.tile_ids = nullptr; expect("null tile_ids", dq, q, E);
  q = p; q.c.dilation = nullptr; expect("null dilation", dkdv, q, E);
  q = p; q.dq = nullptr; expect("null dq", dq, q, E);
  q = p; q.dv = nullptr; expect("null dv", dkdv, q, E);
  q = p; q.o = nullptr; expect("delta null o", dl, q, E);
  q = p; q.delta = nullptr; expect("null delta", dq, q, E);
  q = p; q.lse = nullptr; expect("null lse", dkdv, q, E);
  q = p; q.base.shape.seqlen_q = q.base.shape.seqlen_k = -1; expect("seqlen -1", dl, q, E);
  // Splits: >= 1; > 1 only for dq GLOBAL_ROWS and dkdv GLOBAL_COLS, with the workspace,
  // and grids that fit. Packed keys (dq LOCAL with k_rows): at least one entry.
  static float work[16];
  static const int32_t rows1[1] = {0};
  q = p; q.num_splits = 0; expect("dq num_splits 0", dq, q, E);
  q = p; q.num_splits = -3; q.c.pass = FK_LONGFORMER_LOCAL_BAND; expect("dkdv num_splits -3", dkdv, q, E);
  q = p; q.num_splits = 2; q.partial = work; expect("dq LOCAL splits 2", dq, q, E);
  q = p; q.num_splits = 2; q.partial = work; q.c.pass = FK_LONGFORMER_LOCAL_BAND;
  expect("dkdv LOCAL_BAND splits 2", dkdv, q, E);
  q = p; q.num_splits = 2; q.partial = work; q.c.pass = FK_LONGFORMER_GLOBAL_ROWS;
  q.c.q_rows = rows1, q.c.q_rows_per_seq = 1; expect("dkdv GLOBAL_ROWS splits 2", dkdv, q, E);
  q = p; q.num_splits = 2; q.partial = work; q.c.pass = FK_LONGFORMER_GLOBAL_COLS;
  q.c.k_rows = rows1, q.c.k_rows_per_seq = 1; expect("dq GLOBAL_COLS splits 2", dq, q, E);
  q = p; q.num_splits = 2; q.c.pass = FK_LONGFORMER_GLOBAL_ROWS;
  q.c.q_rows = rows1, q.c.q_rows_per_seq = 1; expect("dq GLOBAL_ROWS splits 2 no partial", dq, q, E);
  q = p; q.num_splits = 2; q.c.pass = FK_LONGFORMER_GLOBAL_COLS;
  q.c.k_rows = rows1, q.c.k_rows_per_seq = 1; expect("dkdv GLOBAL_COLS splits 2 no partial", dkdv, q, E);
  q = p; q.num_splits = 1 << 30; q.partial = work; q.c.pass = FK_LONGFORMER_GLOBAL_ROWS;
  q.c.q_rows = rows1, q.c.q_rows_per_seq = 129; expect("dq split grid x overflow", dq, q, E);
  q = p; q.num_splits = 2; q.partial = work; q.c.pass = FK_LONGFORMER_GLOBAL_COLS;
  q.base.shape.heads = q.base.shape.heads_kv = 60000;
  q.c.k_rows = rows1, q.c.k_rows_per_seq = 1 << 20;
  expect("dkdv reduce grid overflow", dkdv, q, E);
  q = p; q.c.k_rows = rows1, q.c.k_rows_per_seq = 0; expect("dq LOCAL k_rows per_seq 0", dq, q, E);
  q = p; q.base.shape.seqlen_q = q.base.shape.seqlen_k = 0; expect("seqlen 0 delta", dl, q, 0);
  q = p; q.base.shape.seqlen_q = q.base.shape.seqlen_k = 0; expect("seqlen 0 dq", dq, q, 0);
  q = p; q.base.shape.seqlen_q = q.base.shape.seqlen_k = 0; q.c.pass = FK_LONGFORMER_LOCAL_BAND;
  expect("seqlen 0 dkdv", dkdv, q, 0);
  if (dq(nullptr, nullptr) != E || dkdv(nullptr, nullptr) != E || dl(nullptr, nullptr) != E) {
    printf("api null params  <-- BAD\n");
    ++bad;
  }
  printf("api checks: %s\n", bad ? "FAILED" : "ok");
  return bad;
}

int main(int argc, char **argv) {
  const int F = FK_DTYPE_F16, BF = FK_DTYPE_BF16;
  std::vector<int> many; // 70 globals: two gathered tiles
  for (int i = 0; i < 140; i += 2) many.push_back(i);
  const std::vector<BCase> cases = {
      {"shared d64 f16 w3 dil(1,2,3) globals start/mid/end + seq without, padding, B2", F, 2,
       150, 3, 64, 3, {1, 2, 3}, false, {{0, 75, 149}, {}}, {{20, 21, 100}, {149}}, true},
      {"separate d64 bf16 causal w4 dil(2,1) globals inside windows, padded tail", BF, 1, 130,
       2, 64, 4, {2, 1}, true, {{3, 5, 64, 66}}, {{120, 121, 122, 123, 124, 125, 126, 127, 128, 129}},
       false, false, 2},
      {"shared d64 f16 70 globals (2 gathered tiles) + seq with 0 globals, B2", F, 2, 160, 1, 64,
       2, {1}, false, {many, {}}, {{150, 151}, {7}}, true},
      {"separate d64 f16 70 globals, causal, dil 3", F, 1, 150, 1, 64, 5, {3}, true, {many},
       {{149}}, false},
      {"separate d8 bf16 no globals at all w2 dil 2, padding", BF, 2, 70, 1, 8, 2, {2}, false,
       {{}, {}}, {{0, 33}, {69}}, false},
      {"shared d8 f16 no globals causal w1", F, 1, 90, 1, 8, 1, {1}, true, {{}}, {{}}, true},
      {"separate d128 f16 causal w5 dil(1,4) globals, padding", F, 1, 130, 2, 128, 5, {1, 4},
       true, {{0, 63, 64, 129}}, {{10, 64, 127}}, false},
      {"shared d128 bf16 w 1000 (> N) dil(1,3)", BF, 1, 100, 2, 128, 1000, {1, 3}, false,
       {{50, 99}}, {{0, 98}}, true},
      {"separate d72 bf16 w6 dil(4,2) padding at arbitrary positions", BF, 1, 140, 2, 72, 6,
       {4, 2}, false, {{1, 70, 139}}, {{2, 3, 50, 71, 72, 73, 100}}, false},
      {"shared d72 f16 w0 (self + globals), global also padded", F, 1, 100, 1, 72, 0, {1},
       false, {{1, 45, 80, 99}}, {{80, 90}}, true},
      {"separate d64 f16 w1 H3 dil(4,1000,2) full plan (superset)", F, 1, 77, 3, 64, 1, {4, 1000, 2},
       false, {{10, 76}}, {{30}}, false, true},
      {"shared d128 f16 causal w2 dil 2 full plan, B2", F, 2, 70, 1, 128, 2, {2}, true,
       {{0, 69}, {35}}, {{}, {68, 69}}, true, true},
      // Packed global keys (dq LOCAL with k_rows) and splits (dq GLOBAL_ROWS, dkdv
      // GLOBAL_COLS), end to end.
      {"packed+S2 shared d64 f16 70 globals in windows + seq without, padding, B2", F, 2, 160,
       1, 64, 2, {1}, false, {many, {}}, {{150, 151, 4}, {7}}, true, false, 0, true, 2},
      {"packed+S3 separate d64 bf16 causal 70 globals dil(3,1) padded global", BF, 1, 150, 2,
       64, 5, {3, 1}, true, {many}, {{149, 6, 71}}, false, false, 0, true, 3},
      {"packed+S7 separate d128 f16 causal w5 dil(1,4) globals, padding", F, 1, 130, 2, 128, 5,
       {1, 4}, true, {{0, 63, 64, 100, 129}}, {{10, 64, 127}}, false, false, 1, true, 7},
      {"packed+S7 shared d72 bf16 causal w3 dil(2,1) full plan, padded global", BF, 1, 140, 2,
       72, 3, {2, 1}, true, {{1, 2, 70, 80, 139}}, {{2, 90}}, true, true, 0, true, 7},
      {"packed+S2 shared d8 bf16 causal 70 globals, extra slots", BF, 1, 150, 1, 8, 1, {1},
       true, {many}, {{}}, true, false, 3, true, 2},
      {"packed separate d8 f16 no globals (k_rows all -1)", F, 2, 70, 1, 8, 2, {2}, false,
       {{}, {}}, {{0}, {69}}, false, false, 0, true, 1},
      {"packed+S3 shared d128 bf16 70 globals w1 dil(1,2), extra slots", BF, 1, 150, 2, 128, 1,
       {1, 2}, false, {many}, {{149}}, true, false, 5, true, 3},
      {"S2 separate d64 f16 w4 dil 2 globals, padding (not packed)", F, 1, 200, 1, 64, 4, {2},
       false, {{5, 100, 199}}, {{50}}, false, false, 2, false, 2},
      {"packed+S20 separate d72 f16 70 globals w2, full plan, more splits than entries", F, 1,
       150, 1, 72, 2, {1}, false, {many}, {{3}}, false, true, 0, true, 20},
  };
  int bad = argc > 1 ? 0 : api_checks();
  for (size_t i = 0; i < cases.size(); ++i) {
    if (!emu::case_selected(i, argc, argv)) continue;
    Report r;
    cases[i].dtype == FK_DTYPE_F16 ? lfb_case<__half>(cases[i], r)
                                   : lfb_case<__nv_bfloat16>(cases[i], r);
    if (r.ok && argc <= 1)
      printf("[%zu] %s: %s\n", i, cases[i].name.c_str(), r.brief.c_str());
    else
      printf("[%zu] %s%s\n%s", i, cases[i].name.c_str(), r.ok ? "" : ": FAILED", r.detail.c_str());
    fflush(stdout);
    bad += !r.ok;
  }
  printf(bad ? "longformer_bwd: %d FAILED\n" : "longformer_bwd: all passed\n", bad);
  return bad != 0;
}
