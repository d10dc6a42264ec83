// Part of the CPU emulator (emu.h): global memory as the suites allocate it.
#pragma once
#include "emu_fiber.h"

namespace emu {

// ---------------------------------------------------------------------------------------
// Global memory as the suites allocate it for kernels: one allocation per tensor whose
// bounds are exactly its n elements, so that an access past the end is caught. ASan build:
// an exact heap allocation (its redzone starts right after the last element). Elsewhere:
// the end (rounded up to the alignment) touches a PROT_NONE page, so a read or write past it
// faults; the few bytes of rounding hold a canary, checked when the array is freed.
// Aligned like cudaMalloc'd memory as far as the kernels need (16 bytes by default: cp.async
// and uint4 accesses; 256 for workspaces that promise it).
template <typename T> class DeviceArray {
public:
  DeviceArray() { allocate(0, 16); }
  explicit DeviceArray(size_t n, const T &v = T(), size_t align = 16) { assign(n, v, align); }
  explicit DeviceArray(const std::vector<T> &v) {
    allocate(v.size(), 16);
    std::copy(v.begin(), v.end(), p_);
  }
  DeviceArray(const DeviceArray &o) {
    allocate(o.n_, o.align_);
    std::copy(o.begin(), o.end(), p_);
  }
  DeviceArray &operator=(const DeviceArray &o) {
    if (this != &o) {
      release();
      allocate(o.n_, o.align_);
      std::copy(o.begin(), o.end(), p_);
    }
    return *this;
  }
  DeviceArray(DeviceArray &&o) noexcept { swap(o); }
  DeviceArray &operator=(DeviceArray &&o) noexcept {
    swap(o);
    return *this;
  }
  ~DeviceArray() { release(); }
  void assign(size_t n, const T &v, size_t align = 16) {
    release();
    allocate(n, align);
    std::fill(p_, p_ + n, v);
  }
  T *data() { return p_; }
  const T *data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  T &operator[](size_t i) { return p_[i]; }
  const T &operator[](size_t i) const { return p_[i]; }
  T *begin() { return p_; }
  T *end() { return p_ + n_; }
  const T *begin() const { return p_; }
  const T *end() const { return p_ + n_; }

private:
  static constexpr unsigned char kCanary = 0xA5;
  void swap(DeviceArray &o) {
    std::swap(p_, o.p_), std::swap(n_, o.n_), std::swap(align_, o.align_);
    std::swap(base_, o.base_), std::swap(len_, o.len_);
  }
  void allocate(size_t n, size_t align) {
    n_ = n, align_ = align;
    const size_t bytes = n * sizeof(T);
#ifdef EMU_ASAN
    void *p = nullptr;
    if (posix_memalign(&p, std::max(align, sizeof(void *)), bytes)) abort();
    base_ = p;
    p_ = static_cast<T *>(p);
#else
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t used = (bytes + align - 1) / align * align;
    len_ = (used + page - 1) / page * page + page;
    base_ = mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) abort();
    unsigned char *guard = static_cast<unsigned char *>(base_) + len_ - page;
    if (mprotect(guard, page, PROT_NONE)) abort();
    p_ = reinterpret_cast<T *>(guard - used);
    memset(reinterpret_cast<unsigned char *>(p_) + bytes, kCanary, used - bytes);
#endif
  }
  void release() {
    if (!base_) return;
#ifdef EMU_ASAN
    free(base_);
#else
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const unsigned char *end = reinterpret_cast<const unsigned char *>(p_ + n_);
    for (const unsigned char *c = end; c < static_cast<unsigned char *>(base_) + len_ - page; ++c)
      if (*c != kCanary) {
        fprintf(stderr, "emu: a kernel wrote past the end of a %zu-element array (byte %td "
                        "after its end)\n", n_, c - end);
        abort();
      }
    munmap(base_, len_);
#endif
    base_ = nullptr, p_ = nullptr, n_ = 0;
  }
  T *p_ = nullptr;
  size_t n_ = 0, align_ = 16;
  void *base_ = nullptr;
  size_t len_ = 0;
};

} // namespace emu
