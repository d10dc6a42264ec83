// Forward suite: fk_attention_fwd (kernels/attention/dense_fwd_*) on the emulator against
// the f64 reference, on an sm_80-class and on a Hopper device (the sm_90a kernel). Every case checks, per valid element, O and LSE against the
// reference; rows that see no key must give O = 0 and LSE = -inf exactly; every element of
// O and LSE outside the sequences must stay untouched (NaN), and the NaN padding of the
// inputs must never reach the results.
// Usage: fwd_test [case index...] (all cases by default).
#include "harness.h"

#include "emulated/attention/dense_fwd_sm80.cuh"
#include "emulated/attention/dense_fwd_sm90.cuh"
#include "emulated/attention/dense_fwd_api.cu"

using namespace harness;

template <typename T> void fwd_case(const Case &c, Report &r) {
  Problem<T> p(c, 1234);
  Tensor<T> O = p.like_q();
  Lse lse(c, p.s);
  const long sw0 = emu::g_switches;
  const int launches0 = fk::g_emu_launches;
  const int rc = run_fwd(p, O, lse);
  if (rc != 0) return r.fail(format("fk_attention_fwd returned %d", rc));
  Stats so, sl;
  long empty_rows = 0;
  std::vector<double> P, Or;
  for (int b = 0; b < p.s.B; ++b)
    for (int h = 0; h < c.H; ++h)
      for (int i = 0; i < c.nq[b]; ++i) {
        double L;
        ref_row(p, b, h, i, P, Or, L);
        const float kl = lse.at(b, h, i);
        if (L == -INFINITY) {
          ++empty_rows;
          for (int d = 0; d < c.D; ++d) so.not_zero += O.get(b, i, h, d) != 0.f;
          sl.not_zero += kl != -INFINITY;
          continue;
        }
        for (int d = 0; d < c.D; ++d) so.add(O.get(b, i, h, d), Or[d]);
        sl.add(kl, L);
      }
  so.pad_touched = count_pad_touched(O, c.nq);
  sl.pad_touched = count_pad_touched(lse, c.nq, c.H);
  r.info(format("%d launch(es), %ld fiber switches, %ld rows without keys",
                fk::g_emu_launches - launches0, emu::g_switches - sw0, empty_rows));
  r.check("O", so, rel_tol(c.dtype), abs_tol(c.dtype));
  r.check("LSE", sl, 1e-5, 1e-4);
}

