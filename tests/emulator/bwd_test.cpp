// Backward suite: fk_attention_bwd (kernels/attention/dense_bwd_*) on the emulator against
// the f64 reference. O and LSE come from the f64 reference forward, or, in the
// "fwd+bwd" cases, from fk_attention_fwd, which checks that the forward's LSE is what the
// backward expects (rows without keys included). dQ, dK, dV are checked per valid element;
// rows that see (or are seen by) no key must be exactly zero; everything outside the
// sequences must stay untouched (NaN); the Delta workspace must hold rowsum(dO * O).
// Usage: bwd_test [case index...] (all cases by default).
#include "harness.h"

#include "emulated/attention/dense_bwd_sm80.cuh"
#include "emulated/attention/dense_bwd_sm90.cuh"
#include "emulated/attention/dense_bwd_api.cu"
#include "emulated/attention/dense_fwd_sm80.cuh"
#include "emulated/attention/dense_fwd_sm90.cuh"
#include "emulated/attention/dense_fwd_api.cu"

using namespace harness;

template <typename T> void bwd_case(const Case &c, Report &r) {
  Problem<T> p(c, 4321);
  const Seqs &s = p.s;
  const int H = c.H, Hkv = c.Hkv, D = c.D;
  Tensor<T> O = p.like_q(), dQ = p.like_q(), dK = p.like_k(), dV = p.like_k();
  Lse lse(c, s), delta(c, s);

  // Reference: P (f64) per row, and the gradients. Delta uses the O the kernel is given
  // (as the kernel does), except in fwd+bwd cases, which are checked against the exact
  // gradients.
  std::vector<std::vector<double>> Prows(size_t(s.totq()) * H);
  std::vector<double> Oex(size_t(s.totq()) * H * D), Lex(size_t(s.totq()) * H);
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < c.nq[b]; ++i) {
        const size_t r = size_t(s.cq[b] + i) * H + h;
        std::vector<double> Or;
        ref_row(p, b, h, i, Prows[r], Or, Lex[r]);
        std::copy(Or.begin(), Or.end(), Oex.begin() + r * D);
      }
  if (c.fwd_then_bwd) {
    const int rc = run_fwd(p, O, lse);
    if (rc != 0) return r.fail(format("fk_attention_fwd returned %d", rc));
  } else {
    for (int b = 0; b < s.B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < c.nq[b]; ++i) {
          const size_t r = size_t(s.cq[b] + i) * H + h;
          lse.at(b, h, i) = float(Lex[r]);
          for (int d = 0; d < D; ++d) O.at(b, i, h, d) = to_e<T>(float(Oex[r * D + d]));
        }
  }
  std::vector<double> rdQ(size_t(s.totq()) * H * D, 0.0), rdK(size_t(s.totk()) * Hkv * D, 0.0),
      rdV(rdK.size(), 0.0), rdelta(size_t(s.totq()) * H, 0.0);
  std::vector<char> q_seen(size_t(s.totq()) * H, 0), k_seen(size_t(s.totk()) * Hkv, 0);
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < H; ++h) {
      const int hk = p.kv_head(h);
      for (int i = 0; i < c.nq[b]; ++i) {
        const size_t r = size_t(s.cq[b] + i) * H + h;
        const std::vector<double> &P = Prows[r];
        double Delta = 0, Dk = 0;
        for (int d = 0; d < D; ++d) {
          Dk += double(O.get(b, i, h, d)) * p.dO.get(b, i, h, d);
          Delta += (c.fwd_then_bwd ? Oex[r * D + d] : O.get(b, i, h, d)) * p.dO.get(b, i, h, d);
        }
        rdelta[r] = Dk;
        for (int j = 0; j < c.nk[b]; ++j) {
          if (P[j] == 0.0) continue;
          const size_t rk = size_t(s.ck[b] + j) * Hkv + hk;
          q_seen[r] = k_seen[rk] = 1;
          double dP = 0;
          for (int d = 0; d < D; ++d) dP += double(p.dO.get(b, i, h, d)) * p.V.get(b, j, hk, d);
          const double dS = P[j] * (dP - Delta);
          for (int d = 0; d < D; ++d) {
            rdQ[r * D + d] += p.scale * dS * p.K.get(b, j, hk, d);
            rdK[rk * D + d] += p.scale * dS * p.Q.get(b, i, h, d);
            rdV[rk * D + d] += P[j] * p.dO.get(b, i, h, d);
          }
        }
      }
    }

  const emu::DeviceArray<int32_t> cuq(s.cq), cuk(s.ck);
  fk_attention_bwd_params q{};
  q.base.q = p.Q.data.data(), q.base.k = p.K.data.data(), q.base.v = p.V.data.data(), q.o = O.data.data();
  q.dout = p.dO.data.data(), q.lse = lse.data.data(), q.delta = delta.data.data();
  q.dq = dQ.data.data(), q.dk = dK.data.data(), q.dv = dV.data.data();
  set_common(q, p, lse, cuq, cuk);
  q.base.o_stride.batch = O.bs, q.base.o_stride.row = O.rs, q.base.o_stride.head = O.hs;
  q.do_stride.batch = p.dO.bs, q.do_stride.row = p.dO.rs, q.do_stride.head = p.dO.hs;
  q.dq_stride.batch = dQ.bs, q.dq_stride.row = dQ.rs, q.dq_stride.head = dQ.hs;
  q.dk_stride.batch = dK.bs, q.dk_stride.row = dK.rs, q.dk_stride.head = dK.hs;
  q.dv_stride.batch = dV.bs, q.dv_stride.row = dV.rs, q.dv_stride.head = dV.hs;
  q.total_q = s.cq.back(), q.total_k = s.ck.back();
  const long sw0 = emu::g_switches;
  const int launches0 = fk::g_emu_launches;
  const int rc = fk_attention_bwd(&q, nullptr);
  if (rc != 0) return r.fail(format("fk_attention_bwd returned %d", rc));
  r.info(format("%d launch(es), %ld fiber switches", fk::g_emu_launches - launches0,
                emu::g_switches - sw0));

  auto check = [&](const char *what, const Tensor<T> &t, const std::vector<double> &ref,
                   const std::vector<char> &seen, const std::vector<int> &cu,
                   const std::vector<int> &n) {
    Stats st;
    for (size_t b = 0; b < n.size(); ++b)
      for (int i = 0; i < n[b]; ++i)
        for (int h = 0; h < t.heads; ++h) {
          const size_t r = size_t(cu[b] + i) * t.heads + h;
          for (int d = 0; d < D; ++d) {
            const float kv = t.get(int(b), i, h, d);
            if (!seen[r] && kv != 0.f) ++st.not_zero;
            st.add(kv, ref[r * D + d]);
          }
        }
    st.pad_touched = count_pad_touched(t, n);
    // Gradients are sums of many terms: scale the max-error bound by their magnitude.
    double ref_max = 0;
    for (double x : ref) ref_max = std::max(ref_max, std::abs(x));
    const double bf = c.dtype == FK_DTYPE_BF16;
    r.check(what, st, bf ? 1.5e-2 : 3e-3, (bf ? 4e-2 : 6e-3) * std::max(1.0, ref_max));
  };
  check("dQ", dQ, rdQ, q_seen, s.cq, c.nq);
  check("dK", dK, rdK, k_seen, s.ck, c.nk);
  check("dV", dV, rdV, k_seen, s.ck, c.nk);
  Stats sd;
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < c.nq[b]; ++i)
        sd.add(delta.at(b, h, i), rdelta[size_t(s.cq[b] + i) * H + h]);
  sd.pad_touched = count_pad_touched(delta, c.nq, H);
  r.check("Delta", sd, 1e-5, 1e-3);
}

