// Negative controls of the emulator's checks: each mode runs one kernel with one planted bug
// and MUST fail, with the message scripts/emulate_kernels.sh looks for. A check that stops
// catching its bug makes its control pass, which the script reports as a failure. Mode
// `selftest` must pass: it checks the emulator's own machinery (schedules, fast math).
// Usage: controls MODE (built in the ASan and in the race flavour; see emulate_kernels.sh).
#include "harness.h"

#include "emulated/attention/dense_fwd_sm80.cuh"
#include "emulated/attention/dense_fwd_sm90.cuh"
#include "emulated/attention/dense_fwd_api.cu"
#include "emulated/common/sm90.cuh"
#include "emulated/common/tma_host.cuh"

using namespace harness;

namespace fk {
// Writes the byte just past the launch's dynamic shared memory (1024 bytes).
__global__ void neg_smem_overwrite() {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  if (threadIdx.x == 0) smem_raw[1024] = 1;
}
// A 16-byte vector load from an address 8 bytes off 16-byte alignment (a GPU faults).
__global__ void neg_misaligned_uint4(const unsigned char *p, uint4 *out) {
  if (threadIdx.x == 0) *out = *reinterpret_cast<const uint4 *>(p + 8);
}
// Writes one element past the end of a global array.
__global__ void neg_global_overwrite(float *p, int n) {
  if (threadIdx.x == 0) p[n] = 1.f;
}
// Warp 0 writes shared memory, warp 1 reads it with no __syncthreads between.
__global__ void neg_missing_syncthreads(float *out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float *s = reinterpret_cast<float *>(smem_raw);
  if (threadIdx.x < 32) s[threadIdx.x] = float(threadIdx.x);
  if (threadIdx.x >= 32) out[threadIdx.x - 32] = s[threadIdx.x - 32];
}
// Every warp reads a buffer, then warp 0 refills it with no __syncthreads between (the
// end-of-loop barrier of a double-buffered loop, removed).
__global__ void neg_refill_while_read(const __half *g, float *out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __half *s = reinterpret_cast<__half *>(smem_raw);
  if (threadIdx.x < 32) cp_async_16(smem_addr(s + 8 * threadIdx.x), g + 8 * threadIdx.x, 16);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = __half2float(s[(threadIdx.x * 8 + 3) % 256]);
  if (threadIdx.x < 32) cp_async_16(smem_addr(s + 8 * threadIdx.x), g + 256 + 8 * threadIdx.x, 16);
  cp_async_commit();
  cp_async_wait<0>();
}
// Lane 0 writes shared memory, lane 1 of the same warp reads it with no __syncwarp.
__global__ void neg_missing_syncwarp(float *out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float *s = reinterpret_cast<float *>(smem_raw);
  if (threadIdx.x == 0) s[0] = 1.f;
  if (threadIdx.x == 1) out[0] = s[0];
}
// Reads a cp.async destination with no cp.async.wait_group before it.
__global__ void neg_missing_cp_async_wait(const __half *g, float *out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __half *s = reinterpret_cast<__half *>(smem_raw);
  cp_async_16(smem_addr(s + 8 * threadIdx.x), g + 8 * threadIdx.x, 16);
  cp_async_commit();
  out[threadIdx.x] = __half2float(s[8 * threadIdx.x]);
  cp_async_wait<0>();
}
// Three warpgroups as the Hopper kernels split them: the producer frees registers
// (setmaxnreg.dec to 24 a thread), the two consumers take kConsumer each (.inc). 240 fits the
// 64K register file (24 + 2 x 240 warpgroups of 128 threads: 64512); 248 cannot, and a GPU
// hangs in the .inc.
template <int kConsumer> __global__ void setmaxnreg_split(float *out) {
  if (threadIdx.x / 128 == 2) {
    sm90::warpgroup_reg_dealloc<24>();
    return;
  }
  sm90::warpgroup_reg_alloc<kConsumer>();
  out[threadIdx.x] = 1.f;
}
// One warpgroup on Hopper's path: A and B (64 x 64 each, f16) by TMA with the 128-byte
// swizzle into shared memory, completing on one mbarrier, then D = A Bᵀ by four wgmma
// m64n64k16 from shared-memory descriptors; out is D row-major. bug 1: no wait on the
// barrier; 2: an accumulator written while the wgmma is in flight; 3: a wait on a phase
// that never completes.
__global__ void sm90_gemm_64(const __grid_constant__ CUtensorMap ma,
                             const __grid_constant__ CUtensorMap mb, float *out, int bug) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char *base = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  unsigned char *sa = base, *sb = base + 8192;
  uint64_t *bar = reinterpret_cast<uint64_t *>(base + 16384);
  if (threadIdx.x == 0) {
    sm90::mbarrier_init(bar, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm90::mbarrier_arrive_expect_tx(bar, 16384);
    sm90::tma_load_2d(sa, &ma, bar, 0, 0);
    sm90::tma_load_2d(sb, &mb, bar, 0, 0);
  }
  if (bug != 1) sm90::mbarrier_wait(bar, 0);
  if (bug == 3) sm90::mbarrier_wait(bar, 1);
  float d[32];
  for (float &x : d) x = 0.f;
  sm90::wgmma_fence();
  for (int ks = 0; ks < 4; ++ks)
    sm90::wgmma_ss<__half, 64>(d, sm90::advance_smem_desc(sm90::make_smem_desc_sw128(sa), 32 * ks),
                               sm90::advance_smem_desc(sm90::make_smem_desc_sw128(sb), 32 * ks),
                               1);
  sm90::wgmma_commit();
  if (bug == 2) d[5] = 1.f;
  sm90::wgmma_wait<0>();
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < 32; ++i)
    out[(16 * w + g + 8 * ((i % 4) / 2)) * 64 + 8 * (i / 4) + 2 * q + i % 2] = d[i];
}
// One warpgroup: D = A V with A (64 x 64) from registers (mma.sync A fragments read from
// global memory) and V (64 x 64, row-major: MN-major for the product) by TMA, as the
// attention's O += P V runs on Hopper.
__global__ void sm90_gemm_rs_64(const __half *a, const __grid_constant__ CUtensorMap mv,
                                float *out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char *sv = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  uint64_t *bar = reinterpret_cast<uint64_t *>(sv + 8192);
  if (threadIdx.x == 0) {
    sm90::mbarrier_init(bar, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm90::mbarrier_arrive_expect_tx(bar, 8192);
    sm90::tma_load_2d(sv, &mv, bar, 0, 0);
  }
  sm90::mbarrier_wait(bar, 0);
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  float d[32];
  for (float &x : d) x = 0.f;
  sm90::wgmma_fence();
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t af[4];
    for (int i = 0; i < 4; ++i) {
      const int row = 16 * w + g + 8 * (i & 1), col = 16 * ks + 2 * q + 8 * (i >> 1);
      const __half2 h2 = __halves2half2(a[row * 64 + col], a[row * 64 + col + 1]);
      af[i] = *reinterpret_cast<const uint32_t *>(&h2);
    }
    sm90::wgmma_rs_tb<__half, 64>(d, af, sm90::make_smem_desc_sw128_mn(sv + 2048 * ks, 8192), 1);
  }
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < 32; ++i)
    out[(16 * w + g + 8 * ((i % 4) / 2)) * 64 + 8 * (i / 4) + 2 * q + i % 2] = d[i];
}
// Self-test: records the order in which warps pass two points, and fast-math results.
inline std::vector<int> g_order;
__global__ void selftest_order() {
  if (threadIdx.x % 32 == 0) g_order.push_back(int(threadIdx.x / 32));
  __syncwarp();
  if (threadIdx.x % 32 == 0) g_order.push_back(int(threadIdx.x / 32));
  __syncthreads();
}
__global__ void selftest_ftz(float *out, float x) {
  if (threadIdx.x == 0) out[0] = x * 0.5f; // subnormal result: flushed to zero
}
} // namespace fk

