// Negative controls of the emulator's checks: each mode runs one kernel with one planted bug
// and MUST fail, with the message scripts/emulate_kernels.sh looks for. A check that stops
// catching its bug makes its control pass, which the script reports as a failure. Mode
// `selftest` must pass: it checks the emulator's own machinery (schedules, fast math).
// Usage: controls MODE (built in the ASan and in the race flavour; see emulate_kernels.sh).
#include "harness.h"

#include "emulated/attention/dense_fwd_sm80.cuh"
#include "emulated/attention/dense_fwd_api.cu"

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
