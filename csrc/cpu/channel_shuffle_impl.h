// Channel shuffle kernels, written once with at::vec::Vectorized and compiled per instruction set
// (csrc/cpu/isa/<isa>.cpp defines CPU_CAPABILITY and the -m flags). Pure data movement: one read
// and one write of every element.
//  * NCHW: every output plane is one vector copy of an input plane (channel j comes from
//    (j % g) * (C / g) + j / g).
//  * NHWC: every pixel's channel vector is transposed from [g][C/g] to [C/g][g]: g = 2 by vector
//    interleaves, g = 3..8 by loops with a compile-time g (vectorised by the compiler), C/g = 2 by
//    a deinterleave, other g by a scalar loop.
//  * interleave (concat + shuffle(2) of two tensors): as above, reading a and b through their
//    strides, so a channel slice of a bigger tensor (ShuffleNetV2's pass-through half) is read
//    in place, not copied first.
// Helpers live in namespace `shuffle` because every op's impl header shares one translation unit.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/channel_shuffle_kernel.h"

namespace fastdw::cpu::CPU_CAPABILITY::shuffle {

using at::vec::Vectorized;
template <typename T>
using V = Vectorized<T>;

// Elements per parallel task (a copy is cheap per element: bigger tasks than arithmetic kernels).
constexpr int64_t kChunk = 32768;
inline int64_t grain(int64_t per_task) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, per_task)); }

// d[0..n) = s[0..n): a vector loop, ~10% faster than memcpy for the 1-4 KB planes of these layers.
// 32-byte moves where AVX2 exists, the AVX-512 build included: planes start only 16-byte aligned
// (a 14x14 float plane is 784 bytes), so most 64-byte accesses would split a cache line; 32-byte
// ones measured 5-9% faster at 8x384x14x14 (NCHW shuffle, 2 threads; 1-2% at batch 1).
template <typename T>
inline void copy_n(const T* s, T* d, int64_t n) {
#if defined(__AVX2__)
  const char* src = reinterpret_cast<const char*>(s);
  char* dst = reinterpret_cast<char*>(d);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  int64_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 96), e);
  }
  for (; i + 32 <= bytes; i += 32)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  if (i < bytes) std::memcpy(dst + i, src + i, static_cast<size_t>(bytes - i));
#else
  constexpr int64_t VL = V<T>::size();
  int64_t i = 0;
  for (; i + 4 * VL <= n; i += 4 * VL) {
    const V<T> a = V<T>::loadu(s + i), b = V<T>::loadu(s + i + VL);
    const V<T> c = V<T>::loadu(s + i + 2 * VL), e = V<T>::loadu(s + i + 3 * VL);
    a.store(d + i);
    b.store(d + i + VL);
    c.store(d + i + 2 * VL);
    e.store(d + i + 3 * VL);
  }
  for (; i + VL <= n; i += VL) V<T>::loadu(s + i).store(d + i);
  for (; i < n; ++i) d[i] = s[i];
#endif
}

// o[2k] = a[k], o[2k + 1] = b[k] for k < n.
template <typename T>
inline void interleave_row(const T* a, const T* b, T* o, int64_t n) {
  constexpr int64_t VL = V<T>::size();
  int64_t k = 0;
  for (; k + VL <= n; k += VL) {
    auto [lo, hi] = at::vec::interleave2(V<T>::loadu(a + k), V<T>::loadu(b + k));
    lo.store(o + 2 * k);
    hi.store(o + 2 * k + VL);
  }
  for (; k < n; ++k) {
    o[2 * k] = a[k];
    o[2 * k + 1] = b[k];
  }
}

// a[k] = g[2k], b[k] = g[2k + 1] for k < n.
template <typename T>
inline void deinterleave_row(const T* g, T* a, T* b, int64_t n) {
  constexpr int64_t VL = V<T>::size();
  int64_t k = 0;
  for (; k + VL <= n; k += VL) {
    auto [ev, od] = at::vec::deinterleave2(V<T>::loadu(g + 2 * k), V<T>::loadu(g + 2 * k + VL));
    ev.store(a + k);
    od.store(b + k);
  }
  for (; k < n; ++k) {
    a[k] = g[2 * k];
    b[k] = g[2 * k + 1];
  }
}

// One pixel, G groups known at compile time: o[k * G + i] = x[i * cg + k]. With G a constant the
// compiler vectorises the interleaved stores (near memcpy speed for G = 3..8; a runtime G is ~3x
// slower). ATen's transpose_mxn is no help here: its masked 16 x 16 tiles are slower still.
template <int G, typename T>
inline void transpose_row_fixed(const T* x, T* o, int64_t cg) {
  for (int64_t k = 0; k < cg; ++k)
    for (int i = 0; i < G; ++i) o[k * G + i] = x[i * cg + k];
}

