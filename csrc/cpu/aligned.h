// std::vector storage aligned to a cache line, for the kernels' scratch and weight buffers.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <vector>

namespace fastdw::cpu {

// operator new (and malloc's large, mmap-backed blocks) return 16-byte aligned memory; a 64-byte
// vector load at a multiple of 64 bytes into such a buffer spans two cache lines, every time. The
// NHWC kernels load their weights [taps][C] and the backward its band of conv rows that way.
// Aligning them, channels_last 8x144x56x56, 2 threads, op level, three alternating runs of each
// build (ms): training backward 3.29-3.32 -> 3.09-3.12 (one pair 3.10 / 3.08), eval backward
// 2.32-2.49 -> 2.28-2.29, eval forward 0.93-0.94 -> 0.88-0.90; 1x96x112x112 s2 unchanged.
constexpr std::size_t kCacheLine = 64;

template <typename T, std::size_t A = kCacheLine>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() noexcept = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U, A>&) noexcept {}
  template <typename U>
  struct rebind {
    using other = AlignedAllocator<U, A>;
  };
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(A))); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(A)); }
  friend bool operator==(const AlignedAllocator&, const AlignedAllocator&) noexcept { return true; }
};

template <typename T>
using AlignedVec = std::vector<T, AlignedAllocator<T>>;

// n elements, not initialised (a scratch the caller writes before reading), aligned as above.
template <typename T>
struct AlignedDelete {
  void operator()(T* p) const noexcept { ::operator delete(p, std::align_val_t(kCacheLine)); }
};
template <typename T>
using AlignedBuf = std::unique_ptr<T[], AlignedDelete<T>>;
template <typename T>
AlignedBuf<T> aligned_buf(std::size_t n) {
  return AlignedBuf<T>(static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine))));
}

}  // namespace fastdw::cpu
