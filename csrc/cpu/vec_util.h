// Vector helpers shared by every op's kernels (compiled per ISA: see csrc/cpu/isa.h).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastdw::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;
template <typename T>
using V = Vectorized<T>;

// Loads / stores of n <= VL elements; partial loads zero the lanes past n.
template <typename T>
inline V<T> load(const T* p, int64_t n) {
  return n == V<T>::size() ? V<T>::loadu(p) : V<T>::loadu(p, n);
}
template <typename T>
inline void store(const V<T>& v, T* p, int64_t n) {
  if (n == V<T>::size()) v.store(p); else v.store(p, n);
}

// Software prefetch (into every cache level) of the 64-byte lines covering [p, p + bytes).
inline void prefetch_lines(const void* p, int64_t bytes) {
  const auto end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a < end; a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
}

// Prefetches the 64-byte lines of [p, p + bytes) in `parts` pieces, piece i on step(i): spread
// over a loop of `parts` steps of other work, so that the loads overlap it. (One burst of a
// plane's lines stalls once the line-fill buffers are full: it cost as long as the loads it
// was meant to hide.) A null p prefetches nothing.
class SpreadPrefetch {
 public:
  SpreadPrefetch(const void* p, int64_t bytes, int64_t parts)
      : p_(static_cast<const char*>(p)), bytes_(bytes), chunk_((bytes / std::max<int64_t>(1, parts) + 64) & ~int64_t(63)) {}
  void step(int64_t i) const {
    if (p_ == nullptr) return;
    const int64_t o = i * chunk_;
    if (o < bytes_) prefetch_lines(p_ + o, std::min(chunk_, bytes_ - o));
  }

 private:
  const char* p_;
  int64_t bytes_, chunk_;
};

// A whole vector stored around the caches (non-temporal: the line is not read before it is
// written) if p is aligned to the vector size and the instruction set has such a store, else a
// plain store. A task that streams ends with stream_fence(), so its stores are ordered before
// the join of the parallel region.
template <typename T>
inline void stream_store(const V<T>& v, T* p) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V<T>) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, v);
    if constexpr (std::is_same_v<T, double>) return _mm512_stream_pd(p, v);
#else
    if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, v);
    if constexpr (std::is_same_v<T, double>) return _mm256_stream_pd(p, v);
#endif
  }
#endif
  v.store(p);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// One whole 16 x 16 float block, dst[j * ld_dst + i] = src[i * ld_src + j], in registers: 16 loads,
// four rounds of 16 shuffles (32-bit, 64-bit, 128-bit, 256-bit interleaves), 16 stores.
__attribute__((always_inline)) inline void transpose_16x16(const float* src, int64_t ld_src, float* dst,
                                                           int64_t ld_dst) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0x88);
      t[8 * i + k + 4] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0xdd);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld_dst, r[i]);
}
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < m, j < n (m, n <= any size): ATen's transpose_mxn,
// except that whole 16 x 16 float blocks under AVX-512 go through transpose_16x16. ATen's 16 x 16
// kernel takes runtime sizes, is not inlined and keeps its 16 vectors on the stack; it was a third
// of the kernel time of an NCHW training step at 1x384x14x14 (perf), where the small-plane path
// transposes x, the output, the output gradient and the input gradient.
template <typename T>
inline void transpose_tile(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int m, int n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const int m16 = m / 16 * 16, n16 = n / 16 * 16;
    for (int i = 0; i < m16; i += 16)
      for (int j = 0; j < n16; j += 16) transpose_16x16(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
    if (m16 > 0 && n16 < n)  // the last columns of the whole row blocks
      at::vec::transpose_mxn<T>(src + n16, ld_src, dst + n16 * ld_dst, ld_dst, m16, n - n16);
    if (m16 < m)  // the last rows, every column
      at::vec::transpose_mxn<T>(src + m16 * ld_src, ld_src, dst + m16, ld_dst, m - m16, n);
    return;
  }
#endif
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, m, n);
}

}  // namespace fastdw::cpu::CPU_CAPABILITY