// A varlen forward whose cu_seqlens_k claims one key row more than K and V hold: the
// kernel reads one row past the end of K (the bug class the review found).
static int global_overread() {
  const Case c{"overread", FK_DTYPE_F16, 1, 1, 64, {5, 7}, {9, 40}, true, -1, -1};
  Problem<__half> p(c, 1);
  Tensor<__half> O = p.like_q();
  Lse lse(c, p.s);
  std::vector<int> ck = p.s.ck;
  ck.back() += 1; // the last sequence is one key longer than the tensors
  const emu::DeviceArray<int32_t> cuq(p.s.cq), cuk(ck);
  fk_attention_fwd_params q{};
  q.base.q = p.Q.data.data(), q.base.k = p.K.data.data(), q.base.v = p.V.data.data();
  q.o = O.data.data(), q.lse = lse.data.data();
  set_common(q, p, lse, cuq, cuk);
  q.base.shape.seqlen_k = 41;
  q.base.o_stride.batch = O.bs, q.base.o_stride.row = O.rs, q.base.o_stride.head = O.hs;
  return fk_attention_fwd(&q, nullptr);
}

// sm90_gemm_64 on random A, B; with bug 0, the largest error against A Bᵀ in f64.
static double sm90_gemm_control(int bug) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  emu::DeviceArray<__half> a(64 * 64), b(64 * 64);
  for (size_t i = 0; i < a.size(); ++i) a[i] = __float2half(u(rng)), b[i] = __float2half(u(rng));
  emu::DeviceArray<float> out(64 * 64, NAN);
  CUtensorMap ma, mb;
  if (fk::encode_matrix_map_sw128(&ma, a.data(), 64, 64, 64, 64, false) != cudaSuccess ||
      fk::encode_matrix_map_sw128(&mb, b.data(), 64, 64, 64, 64, false) != cudaSuccess)
    return INFINITY;
  emu::launch(dim3(1), dim3(128), 16384 + 8 + 1024,
              [&] { fk::sm90_gemm_64(ma, mb, out.data(), bug); });
  double worst = 0;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c) {
      double want = 0;
      for (int k = 0; k < 64; ++k)
        want += double(__half2float(a[r * 64 + k])) * double(__half2float(b[c * 64 + k]));
      const double e = std::abs(double(out[r * 64 + c]) - want);
      worst = std::isnan(e) ? INFINITY : std::max(worst, e);
    }
  return worst;
}
// sm90_gemm_rs_64 on random A, V: the largest error against A V in f64.
static double sm90_gemm_rs_control() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  emu::DeviceArray<__half> a(64 * 64), v(64 * 64);
  for (size_t i = 0; i < a.size(); ++i) a[i] = __float2half(u(rng)), v[i] = __float2half(u(rng));
  emu::DeviceArray<float> out(64 * 64, NAN);
  CUtensorMap mv;
  if (fk::encode_matrix_map_sw128(&mv, v.data(), 64, 64, 64, 64, false) != cudaSuccess)
    return INFINITY;
  emu::launch(dim3(1), dim3(128), 8192 + 8 + 1024,
              [&] { fk::sm90_gemm_rs_64(a.data(), mv, out.data()); });
  double worst = 0;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c) {
      double want = 0;
      for (int k = 0; k < 64; ++k)
        want += double(__half2float(a[r * 64 + k])) * double(__half2float(v[k * 64 + c]));
      const double e = std::abs(double(out[r * 64 + c]) - want);
      worst = std::isnan(e) ? INFINITY : std::max(worst, e);
    }
  return worst;
}
static int selftest() {
  int bad = 0;
  auto expect = [&](const char *what, bool ok) {
    printf("selftest %s: %s\n", what, ok ? "ok" : "FAILED");
    bad += !ok;
  };
  // runahead: warp 0 passes both points before warp 1 starts; inorder: lockstep.
  auto order = [&](const char *sched) {
    emu::set_schedule(sched);
    fk::g_order.clear();
    emu::launch(dim3(1), dim3(64), 0, [] { fk::selftest_order(); });
    return fk::g_order;
  };
  expect("inorder runs warps in lockstep", order("inorder") == std::vector<int>{0, 1, 0, 1});
  expect("runahead runs warp 0 ahead", order("runahead") == std::vector<int>{0, 0, 1, 1});
  expect("runahead-last runs the last warp ahead",
         order("runahead-last") == std::vector<int>{1, 1, 0, 0});
  expect("reverse runs the last warp first", order("reverse") == std::vector<int>{1, 1, 0, 0});
  bool varied = false;
  for (int seed = 0; seed < 8; ++seed) {
    const std::string s = "random:" + std::to_string(seed);
    varied |= order(s.c_str()) != order("inorder");
  }
  expect("random schedules vary", varied);
  emu::set_schedule("inorder");
  // Flush to zero inside kernels (not on the host).
  emu::DeviceArray<float> out(1, 1.f);
  const float tiny = 1.5e-38f; // normal; half of it is subnormal
  emu::launch(dim3(1), dim3(32), 0, [&] { fk::selftest_ftz(out.data(), tiny); });
  volatile float host_half = tiny * 0.5f;
  expect("f32 results flush to zero in kernels", out[0] == 0.f && host_half != 0.f);
  // ex2.approx: within 2 ulp, and not always the correctly rounded value.
  int differ = 0;
  double worst = 0;
  for (int i = 0; i < 20000; ++i) {
    const float x = -30.f + 60.f * float(i) / 20000.f;
    const double exact = std::exp2(double(x));
    const float got = exp2f(x); // the emulator's model (macro)
    const double ulp = std::nextafter(float(exact), INFINITY) - float(exact);
    worst = std::max(worst, std::abs(got - exact) / ulp);
    differ += got != float(exact);
  }
  printf("selftest exp2f: %d of 20000 differ from correctly rounded, worst %.2f ulp\n", differ,
         worst);
  expect("exp2f model within 2.5 ulp and perturbed", worst <= 2.5 && differ > 10000);
  expect("exp2f of a subnormal input is 1", exp2f(1e-40f) == 1.f);
  expect("exp2f flushes subnormal results", exp2f(-130.f) == 0.f);
  double worst_log = 0;
  for (int i = 1; i < 20000; ++i) {
    const float x = 0.5f + 1.5f * float(i) / 20000.f;
    worst_log = std::max(worst_log, std::abs(double(log2f(x)) - std::log2(double(x))));
  }
  expect("log2f model within 2^-22 absolute on [0.5, 2]", worst_log <= std::ldexp(1.0, -22) * 1.01);
  // Hopper: TMA (128-byte swizzle) + mbarrier + wgmma from descriptors give A Bᵀ.
  const double sm90_err = sm90_gemm_control(0);
  printf("selftest sm90 TMA + wgmma 64x64x64: max error %.3g\n", sm90_err);
  expect("sm90 TMA + wgmma product", sm90_err < 1e-4);
  const double rs_err = sm90_gemm_rs_control();
  printf("selftest sm90 wgmma, A in registers, B MN-major: max error %.3g\n", rs_err);
  expect("sm90 wgmma A-registers x MN-major B product", rs_err < 1e-4);
  emu::DeviceArray<float> regs_out(256, 0.f);
  emu::launch(dim3(1), dim3(384), 0, [&] { fk::setmaxnreg_split<240>(regs_out.data()); });
  bool all = true;
  for (int i = 0; i < 256; ++i) all = all && regs_out.data()[i] == 1.f;
  expect("setmaxnreg 24 + 2 x 240 fits the register file", all);
  return bad;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: controls MODE\n");
    return 2;
  }
  const std::string mode = argv[1];
  emu::DeviceArray<float> out(64, 0.f);
  emu::DeviceArray<__half> g(512, __float2half(1.f));
  emu::DeviceArray<unsigned char> bytes(64, 0);
  emu::DeviceArray<uint4> vec(1);
  if (mode == "global-overread") {
    global_overread();
  } else if (mode == "global-overwrite") {
    emu::launch(dim3(1), dim3(32), 0, [&] { fk::neg_global_overwrite(out.data(), 64); });
  } else if (mode == "smem-overwrite") {
    emu::launch(dim3(1), dim3(32), 1024, [] { fk::neg_smem_overwrite(); });
  } else if (mode == "misaligned-uint4") {
    emu::launch(dim3(1), dim3(32), 0, [&] { fk::neg_misaligned_uint4(bytes.data(), vec.data()); });
  } else if (mode == "missing-syncthreads") {
    emu::launch(dim3(1), dim3(64), 1024, [&] { fk::neg_missing_syncthreads(out.data()); });
  } else if (mode == "refill-while-read") {
    emu::launch(dim3(1), dim3(64), 1024, [&] { fk::neg_refill_while_read(g.data(), out.data()); });
  } else if (mode == "missing-syncwarp") {
    emu::launch(dim3(1), dim3(32), 1024, [&] { fk::neg_missing_syncwarp(out.data()); });
  } else if (mode == "missing-cp-async-wait") {
    emu::launch(dim3(1), dim3(32), 1024,
                [&] { fk::neg_missing_cp_async_wait(g.data(), out.data()); });
  } else if (mode == "wgmma-before-tma-lands") {
    sm90_gemm_control(1);
  } else if (mode == "wgmma-accumulator-in-flight") {
    sm90_gemm_control(2);
  } else if (mode == "mbarrier-phase-never-completes") {
    sm90_gemm_control(3);
  } else if (mode == "setmaxnreg-over-register-file") {
    emu::DeviceArray<float> regs_out(256, 0.f);
    emu::launch(dim3(1), dim3(384), 0, [&] { fk::setmaxnreg_split<248>(regs_out.data()); });
  } else if (mode == "selftest") {
    const int bad = selftest();
    printf(bad ? "selftest: %d FAILED\n" : "selftest: all passed\n", bad);
    return bad != 0;
  } else {
    fprintf(stderr, "controls: unknown mode %s\n", mode.c_str());
    return 2;
  }
  printf("control %s: no error was detected\n", mode.c_str());
  return 0;
}
