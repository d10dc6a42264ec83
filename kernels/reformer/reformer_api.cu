// C entries of Reformer's LSH attention forward and backward: refuse what would be undefined on the
// device (fk_reformer.h lists it), then dispatch the dtype and launch on the caller's device and
// stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/launch.cuh"
#include "reformer.h"

namespace {

constexpr int64_t kMaxGrid = 65535; // grid y, z
constexpr int64_t kMaxRows = (int64_t(1) << 31) - 1; // n_hashes * seqlen (int32 positions)
constexpr int kMaxHeadDim = 128; // attn's shared memory (fits 99 KB)
constexpr int kMaxBuckets = 8192; // the sort's counters in shared memory
constexpr int kMaxLook = 65535; // chunks_before, chunks_after

// The sizes and options both directions share (fk_reformer.h's refusals).
template <class Params> bool shape_ok(const Params &p) {
  if (p.batch < 1 || p.seqlen < 1 || p.heads < 1 || p.n_hashes < 1 || p.chunk_length < 1)
    return false;
  if (p.head_dim < 1 || p.head_dim > kMaxHeadDim) return false;
  if (p.n_buckets < 2 || p.n_buckets > kMaxBuckets || p.n_buckets % 2 != 0) return false;
  if (p.chunks_before < 0 || p.chunks_before > kMaxLook || p.chunks_after < 0 ||
      p.chunks_after > kMaxLook)
    return false;
  if (p.causal != 0 && p.causal != 1) return false;
  if (p.dtype != FK_DTYPE_F16 && p.dtype != FK_DTYPE_BF16) return false;
  if (p.batch > kMaxGrid || p.heads > kMaxGrid) return false;
  return int64_t(p.n_hashes) * p.seqlen <= kMaxRows;
}

bool fwd_args_ok(const fk_reformer_fwd_params &p) {
  if (p.qk == nullptr || p.v == nullptr || p.out == nullptr || p.lse == nullptr) return false;
  if (!shape_ok(p)) return false;
  if (fk::reformer::hashed(p)) {
    if (p.seqlen % p.chunk_length != 0) return false;
    if (p.given_buckets == nullptr && (p.rotations == nullptr || p.buckets == nullptr))
      return false;
  } else if (p.given_buckets != nullptr) {
    return false;
  }
  return true;
}

bool bwd_args_ok(const fk_reformer_bwd_params &p) {
  if (p.qk == nullptr || p.v == nullptr || p.out == nullptr || p.dout == nullptr ||
      p.lse == nullptr || p.dqk == nullptr || p.dv == nullptr)
    return false;
  if (!shape_ok(p)) return false;
  if (fk::reformer::hashed(p)) {
    if (p.seqlen % p.chunk_length != 0 || p.buckets == nullptr) return false;
  } else if (p.buckets != nullptr) {
    return false;
  }
  return true;
}

} // namespace

extern "C" int64_t fk_reformer_bwd_workspace_bytes(const fk_reformer_bwd_params *p) {
  return p != nullptr && bwd_args_ok(*p) ? fk::reformer::BwdWorkspace(*p).bytes : 0;
}

extern "C" int32_t fk_reformer_bwd(const fk_reformer_bwd_params *p, void *stream) {
  if (p == nullptr || !bwd_args_ok(*p)) return cudaErrorInvalidValue;
  if (p->workspace == nullptr || reinterpret_cast<uintptr_t>(p->workspace) % 256 != 0)
    return cudaErrorInvalidValue;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->dtype == FK_DTYPE_F16 ? fk::reformer::bwd<__half>(*p, s)
                                  : fk::reformer::bwd<__nv_bfloat16>(*p, s);
}

extern "C" int64_t fk_reformer_fwd_workspace_bytes(const fk_reformer_fwd_params *p) {
  return p != nullptr && fwd_args_ok(*p) ? fk::reformer::FwdWorkspace(*p).bytes : 0;
}

extern "C" int32_t fk_reformer_fwd(const fk_reformer_fwd_params *p, void *stream) {
  if (p == nullptr || !fwd_args_ok(*p)) return cudaErrorInvalidValue;
  if (fk::reformer::FwdWorkspace(*p).bytes > 0 &&
      (p->workspace == nullptr || reinterpret_cast<uintptr_t>(p->workspace) % 256 != 0))
    return cudaErrorInvalidValue;
  fk::DeviceGuard guard(p->device);
  if (guard.status() != cudaSuccess) return guard.status();
  const auto s = static_cast<cudaStream_t>(stream);
  return p->dtype == FK_DTYPE_F16 ? fk::reformer::fwd<__half>(*p, s)
                                  : fk::reformer::fwd<__nv_bfloat16>(*p, s);
}