// Launcher checks: what would be undefined behaviour on the device is refused.
int api_checks() {
  int bad = 0;
  fk_attention_bwd_params p{};
  alignas(16) int dummy[64];
  p.base.q = p.base.k = p.base.v = p.o = p.dout = dummy;
  p.lse = reinterpret_cast<float *>(dummy);
  p.dq = p.dk = p.dv = dummy;
  p.delta = reinterpret_cast<float *>(dummy);
  fk_attention_shape &ps = p.base.shape;
  ps.batch = 1, ps.heads = 2, ps.heads_kv = 1, ps.seqlen_q = 1, ps.seqlen_k = 1, ps.head_dim = 64;
  p.window_left = -1, p.window_right = -1, ps.dtype = FK_DTYPE_F16;
  auto expect = [&](const char *what, fk_attention_bwd_params q) {
    const int launches0 = fk::g_emu_launches;
    const int rc = fk_attention_bwd(&q, nullptr);
    if (rc != cudaErrorInvalidValue || fk::g_emu_launches != launches0) {
      printf("api %s: rc %d  <-- BAD\n", what, rc);
      ++bad;
    }
  };
  auto q = p; q.base.shape.heads = 3; q.base.shape.heads_kv = 2; expect("heads % heads_kv", q);
  q = p; q.base.shape.head_dim = 12; expect("head_dim 12", q);
  q = p; q.base.shape.head_dim = 264; expect("head_dim 264", q);
  q = p; q.base.shape.head_dim = 0; expect("head_dim 0", q);
  q = p; q.base.shape.batch = 0; expect("batch 0", q);
  q = p; q.base.shape.heads_kv = 0; expect("heads_kv 0", q);
  q = p; q.dq = nullptr; expect("null dq", q);
  q = p; q.delta = nullptr; expect("null delta", q);
  q = p; q.cu_seqlens_q = dummy; expect("cu_seqlens_q without cu_seqlens_k", q);
  q = p; q.window_left = -2; expect("window_left -2", q);
  q = p; q.base.shape.dtype = 7; expect("dtype 7", q);
  q = p; q.base.shape.seqlen_q = -1; expect("seqlen_q -1", q);
  if (fk_attention_bwd(nullptr, nullptr) != cudaErrorInvalidValue) {
    printf("api null params  <-- BAD\n");
    ++bad;
  }
  printf("api checks: %s\n", bad ? "FAILED" : "ok");
  return bad;
}