// Launcher checks: what would be undefined behaviour on the device is refused.
int api_checks() {
  int bad = 0;
  fk_attention_fwd_params p{};
  alignas(16) int dummy[64];
  p.base.q = p.base.k = p.base.v = p.o = dummy;
  p.lse = reinterpret_cast<float *>(dummy);
  fk_attention_shape &ps = p.base.shape;
  ps.batch = 1, ps.heads = 2, ps.heads_kv = 1, ps.seqlen_q = 1, ps.seqlen_k = 1, ps.head_dim = 64;
  p.window_left = -1, p.window_right = -1, ps.dtype = FK_DTYPE_F16;
  auto expect = [&](const char *what, fk_attention_fwd_params q) {
    const int launches0 = fk::g_emu_launches;
    const int rc = fk_attention_fwd(&q, nullptr);
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
  q = p; q.o = nullptr; expect("null o", q);
  q = p; q.lse = nullptr; expect("null lse", q);
  q = p; q.cu_seqlens_q = dummy; expect("cu_seqlens_q without cu_seqlens_k", q);
  q = p; q.base.shape.dtype = 7; expect("dtype 7", q);
  q = p; q.base.shape.seqlen_k = -1; expect("seqlen_k -1", q);
  if (fk_attention_fwd(nullptr, nullptr) != cudaErrorInvalidValue) {
    printf("api null params  <-- BAD\n");
    ++bad;
  }
  for (int hd = 8; hd <= 256; hd += 8)
    if (!fk_attention_supports_head_dim(hd)) {
      printf("api supports_head_dim(%d) = 0  <-- BAD\n", hd);
      ++bad;
    }
  printf("api checks: %s\n", bad ? "FAILED" : "ok");
  return bad;
}

int main(int argc, char **argv) {
  const int F = FK_DTYPE_F16, BF = FK_DTYPE_BF16;
  const int kHuge = 1000000000, kMax = 2147483647; // Rust clamps windows to i32::MAX
  // Tiles: D<=64 128x64 (2 m-tiles per warp), D<=128 128x64, D<=256 64x32 (Q in smem).
  // Lengths are chosen to leave partial tiles, and band edges to start at odd key blocks.
  const std::vector<Case> cases = {
      // Head dims (padded to 64 / 128 / 256), dtypes, GQA groups 1, 2, 4, 8, layouts.
      {"d8 f16 nomask", F, 2, 2, 8, {70}, {100}, false, -1, -1},
      {"d40 bf16 gqa2 nomask", BF, 4, 2, 40, {130}, {77}, false, -1, -1},
      {"d64 f16 gqa8 nomask head-major", F, 8, 1, 64, {150}, {200}, false, -1, -1, true},
      {"d72 bf16 gqa4 nomask", BF, 4, 1, 72, {100}, {129}, false, -1, -1},
      {"d96 f16 gqa2 nomask batch2", F, 2, 1, 96, {129, 129}, {65, 65}, false, -1, -1},
      {"d128 bf16 nomask", BF, 1, 1, 128, {200}, {190}, false, -1, -1},
      {"d136 f16 gqa4 nomask", F, 4, 1, 136, {70}, {97}, false, -1, -1},
      {"d200 bf16 gqa2 nomask", BF, 2, 1, 200, {65}, {100}, false, -1, -1},
      {"d256 f16 gqa2 nomask", F, 2, 1, 256, {130}, {70}, false, -1, -1},
      {"d256 bf16 nomask head-major", BF, 1, 1, 256, {33}, {150}, false, -1, -1, true},
      // Causal (window_right = 0), bottom-right aligned.
      {"d64 bf16 causal nq<nk", BF, 1, 1, 64, {100}, {300}, false, -1, 0},
      {"d64 f16 causal nq>nk (empty rows)", F, 2, 1, 64, {300}, {100}, false, -1, 0},
      {"d128 f16 gqa2 causal", F, 2, 1, 128, {260}, {260}, false, -1, 0},
      {"d256 bf16 causal nq>nk (empty rows)", BF, 1, 1, 256, {150}, {70}, false, -1, 0},
      {"d40 f16 causal nq=5 nk=300", F, 1, 1, 40, {5}, {300}, false, -1, 0},
      // Sliding windows, and windows combined with causal.
      {"d64 f16 window(0,0)", F, 1, 1, 64, {200}, {200}, false, 0, 0},
      {"d128 bf16 window(0,0) nq<nk", BF, 1, 1, 128, {150}, {220}, false, 0, 0},
      {"d64 f16 window(3,0)", F, 1, 1, 64, {300}, {300}, false, 3, 0},
      {"d128 f16 window(16,5) nq>nk (empty rows)", F, 1, 1, 128, {300}, {260}, false, 16, 5},
      {"d256 bf16 window(16,5)", BF, 1, 1, 256, {200}, {200}, false, 16, 5},
      {"d96 bf16 window(-1,7)", BF, 1, 1, 96, {140}, {180}, false, -1, 7},
      {"d64 f16 window(100,-1)", F, 1, 1, 64, {350}, {330}, false, 100, -1},
      {"d256 f16 gqa2 window(100,-1) nq<nk", F, 2, 1, 256, {120}, {260}, false, 100, -1},
      {"d128 f16 window(1e9,1e9)", F, 1, 1, 128, {100}, {150}, false, kHuge, kHuge},
      {"d64 bf16 window(INT_MAX,INT_MAX)", BF, 1, 1, 64, {90}, {140}, false, kMax, kMax},
      {"d64 bf16 window(16,0) nq>nk", BF, 2, 2, 64, {260}, {200}, false, 16, 0},
      {"d136 bf16 window(50,0) nq>nk", BF, 1, 1, 136, {200}, {120}, false, 50, 0},
      {"d200 f16 window(1e9,0)", F, 1, 1, 200, {100}, {100}, false, kHuge, 0},
      // Band edges at every offset from -2 to 2 around a key-block boundary (block starts
      // and m0 are multiples of 32 and 64; 192 is too): catches off-by-ones in the block
      // range and in which blocks skip per-element masking. The window is wider than
      // BM + BN so that some blocks need no masking at all.
      {"varlen d64 f16 window(192,0) band-edge sweep", F, 1, 1, 64, {256, 256, 256, 256, 256},
       {446, 447, 448, 449, 450}, true, 192, 0},
      {"varlen d256 bf16 window(192,0) band-edge sweep", BF, 1, 1, 256, {128, 128, 128, 128, 128},
       {318, 319, 320, 321, 322}, true, 192, 0},
      {"d64 f16 causal nk=nq+1", F, 1, 1, 64, {300}, {301}, false, -1, 0},
      {"d72 f16 window(0,1e9) nq<nk", F, 1, 1, 72, {60}, {140}, false, 0, kHuge},
      // Variable-length batches, with empty and one-row sequences on either side.
      {"varlen d64 f16 gqa2 causal", F, 2, 1, 64, {0, 17, 150, 1, 3}, {5, 0, 200, 1, 0}, true, -1,
       0},
      {"varlen d128 bf16 gqa4 window(7,3)", BF, 4, 1, 128, {1, 40, 130}, {70, 40, 33}, true, 7, 3},
      {"varlen d256 f16 nomask", F, 2, 2, 256, {20, 1, 0, 70}, {33, 2, 5, 1}, true, -1, -1},
      {"varlen d40 bf16 window(-1,7)", BF, 1, 1, 40, {129, 1, 64}, {1, 300, 65}, true, -1, 7},
      {"varlen d200 f16 causal", F, 2, 1, 200, {65, 0, 1}, {0, 1, 100}, true, -1, 0},
      {"varlen d96 bf16 window(100,-1)", BF, 2, 2, 96, {300, 2}, {290, 200}, true, 100, -1},
      {"varlen all queries empty", F, 2, 1, 64, {0, 0}, {3, 4}, true, -1, 0},
      // Degenerate dense batches.
      {"dense nq=0", F, 1, 1, 64, {0}, {50}, false, -1, -1},
      {"dense nk=0", BF, 2, 1, 64, {50}, {0}, false, -1, -1},
      {"dense nk=0 causal", F, 1, 1, 128, {70}, {0}, false, -1, 0},
      {"d8 f16 nq=1 nk=1 causal", F, 1, 1, 8, {1}, {1}, false, -1, 0},
  };
  // Every case again on an emulated Hopper device ("sm90 ..."): every batch with keys takes
  // the TMA + wgmma kernel (dense_fwd_sm90.cuh; 128 x 128 tiles, 128 x 64 at D 256, two K/V
  // stages: the key blocks below wrap the stages' phases; varlen tiles start mid-tensor and
  // their boxes run into the next sequence); plus a few longer ones for the pipeline.
  std::vector<Case> all = cases;
  const std::vector<Case> sm90_extra = {
      {"d128 bf16 gqa2 causal batch2 nk=700", BF, 2, 1, 128, {640, 640}, {700, 700}, false, -1, 0},
      {"d64 f16 window(200,30) nq=nk=900", F, 1, 1, 64, {900}, {900}, false, 200, 30},
      {"d128 f16 head-major nomask nk=1000", F, 2, 2, 128, {129}, {1000}, false, -1, -1, true},
      {"d256 bf16 gqa2 causal nk=500", BF, 2, 1, 256, {300}, {500}, false, -1, 0},
      {"varlen d128 bf16 causal long and short", BF, 2, 1, 128, {300, 5, 260}, {280, 9, 400},
       true, -1, 0},
      {"varlen d64 f16 window(40,10) empty keys", F, 1, 1, 64, {130, 70, 1}, {0, 200, 129}, true,
       40, 10},
  };
  for (const std::vector<Case> *list : {&cases, &sm90_extra})
    for (Case c : *list) {
      c.name = "sm90 " + c.name;
      all.push_back(c);
    }
  int bad = argc > 1 ? 0 : api_checks();
  bad += run_cases(all, argc, argv, [](const Case &c, Report &r) {
    const bool sm90 = c.name.rfind("sm90 ", 0) == 0;
    const int n = fk::sm90_launches_of(sm90, [&] {
      c.dtype == FK_DTYPE_F16 ? fwd_case<__half>(c, r) : fwd_case<__nv_bfloat16>(c, r);
    });
    // Which kernel ran: the Hopper one exactly where it applies.
    int total_q = 0, total_k = 0;
    for (size_t b = 0; b < c.nq.size(); ++b) total_q += c.nq[b], total_k += c.nk[b];
    const bool want = sm90 && total_q > 0 && total_k > 0;
    if ((n > 0) != want)
      r.fail(format("sm90 kernel launches %d, want %s", n, want ? "some" : "none"));
  });
  printf(bad ? "forward: %d FAILED\n" : "forward: all passed\n", bad);
  return bad != 0;
}