// One pixel: o[k * g + i] = x[i * cg + k], a g x cg -> cg x g transpose.
template <typename T>
inline void transpose_row(const T* x, T* o, int64_t g, int64_t cg) {
  if (g == 1 || cg == 1) {
    std::memcpy(o, x, sizeof(T) * g * cg);
    return;
  }
  switch (g) {
    case 2: interleave_row(x, x + cg, o, cg); return;
    case 3: transpose_row_fixed<3>(x, o, cg); return;
    case 4: transpose_row_fixed<4>(x, o, cg); return;
    case 5: transpose_row_fixed<5>(x, o, cg); return;
    case 6: transpose_row_fixed<6>(x, o, cg); return;
    case 7: transpose_row_fixed<7>(x, o, cg); return;
    case 8: transpose_row_fixed<8>(x, o, cg); return;
    default: break;
  }
  if (cg == 2) {
    deinterleave_row(x, o, o + g, g);
    return;
  }
  for (int64_t i = 0; i < g; ++i) {
    const T* src = x + i * cg;
    T* dst = o + i;
    for (int64_t k = 0; k < cg; ++k) dst[k * g] = src[k];
  }
}

template <typename T>
void shuffle(const ShuffleShape& s, const T* x, T* out) {
  const int64_t C = s.C, g = s.groups, cg = C / g, inner = s.inner;
  if (s.N == 0 || C == 0 || inner == 0) return;
  if (!s.cl) {
    at::parallel_for(0, s.N * C, grain(inner), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = j / C, co = j % C;
        const int64_t ci = shuffle_src(co, C, g);
        copy_n(x + (n * C + ci) * inner, out + j * inner, inner);
      }
    });
    return;
  }
  at::parallel_for(0, s.N * inner, grain(C), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) transpose_row(x + q * C, out + q * C, g, cg);
  });
}

// dst[0..n) = src[0, st, 2 st, ...)
template <typename T>
inline void strided_copy(const T* src, int64_t st, T* dst, int64_t n) {
  if (st == 1) {
    copy_n(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * st];
  }
}

template <typename T>
void interleave(const PairShape& s, const T* a, const T* b, T* out) {
  const int64_t C = s.C, C2 = 2 * C, H = s.H, W = s.W;
  if (s.N == 0 || C == 0 || H * W == 0) return;
  if (!s.cl) {
    at::parallel_for(0, s.N * C2, grain(H * W), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = j / C2, co = j % C2;
        const int64_t* st = co % 2 ? s.sb : s.sa;
        const T* src = (co % 2 ? b : a) + n * st[0] + (co / 2) * st[1];
        T* dst = out + j * H * W;
        if (st[3] == 1 && st[2] == W) {
          copy_n(src, dst, H * W);
        } else {
          for (int64_t h = 0; h < H; ++h) strided_copy(src + h * st[2], st[3], dst + h * W, W);
        }
      }
    });
    return;
  }
  const bool unit = s.sa[1] == 1 && s.sb[1] == 1;
  at::parallel_for(0, s.N * H * W, grain(C2), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / (H * W), h = (q / W) % H, w = q % W;
      const T* pa = a + n * s.sa[0] + h * s.sa[2] + w * s.sa[3];
      const T* pb = b + n * s.sb[0] + h * s.sb[2] + w * s.sb[3];
      T* o = out + q * C2;
      if (unit) {
        interleave_row(pa, pb, o, C);
      } else {
        for (int64_t k = 0; k < C; ++k) {
          o[2 * k] = pa[k * s.sa[1]];
          o[2 * k + 1] = pb[k * s.sb[1]];
        }
      }
    }
  });
}

template <typename T>
void deinterleave(const PairShape& s, const T* g, T* ga, T* gb) {
  const int64_t C = s.C, C2 = 2 * C, HW = s.H * s.W;
  if (s.N == 0 || C == 0 || HW == 0) return;
  if (!s.cl) {
    at::parallel_for(0, s.N * C2, grain(HW), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = j / C2, co = j % C2;
        copy_n(g + j * HW, (co % 2 ? gb : ga) + (n * C + co / 2) * HW, HW);
      }
    });
    return;
  }
  at::parallel_for(0, s.N * HW, grain(C2), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) deinterleave_row(g + q * C2, ga + q * C, gb + q * C, C);
  });
}

template <typename T>
constexpr ShuffleKernels<T> make_shuffle_kernels() {
  return ShuffleKernels<T>{&shuffle<T>, &interleave<T>, &deinterleave<T>};
}

}  // namespace fastdw::cpu::CPU_CAPABILITY::shuffle

#define FASTDW_DEFINE_CHANNEL_SHUFFLE_TABLE()                                                       \
  FASTDW_ISA_DEFINE(ShuffleKernelTable, shuffle_table, FASTDW_STR(CPU_CAPABILITY),                  \
                    shuffle::make_shuffle_kernels<float>(), shuffle::make_shuffle_kernels<double>())