int main(int argc, char **argv) {
  const int F = FK_DTYPE_F16, BF = FK_DTYPE_BF16;
  const int kHuge = 1000000000;
  std::vector<Case> cases = {
      {"d64 f16 gqa2 nomask batch2", F, 2, 1, 64, {100, 100}, {100, 100}, false, -1, -1},
      {"d64 bf16 causal nq<nk", BF, 1, 1, 64, {70}, {130}, false, -1, 0},
      {"d64 f16 causal nq>nk", F, 2, 2, 64, {130}, {70}, false, -1, 0},
      {"d128 f16 window(20,5) nq>nk", F, 1, 1, 128, {150}, {90}, false, 20, 5},
      {"d40 f16 causal head-major", F, 1, 1, 40, {65}, {65}, false, -1, 0, true},
      {"d8 bf16 nomask", BF, 1, 1, 8, {33}, {47}, false, -1, -1},
      {"d136 bf16 gqa2 nomask", BF, 4, 2, 136, {40}, {40}, false, -1, -1},
      {"d256 f16 gqa2 window(10,-1)", F, 2, 1, 256, {70}, {80}, false, 10, -1},
      {"d256 bf16 causal", BF, 1, 1, 256, {50}, {50}, false, -1, 0},
      {"varlen d64 f16 gqa2 causal", F, 2, 1, 64, {0, 17, 80, 3}, {5, 0, 100, 1}, true, -1, 0},
      {"varlen d96 bf16 gqa2 window(7,3)", BF, 4, 2, 96, {1, 40, 90}, {70, 40, 33}, true, 7, 3},
      {"varlen d200 f16 nomask", F, 2, 2, 200, {20, 1, 45}, {33, 2, 1}, true, -1, -1},
      {"d128 f16 window(-1,1000)", F, 1, 1, 128, {100}, {100}, false, -1, 1000},
      {"d64 f16 window(3,2)", F, 1, 1, 64, {200}, {200}, false, 3, 2},
      {"d64 f16 window(0,0) nq<nk", F, 1, 1, 64, {100}, {140}, false, 0, 0},
      {"dense nq=0", F, 1, 1, 64, {0}, {50}, false, -1, -1},
      {"dense nk=0 gqa2 causal", BF, 2, 1, 128, {50}, {0}, false, -1, 0},
      {"d64 f16 causal nq>>nk", F, 1, 1, 64, {200}, {10}, false, -1, 0},
      {"d128 bf16 window(1e9,1e9)", BF, 1, 1, 128, {60}, {70}, false, kHuge, kHuge},
      {"d256 f16 gqa4 window(5,5)", F, 4, 1, 256, {45}, {45}, false, 5, 5},
  };
  // Forward kernel, then backward kernel, against the exact f64 gradients.
  const std::vector<Case> fwd_then_bwd = {
      {"d64 f16 gqa2 causal nq>nk", F, 4, 2, 64, {150}, {90}, false, -1, 0},
      {"d128 bf16 gqa4 window(16,5)", BF, 4, 1, 128, {130}, {140}, false, 16, 5},
      {"varlen d256 f16 gqa2 window(7,3)", F, 2, 1, 256, {0, 1, 45, 70}, {3, 1, 0, 66}, true, 7, 3},
      {"d40 bf16 nomask nq<nk", BF, 2, 2, 40, {40}, {150}, false, -1, -1},
      {"varlen d96 f16 gqa2 causal", F, 2, 1, 96, {1, 80, 0, 5}, {0, 100, 7, 1}, true, -1, 0},
      {"d200 bf16 window(1e9,1e9)", BF, 1, 1, 200, {50}, {60}, false, kHuge, kHuge},
  };
  for (Case c : fwd_then_bwd) {
    c.name = "fwd+bwd " + c.name;
    c.fwd_then_bwd = true;
    cases.push_back(c);
  }
  // Every case again on an emulated Hopper device ("sm90 ..."): every case with queries and
  // keys takes dense_bwd_sm90.cuh's dK / dV and dQ kernels (TMA + wgmma; 128-key blocks
  // with 64-query stages, 128-query blocks with 64-key stages; at D 256 64-key blocks with
  // split roles and 32-key stages); plus longer ones whose steps wrap the two stages'
  // phases.
  const std::vector<Case> sm90_extra = {
      {"d128 bf16 gqa2 causal batch2 nk=600", BF, 2, 1, 128, {300, 300}, {600, 600}, false, -1, 0},
      {"varlen d64 f16 window(50,20)", F, 1, 1, 64, {260, 3, 140}, {250, 130, 1}, true, 50, 20},
      {"d64 bf16 gqa4 nomask nq=300 nk=200", BF, 4, 1, 64, {300}, {200}, false, -1, -1},
      {"d256 bf16 gqa2 causal nq=150 nk=200", BF, 2, 1, 256, {150}, {200}, false, -1, 0},
  };
  std::vector<Case> all = cases;
  for (const std::vector<Case> *list : {static_cast<const std::vector<Case> *>(&cases), &sm90_extra})
    for (Case c : *list) {
      c.name = "sm90 " + c.name;
      all.push_back(c);
    }
  int bad = argc > 1 ? 0 : api_checks();
  bad += run_cases(all, argc, argv, [](const Case &c, Report &r) {
    const bool sm90 = c.name.rfind("sm90 ", 0) == 0;
    const int n = fk::sm90_launches_of(sm90, [&] {
      c.dtype == FK_DTYPE_F16 ? bwd_case<__half>(c, r) : bwd_case<__nv_bfloat16>(c, r);
    });
    // Which dQ kernel ran: the Hopper one exactly where it applies (the forward of a
    // fwd+bwd case runs on Hopper too where it can).
    int total_q = 0, total_k = 0;
    for (size_t b = 0; b < c.nq.size(); ++b) total_q += c.nq[b], total_k += c.nk[b];
    const bool any = sm90 && total_q > 0 && total_k > 0;
    const int want_n = any ? int(c.fwd_then_bwd) + 2 : 0; // (forward,) dK/dV, dQ
    if (n != want_n) r.fail(format("sm90 kernel launches %d, want %d", n, want_n));
  });
  printf(bad ? "backward: %d FAILED\n" : "backward: all passed\n", bad);
  return bad != 0;
}
