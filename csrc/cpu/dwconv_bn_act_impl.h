// Depthwise conv + BN + activation kernels, written once with at::vec::Vectorized and compiled
// per instruction set (csrc/cpu/isa/<isa>.cpp defines CPU_CAPABILITY and the -m flags).
//
// Layouts
//  * NHWC (channels_last): vectorised over channels. One task = one output row (n, ho), or two
//    (nhwc_conv_rows: 3x3, stride 1 or 2); every tap is a contiguous load of C values, taps
//    outside the image are skipped by index ranges computed per row / column, so the inner loops
//    have no branches.
//  * NCHW: vectorised over output columns. One task = one (n, c) plane. The plane is first copied
//    into a zero-padded, stride-deinterleaved buffer (phase j holds padded columns j, j+s, ...), so
//    every tap of every stride becomes a contiguous vector load; the buffer is L1/L2 resident.
// BatchNorm and the activation are applied to the accumulator in registers before the one store.
// Statistics and weight gradients are reduced in T over a row (weight gradients: ~256 output
// pixels), then merged in double in a fixed order, so results do not depend on scheduling.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__unix__)
#include <unistd.h>
#endif

#include "cpu/aligned.h"
#include "cpu/dwconv_bn_act_kernel.h"
#include "cpu/vec_util.h"

namespace fastdw::cpu::CPU_CAPABILITY {

// Sum of the first n lanes of v in double.
template <typename T>
inline double hsum(const V<T>& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (n == 16) {  // both halves widened to double, then a shuffle tree (no trip through memory)
      const __m512 f = v;
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
      return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
    }
  }
#endif
  alignas(64) T tmp[V<T>::size()];
  v.store(tmp);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += tmp[i];
  return s;
}

// ---- activations ---------------------------------------------------------------------------

// The primitives of the shared activation formulas (csrc/common/dwconv_bn_act_math.h) on vectors.
template <typename T>
struct VecOps {
  using V = Vectorized<T>;
  static V splat(double v) { return V(T(v)); }
  static V clamp_min(const V& y, const V& lo) { return at::vec::clamp_min(y, lo); }
  static V clamp(const V& y, const V& lo, const V& hi) { return at::vec::clamp(y, lo, hi); }
  static V exp_neg(const V& y) { return y.neg().exp(); }
  static V select(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
};

template <int A, typename T>
inline V<T> act_fwd(const V<T>& y) {
  return ::fastdw::act_fwd<A, VecOps<T>>(y);
}

// grad_out * act'(y) (conventions at the kinks: see the shared formula).
template <int A, typename T>
inline V<T> act_bwd(const V<T>& go, const V<T>& y) {
  return ::fastdw::act_bwd<A, VecOps<T>>(go, y);
}

// ---- index helpers ---------------------------------------------------------------------------

// tap_range, chan_merge: csrc/common/dwconv_bn_act_math.h.

inline int64_t grain_for(int64_t work_per_task) {
  // Enough tasks per chunk that a chunk does ~32K multiply-adds.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_task));
}

// ---- memory traffic --------------------------------------------------------------------------

// The NCHW convs prefetch the next plane's input (inputs of at least kPrefetchPlanesBytes): each
// plane is a new stream that the hardware prefetchers do not run ahead of. Eval, 2 threads, in
// random-order interleaved runs with eager engines between the calls (inputs out of cache, as in
// a model), without / with: 1x96x112x112 s2 0.239 / 0.214 and 0.172 / 0.156 ms, 32x144x56x56
// 5.14 / 4.93 and 5.54 / 5.27 ms. With its input in cache, 1x144x56x56 s2 (1.8 MB) got 14% slower:
// hence the threshold. (The NHWC eval conv prefetches the next rows of large inputs: AheadPrefetch.)
// The prefetch is spread over the plane's output rows (SpreadPrefetch), not issued in one burst
// after the fill: on a later VM (2 MiB L2 per core), 1x96x112x112 s2, 1 thread, after the
// phase-buffer alignment fix, spread / burst 319-352 / 418-420 us; 8x144x56x56 (2 threads) the
// same within noise (1.17-1.30 ms both).
constexpr int64_t kPrefetchPlanesBytes = int64_t(4) << 20;
template <typename T>
inline bool prefetch_planes(const ConvShape& s) {
  return s.N * s.C * s.H * s.W * int64_t(sizeof(T)) >= kPrefetchPlanesBytes;
}
// An NHWC eval output of at least stream_min_bytes() is written around the caches (stream_store):
// the stores skip reading each line first, but the next layer then reads the output from memory.
// Where that pays depends on the caches. Measured with a consumer, this op then a channels_last
// 1x1 conv to 24 channels, eval, 2 threads, N x 144 x 56 x 56 (output 1.8 MB per image), streamed
// vs plain stores, chain time in ms:
//  * a VM whose L3 size we did not record: N = 2 0.53 / 0.48 and 0.56 / 0.42 (slower), N = 4
//    1.07 / 1.23 and 0.95 / 0.96, N = 6 1.71 / 2.01 and 1.58 / 1.75, N = 8 2.30 / 2.58 and 2.35 /
//    2.75, N = 32 9.8 / 10.4; 1x96x112x112 s2 (1.2 MB) 0.20 / 0.17 (slower);
//  * a VM with a 480 MiB L3 (2 MiB L2 per core): N = 8 2.72 / 2.05 (op alone 1.13 / 0.93; in the
//    benchmark's interleaved runs 1.54-1.57 / 0.91-0.98), N = 16 6.22 / 5.78, N = 32 13.4 / 14.6.
// Hence the threshold: kStreamBytes, or a sixteenth of the L3 if larger (30 MiB on the second VM);
// FASTDW_STREAM_MIN_BYTES overrides it (read once; for measuring on another machine).
constexpr int64_t kStreamBytes = int64_t(8) << 20;
inline int64_t stream_min_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("FASTDW_STREAM_MIN_BYTES");
    if (e != nullptr && *e != '\0') return std::max<int64_t>(0, std::atoll(e));
    int64_t l3 = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    l3 = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
    return std::max(kStreamBytes, l3 / 16);
  }();
  return v;
}

// ---- NHWC core -------------------------------------------------------------------------------

// The NHWC eval forward of an input too large to stay in cache (at least stream_min_bytes(), as
// for streaming the output) prefetches into L2, spread over the epilogue calls of the rows it
// computes, the input rows that the next pair of output rows reads and the rows before did not.
// Without it the conv waited on memory between bursts of compute. 2 threads, in-process A/B of
// two builds (prefetch from 4 MiB inputs on): 32x144x56x56 with its input out of cache (a 1 GiB
// buffer written before each call) 6.56-6.57 -> 5.24-5.27 ms (x.add(1), as many bytes: 4.7);
// python -m bench.dwconv_bn_act, eval CL 6.78 / 6.84 -> 5.10 / 5.55 ms. With the input in
// cache the prefetches cost: 8x144x56x56 (14 MiB) 662-679 -> 813-889 us, 1x96x112x112 s2 137-141
// -> 158 us (in the benchmark 0.156 / 0.162 -> 0.178 / 0.185 ms): hence the threshold.
class AheadPrefetch {
 public:
  // Rows of output rows [q, min(q + 2, end)) (flat n * Ho + ho) in `parts` pieces.
  template <typename T>
  void start(const ConvShape& s, const T* x, int64_t q, int64_t end, int64_t parts) {
    left_ = 0;
    if (q >= end) return;
    const int64_t n = q / s.Ho, ho = q % s.Ho, ho_end = std::min(s.Ho, ho + std::min<int64_t>(2, end - q));
    int64_t first = std::max<int64_t>(0, ho * s.SH - s.PH);  // rows the output row before read: skipped
    if (ho > 0) first = std::max(first, (ho - 1) * s.SH - s.PH + (s.KH - 1) * s.DH + 1);
    const int64_t last = std::min(s.H - 1, (ho_end - 1) * s.SH - s.PH + (s.KH - 1) * s.DH);
    if (last < first) return;
    p_ = reinterpret_cast<const char*>(x + (n * s.H + first) * s.W * s.C);
    left_ = (last - first + 1) * s.W * s.C * int64_t(sizeof(T));
    chunk_ = (left_ / std::max<int64_t>(1, parts) + 127) & ~int64_t(63);
  }
  void step() {
    if (left_ > 0) issue();
  }

 private:
  // Out of line: the epilogue that calls step() stays small enough to be inlined into the conv.
  __attribute__((noinline)) void issue() {
    const int64_t n = std::min(chunk_, left_);
    for (int64_t a = 0; a < n; a += 64) __builtin_prefetch(p_ + a, 0, 2);
    p_ += n;
    left_ -= n;
  }
  const char* p_ = nullptr;
  int64_t left_ = 0, chunk_ = 0;
};

// One output column wo whose taps may fall outside the image (an edge column), channels [cb, ce):
// calls epi(wo, c, count, acc) with acc = the sum over kernel rows [kh0, kh1) (input row
// hi0 + kh * DH of image xn) and the kernel columns inside the image. Four channel vectors at a
// time: four independent FMA chains (one chain waits ~4 cycles per FMA, which made edge columns,
// most of a 7x7 map under a 5x5 kernel, 3-4x slower per output).
template <typename T, typename Epi>
inline void nhwc_edge_column(const ConvShape& s, const T* xn, const T* w, int64_t KW, int64_t hi0, int64_t kh0,
                             int64_t kh1, int64_t wo, int64_t cb, int64_t ce, Epi&& epi) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C, DW = s.DW;
  const int64_t wi0 = wo * s.SW - s.PW;
  int64_t kw0, kw1;
  tap_range(wi0, DW, KW, s.W, kw0, kw1);
  int64_t c = cb;
  for (; c + 4 * VL <= ce; c += 4 * VL) {
    V<T> a[4] = {V<T>(0), V<T>(0), V<T>(0), V<T>(0)};
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const T* xr = xn + ((hi0 + kh * s.DH) * s.W + wi0) * C + c;
      const T* wr = w + kh * KW * C + c;
      for (int64_t kw = kw0; kw < kw1; ++kw)
        for (int q = 0; q < 4; ++q)
          a[q] = at::vec::fmadd(V<T>::loadu(wr + kw * C + q * VL), V<T>::loadu(xr + kw * DW * C + q * VL), a[q]);
    }
    for (int q = 0; q < 4; ++q) epi(wo, c + q * VL, VL, a[q]);
  }
  for (; c < ce; c += VL) {
    const int64_t cnt = std::min(VL, ce - c);
    V<T> acc(0);
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const T* xr = xn + ((hi0 + kh * s.DH) * s.W + wi0) * C + c;
      const T* wr = w + kh * KW * C + c;
      for (int64_t kw = kw0; kw < kw1; ++kw) acc = at::vec::fmadd(load(wr + kw * C, cnt), load(xr + kw * DW * C, cnt), acc);
    }
    epi(wo, c, cnt, acc);
  }
}

// The output columns [lo, hi) whose taps all fall inside the image (wo * SW - PW >= 0 and
// wo * SW - PW + (KW - 1) * DW <= W - 1); the columns outside the range are edge columns.
struct ColRange {
  int64_t lo, hi;
};
inline ColRange interior_columns(const ConvShape& s, int64_t KW, int64_t DW, int64_t SW) {
  const int64_t lo = std::min(s.Wo, (s.PW + SW - 1) / SW);
  const int64_t num = s.W - 1 - (KW - 1) * DW + s.PW;
  return {lo, num < 0 ? lo : std::max(lo, std::min(s.Wo, num / SW + 1))};
}

// The interior columns left after the column blocks (fewer than 4) run as one narrower block, not
// through the edge path (7 output columns at stride 1: one of the five interior ones; 56: two of
// 54): f(std::integral_constant<int, left>{}) for left = 1, 2, 3; nothing for 0.
template <typename F>
inline void narrow_block(int64_t left, F&& f) {
  if (left == 3) f(std::integral_constant<int, 3>{});
  else if (left == 2) f(std::integral_constant<int, 2>{});
  else if (left == 1) f(std::integral_constant<int, 1>{});
}

// Calls epi(wo, c, count, acc) with acc = sum over taps of w * x for output row (n, ho) and the
// channels [cb, ce). Columns whose taps all fall inside the image are computed several at a time
// (independent FMA chains hide the FMA latency; each weight vector load feeds several FMAs); the
// edge columns take the general path with per-column tap ranges, four channel vectors at a time.
template <typename T, int KWT, typename Epi>
inline void nhwc_conv_group_t(const ConvShape& s, const T* x, const T* w, int64_t n, int64_t ho, int64_t cb,
                              int64_t ce, Epi&& epi) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C, KW = KWT > 0 ? KWT : s.KW, DW = s.DW, SW = s.SW;
  const int64_t hi0 = ho * s.SH - s.PH;
  int64_t kh0, kh1;
  tap_range(hi0, s.DH, s.KH, s.H, kh0, kh1);
  const T* xn = x + n * s.H * s.W * C;

  auto edge = [&](int64_t wo) { nhwc_edge_column(s, xn, w, KW, hi0, kh0, kh1, wo, cb, ce, epi); };

  const ColRange cols_in = interior_columns(s, KW, DW, SW);
  const int64_t wlo = cols_in.lo, whi = cols_in.hi;
  for (int64_t wo = 0; wo < wlo; ++wo) edge(wo);
  int64_t wo = wlo;
  auto block = [&](int64_t c, auto full) {
    constexpr bool FULL = decltype(full)::value;
    const int64_t cnt = FULL ? VL : ce - c;
    auto ld = [&](const T* p) { if constexpr (FULL) return V<T>::loadu(p); else return V<T>::loadu(p, cnt); };
    V<T> a0(0), a1(0), a2(0), a3(0);
    const int64_t step = SW * C;
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const T* xr = xn + ((hi0 + kh * s.DH) * s.W + wo * SW - s.PW) * C + c;
      const T* wr = w + kh * KW * C + c;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const V<T> wv = ld(wr + kw * C);
        const T* xp = xr + kw * DW * C;
        a0 = at::vec::fmadd(wv, ld(xp), a0);
        a1 = at::vec::fmadd(wv, ld(xp + step), a1);
        a2 = at::vec::fmadd(wv, ld(xp + 2 * step), a2);
        a3 = at::vec::fmadd(wv, ld(xp + 3 * step), a3);
      }
    }
    epi(wo, c, cnt, a0);
    epi(wo + 1, c, cnt, a1);
    epi(wo + 2, c, cnt, a2);
    epi(wo + 3, c, cnt, a3);
  };
  if constexpr (KWT > 0) {
    if (DW == 1 && (SW == 1 || SW == 2)) {
      // Register reuse across taps: the NB outputs of a block read (NB-1)*S + KW distinct input
      // columns per kernel row; load each once and feed all FMAs that need it.
      auto fast = [&](auto sw, auto nb) {
        constexpr int S = decltype(sw)::value, NB = decltype(nb)::value, NX = (NB - 1) * S + KWT;
        auto run = [&](int64_t c, auto full) {
          constexpr bool FULL = decltype(full)::value;
          const int64_t cnt = FULL ? VL : ce - c;
          auto ld = [&](const T* p) { if constexpr (FULL) return V<T>::loadu(p); else return V<T>::loadu(p, cnt); };
          V<T> acc[NB];
          for (int j = 0; j < NB; ++j) acc[j] = V<T>(0);
          for (int64_t kh = kh0; kh < kh1; ++kh) {
            const T* xr = xn + ((hi0 + kh * s.DH) * s.W + wo * S - s.PW) * C + c;
            const T* wr = w + kh * KWT * C + c;
            V<T> xv[NX], wv[KWT];
            for (int m = 0; m < NX; ++m) xv[m] = ld(xr + m * C);
            for (int kw = 0; kw < KWT; ++kw) wv[kw] = ld(wr + kw * C);
            for (int kw = 0; kw < KWT; ++kw)
              for (int j = 0; j < NB; ++j) acc[j] = at::vec::fmadd(wv[kw], xv[j * S + kw], acc[j]);
          }
          for (int j = 0; j < NB; ++j) epi(wo + j, c, cnt, acc[j]);
        };
        for (; wo + NB <= whi; wo += NB) {
          int64_t c = cb;
          for (; c + VL <= ce; c += VL) run(c, std::true_type{});
          if (c < ce) run(c, std::false_type{});
        }
      };
      auto rest = [&](auto sw) {
        if constexpr (decltype(sw)::value == 1) fast(sw, std::integral_constant<int, 8>{});
        fast(sw, std::integral_constant<int, 4>{});
        narrow_block(whi - wo, [&](auto nb) { fast(sw, nb); });
      };
      if (SW == 1) rest(std::integral_constant<int, 1>{});
      else rest(std::integral_constant<int, 2>{});
    }
  }
  for (; wo + 4 <= whi; wo += 4) {
    int64_t c = cb;
    for (; c + VL <= ce; c += VL) block(c, std::true_type{});
    if (c < ce) block(c, std::false_type{});
  }
  for (; wo < s.Wo; ++wo) edge(wo);
}

// The NHWC row kernels take 4 channel vectors at a time (64 float channels): the weights and the
// input columns of a group stay in L1 across the row. Looping over all channels per column instead
// streamed the whole weight tensor from L2 once per output pixel, which bounded 7x7 / 14x14 maps
// with hundreds of channels by L2 bandwidth (~4 cycles per FMA).
template <typename T>
constexpr int64_t kChannelGroup = 4 * V<T>::size();

// One output row, one channel group after the other.
template <typename T, int KWT, typename Epi>
inline void nhwc_conv_row_t(const ConvShape& s, const T* x, const T* w, int64_t n, int64_t ho, Epi&& epi) {
  constexpr int64_t CB = kChannelGroup<T>;
  for (int64_t cb = 0; cb < s.C; cb += CB) nhwc_conv_group_t<T, KWT>(s, x, w, n, ho, cb, std::min(s.C, cb + CB), epi);
}

template <typename T, typename Epi>
inline void nhwc_conv_row(const ConvShape& s, const T* x, const T* w, int64_t n, int64_t ho, Epi&& epi) {
  switch (s.KW) {
    case 3: return nhwc_conv_row_t<T, 3>(s, x, w, n, ho, epi);
    case 5: return nhwc_conv_row_t<T, 5>(s, x, w, n, ho, epi);
    case 7: return nhwc_conv_row_t<T, 7>(s, x, w, n, ho, epi);
    default: return nhwc_conv_row_t<T, 0>(s, x, w, n, ho, epi);
  }
}

// Two output rows (ho, ho + 1) of a 3x3 conv with stride S (1 or 2), dilation 1, at once: each of
// the S + 3 input rows they read is loaded once for both (one row at a time: 3 + 3). Stride 1,
// per output: ~5 vector loads instead of ~10 (the compiler folds the single-row kernel's input
// loads into the FMAs, one load per FMA). Eval, 2 threads, in-process A/B with eager engines in
// random-order rounds, one row / two rows: 8x144x56x56 3.16 / 1.73 ms (the NCHW kernel: 2.12),
// 1x144x56x56 0.220 / 0.161, 1x32x112x112 0.174 / 0.136; stride 2 (5 rows instead of 6) no clear
// change, 1x96x112x112 0.165 / 0.166 and 0.134 / 0.124. Why the single-row kernel lost this much
// at 8x144 (a third more time than NCHW, which reads and writes as many bytes) is not measured:
// no hardware counters in this VM. Calls epi(dr, wo, c, cnt, acc) for output row ho + dr.
inline bool nhwc_pair_ok(const ConvShape& s, int64_t ho) {
  const int64_t S = s.SH, hi0 = ho * S - s.PH;
  return s.KH == 3 && s.KW == 3 && s.DH == 1 && s.DW == 1 && s.SW == S && (S == 1 || S == 2) && ho + 1 < s.Ho &&
         hi0 >= 0 && hi0 + S + 2 < s.H;
}

template <typename T, int S, typename Epi>
inline void nhwc_conv_pair_group_t(const ConvShape& s, const T* x, const T* w, int64_t n, int64_t ho, int64_t cb,
                                   int64_t ce, Epi&& epi) {
  constexpr int64_t VL = V<T>::size();
  constexpr int NBMAX = 4, R = S + 3;
  const int64_t C = s.C, hi0 = ho * S - s.PH;
  const T* xn = x + n * s.H * s.W * C;
  // Columns with taps outside the image: one column at a time, for each of the two rows.
  auto edge = [&](int64_t wo) {
    for (int64_t dr = 0; dr < 2; ++dr)
      nhwc_edge_column(s, xn, w, 3, hi0 + dr * S, 0, 3, wo, cb, ce,
                       [&](int64_t wo_, int64_t c, int64_t cnt, V<T> acc) { epi(dr, wo_, c, cnt, acc); });
  };
  const ColRange cols_in = interior_columns(s, 3, 1, S);
  const int64_t wlo = cols_in.lo, whi = cols_in.hi;
  int64_t wo = 0;
  for (; wo < wlo; ++wo) edge(wo);
  auto run = [&](int64_t c, auto full, auto nb) {
    constexpr bool FULL = decltype(full)::value;
    constexpr int NB = decltype(nb)::value, NX = (NB - 1) * S + 3;
    const int64_t cnt = FULL ? VL : ce - c;
    auto ld = [&](const T* p) { if constexpr (FULL) return V<T>::loadu(p); else return V<T>::loadu(p, cnt); };
    V<T> a0[NB], a1[NB];
    for (int j = 0; j < NB; ++j) a0[j] = a1[j] = V<T>(0);
    for (int r = 0; r < R; ++r) {  // input row hi0 + r: kernel row r of output row 0, r - S of row 1
      const T* xr = xn + ((hi0 + r) * s.W + wo * S - s.PW) * C + c;
      V<T> xv[NX];
      for (int m = 0; m < NX; ++m) xv[m] = ld(xr + m * C);
      if (r < 3) {
        const T* wr = w + r * 3 * C + c;
        for (int kw = 0; kw < 3; ++kw) {
          const V<T> wv = ld(wr + kw * C);
          for (int j = 0; j < NB; ++j) a0[j] = at::vec::fmadd(wv, xv[j * S + kw], a0[j]);
        }
      }
      if (r >= S) {
        const T* wr = w + (r - S) * 3 * C + c;
        for (int kw = 0; kw < 3; ++kw) {
          const V<T> wv = ld(wr + kw * C);
          for (int j = 0; j < NB; ++j) a1[j] = at::vec::fmadd(wv, xv[j * S + kw], a1[j]);
        }
      }
    }
    for (int j = 0; j < NB; ++j) epi(0, wo + j, c, cnt, a0[j]);
    for (int j = 0; j < NB; ++j) epi(1, wo + j, c, cnt, a1[j]);
  };
  auto cols = [&](auto nb) {
    int64_t c = cb;
    for (; c + VL <= ce; c += VL) run(c, std::true_type{}, nb);
    if (c < ce) run(c, std::false_type{}, nb);
    wo += decltype(nb)::value;
  };
  while (wo + NBMAX <= whi) cols(std::integral_constant<int, NBMAX>{});
  narrow_block(whi - wo, cols);
  for (; wo < s.Wo; ++wo) edge(wo);
}

// Output rows r (and r + 1, if r + 1 < r_end is in the same image and nhwc_pair_ok) of the flat
// row index r = n * Ho + ho; calls epi(dr, wo, c, cnt, acc) for row r + dr. Returns the rows done.
template <typename T, typename Epi>
inline int64_t nhwc_conv_rows(const ConvShape& s, const T* x, const T* w, int64_t r, int64_t r_end, Epi&& epi) {
  const int64_t n = r / s.Ho, ho = r % s.Ho;
  if (r + 1 < r_end && nhwc_pair_ok(s, ho)) {
    constexpr int64_t CB = kChannelGroup<T>;
    for (int64_t cb = 0; cb < s.C; cb += CB) {
      const int64_t ce = std::min(s.C, cb + CB);
      if (s.SH == 1) nhwc_conv_pair_group_t<T, 1>(s, x, w, n, ho, cb, ce, epi);
      else nhwc_conv_pair_group_t<T, 2>(s, x, w, n, ho, cb, ce, epi);
    }
    return 2;
  }
  nhwc_conv_row(s, x, w, n, ho, [&](int64_t wo, int64_t c, int64_t cnt, V<T> acc) { epi(0, wo, c, cnt, acc); });
  return 1;
}

// ---- NCHW core -------------------------------------------------------------------------------

// The phase buffer of an NCHW plane: phase j (j < SW) holds the padded input columns j, j + SW, ...
// as `rows` rows of `cols` elements, at buf + j * step (buf: the phase-0 origin, `lead` elements
// past a vector-aligned allocation). lead and step are chosen so that fill_plane_buf's vector
// stores of the image columns are aligned: with 1 x 3 padding, phase 1 of stride 2 started one
// element into a line, and every one of its stores split across two cache lines (a third of the
// fill, ~0.5 us of ~4 us per 112x112 plane, in a standalone C++ test of the fill loop).
struct PlaneBuf {
  int64_t rows, cols;  // rows of padded input used; columns per phase (multiple of VL, with slack)
  int64_t lead = 0, step = 0;
  int64_t SW = 1;
  // elements from the aligned start to the end of the last phase
  int64_t total() const { return lead + (SW - 1) * step + rows * cols; }
};

inline PlaneBuf plane_buf_dims(const ConvShape& s, int64_t VL) {
  PlaneBuf b;
  b.rows = (s.Ho - 1) * s.SH + (s.KH - 1) * s.DH + 1;
  // wide enough for every tap load (+ one vector of slack) and for fill_plane_buf's vector stores
  const int64_t need = std::max(s.Wo + ((s.KW - 1) * s.DW) / s.SW,
                                (s.W + s.SW - 1) / s.SW + (s.PW + s.SW - 1) / s.SW + VL) + VL;
  b.cols = (need + VL - 1) / VL * VL;
  b.step = b.rows * b.cols;
  // first image column of phase j: input column 0 sits at padded column PW
  auto first = [&](int64_t j) { return (s.PW + (j - s.PW % s.SW + s.SW) % s.SW) / s.SW; };
  auto mod = [&](int64_t v) { return ((v % VL) + VL) % VL; };
  if (s.SW <= 2) {
    b.lead = mod(-first(0));
    if (s.SW == 2) b.step += mod(first(0) - first(1));
  }
  b.SW = s.SW;
  return b;
}

// buf[j * step + hp * cols + q] = padded input at row hp, column q * SW + j (0 outside).
// Stride 1 and 2 are vectorised (stride 2 splits even/odd input columns with one permute pair);
// `row` is scratch of at least SW * cols + VL elements for other strides.
template <typename T>
inline void fill_plane_buf(const ConvShape& s, const PlaneBuf& d, const T* xp, T* buf, T* row) {
  constexpr int64_t VL = V<T>::size();
  const V<T> zero(0);
  // The buffer starts zeroed (PlaneScratch) and only the image region is ever written, so the
  // padding stays zero from plane to plane.
  for (int64_t hp = 0; hp < d.rows; ++hp) {
    const int64_t hi = hp - s.PH;
    if (hi < 0 || hi >= s.H) continue;
    const T* src = xp + hi * s.W;
    if (s.SW == 1) {
      T* dst = buf + hp * d.cols + s.PW;
      const int64_t n = std::min(s.W, d.cols - s.PW - VL);
      int64_t q = 0;
      for (; q + VL <= n; q += VL) V<T>::loadu(src + q).store(dst + q);
      if (q < n) V<T>::loadu(src + q, n - q).store(dst + q, n - q);
    } else if (s.SW == 2) {
      // input column wi = 2k (+1) lands in phase (PW (+1)) % 2 at q = k + (PW (+1)) / 2
      T* ev = buf + (s.PW % 2) * d.step + hp * d.cols + s.PW / 2;
      T* od = buf + ((s.PW + 1) % 2) * d.step + hp * d.cols + (s.PW + 1) / 2;
      for (int64_t k = 0; 2 * k < s.W; k += VL) {
        const int64_t left = s.W - 2 * k;
        const V<T> a = left >= VL ? V<T>::loadu(src + 2 * k) : V<T>::loadu(src + 2 * k, left);
        const V<T> b = left >= 2 * VL ? V<T>::loadu(src + 2 * k + VL)
                                      : (left > VL ? V<T>::loadu(src + 2 * k + VL, left - VL) : zero);
        auto [e, o] = at::vec::deinterleave2(a, b);
        e.store(ev + k);
        o.store(od + k);
      }
    } else {
      (void)zero;
      const int64_t len = s.SW * d.cols;
      const int64_t q0 = std::min<int64_t>(len, s.PW), q1 = std::min<int64_t>(len, s.PW + s.W);
      std::fill(row, row + len, T(0));
      if (q1 > q0) std::memcpy(row + q0, src, sizeof(T) * (q1 - q0));
      for (int64_t j = 0; j < s.SW; ++j) {
        T* dst = buf + j * d.step + hp * d.cols;
        for (int64_t q = 0; q < d.cols; ++q) dst[q] = row[q * s.SW + j];
      }
    }
  }
}

// For every output vector of a plane: acc = sum_t w[t] * buf[ho * row_step + wo + off[t]] (VL
// columns wo.. at once), then epi(ho, wo, count, acc). Output vectors are taken four at a time
// (independent FMA chains) in row-major order; TAPS > 0 unrolls the taps with weights in registers.
template <typename T, int TAPS, typename Epi>
inline void nchw_core_t(int64_t Ho, int64_t Wo, const T* buf, int64_t row_step, const int64_t* off, int64_t taps,
                        const T* w, Epi&& epi) {
  constexpr int64_t VL = V<T>::size();
  constexpr int64_t NT = TAPS > 0 ? TAPS : 1;
  V<T> wv_fixed[NT];
  std::vector<V<T>> wv_dyn(TAPS > 0 ? 0 : taps);
  V<T>* wv = TAPS > 0 ? wv_fixed : wv_dyn.data();
  const int64_t nt = TAPS > 0 ? TAPS : taps;
  for (int64_t t = 0; t < nt; ++t) wv[t] = V<T>(w[t]);
  const int64_t nv = (Wo + VL - 1) / VL, total = Ho * nv;
  int64_t i = 0;
  for (; i + 4 <= total; i += 4) {
    int64_t ho[4], wo[4];
    const T* base[4];
    for (int j = 0; j < 4; ++j) {
      ho[j] = (i + j) / nv;
      wo[j] = (i + j - ho[j] * nv) * VL;
      base[j] = buf + ho[j] * row_step + wo[j];
    }
    V<T> a0(0), a1(0), a2(0), a3(0);
    for (int64_t t = 0; t < nt; ++t) {
      a0 = at::vec::fmadd(wv[t], V<T>::loadu(base[0] + off[t]), a0);
      a1 = at::vec::fmadd(wv[t], V<T>::loadu(base[1] + off[t]), a1);
      a2 = at::vec::fmadd(wv[t], V<T>::loadu(base[2] + off[t]), a2);
      a3 = at::vec::fmadd(wv[t], V<T>::loadu(base[3] + off[t]), a3);
    }
    epi(ho[0], wo[0], std::min(VL, Wo - wo[0]), a0);
    epi(ho[1], wo[1], std::min(VL, Wo - wo[1]), a1);
    epi(ho[2], wo[2], std::min(VL, Wo - wo[2]), a2);
    epi(ho[3], wo[3], std::min(VL, Wo - wo[3]), a3);
  }
  for (; i < total; ++i) {
    const int64_t h = i / nv, wo = (i - h * nv) * VL;
    const T* b = buf + h * row_step + wo;
    V<T> a(0);
    for (int64_t t = 0; t < nt; ++t) a = at::vec::fmadd(wv[t], V<T>::loadu(b + off[t]), a);
    epi(h, wo, std::min(VL, Wo - wo), a);
  }
}

template <typename T, typename Epi>
inline void nchw_core(int64_t Ho, int64_t Wo, const T* buf, int64_t row_step, const int64_t* off, int64_t taps,
                      const T* w, Epi&& epi) {
  switch (taps) {
    case 9: return nchw_core_t<T, 9>(Ho, Wo, buf, row_step, off, taps, w, epi);
    case 25: return nchw_core_t<T, 25>(Ho, Wo, buf, row_step, off, taps, w, epi);
    case 49: return nchw_core_t<T, 49>(Ho, Wo, buf, row_step, off, taps, w, epi);
    default: return nchw_core_t<T, 0>(Ho, Wo, buf, row_step, off, taps, w, epi);
  }
}

// Offsets of the taps into the phase buffer of fill_plane_buf.
inline std::vector<int64_t> plane_offsets(const ConvShape& s, const PlaneBuf& d) {
  std::vector<int64_t> off(s.taps());
  for (int64_t kh = 0; kh < s.KH; ++kh)
    for (int64_t kw = 0; kw < s.KW; ++kw) {
      const int64_t o = kw * s.DW;
      off[kh * s.KW + kw] = (o % s.SW) * d.step + kh * s.DH * d.cols + o / s.SW;
    }
  return off;
}

// Per-thread scratch of one NCHW plane task; data() is the phase buffer's origin (PlaneBuf).
template <typename T>
struct PlaneScratch {
  static_assert(kCacheLine % sizeof(V<T>) == 0, "AlignedVec must align to the vector size");
  AlignedVec<T> buf;  // vector-aligned: lead counts from its start
  std::vector<T> row;
  T* origin;
  PlaneScratch(const ConvShape& s, const PlaneBuf& d)
      : buf(d.total() + V<T>::size()), row(s.SW * d.cols + 2 * V<T>::size()), origin(buf.data() + d.lead) {}
  PlaneScratch(PlaneScratch&&) = default;  // a moved vector keeps its storage: origin stays valid
  PlaneScratch(const PlaneScratch&) = delete;
  const T* data() const { return origin; }
  void fill(const ConvShape& s, const PlaneBuf& d, const T* xp) { fill_plane_buf(s, d, xp, origin, row.data()); }
};

// Square K x K kernel, dilation 1, stride S over a phase buffer (S phases `step` apart, rows of `cols`):
// NB output rows at one column vector per step. Output row ho + j reads buffer rows
// ho*S + j*S + kh, so the block reads (NB-1)*S + K distinct rows per tap column: each is loaded
// once and feeds every FMA that needs it (weights stay in registers).
template <typename T, int K, int S, int NB, typename Epi>
inline void nchw_fast_rows(int64_t ho0, int64_t Wo, const T* buf, int64_t step, int64_t cols, const V<T>* wv,
                           Epi&& epi) {
  constexpr int64_t VL = V<T>::size();
  constexpr int NR = (NB - 1) * S + K;
  for (int64_t wo = 0; wo < Wo; wo += VL) {
    V<T> acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = V<T>(0);
    for (int kw = 0; kw < K; ++kw) {
      const T* col = buf + (kw % S) * step + ho0 * S * cols + wo + kw / S;
      for (int r = 0; r < NR; ++r) {
        const V<T> v = V<T>::loadu(col + r * cols);
        for (int j = 0; j < NB; ++j) {
          const int kh = r - j * S;
          if (kh >= 0 && kh < K) acc[j] = at::vec::fmadd(wv[kh * K + kw], v, acc[j]);
        }
      }
    }
    const int64_t cnt = std::min(VL, Wo - wo);
    for (int j = 0; j < NB; ++j) epi(ho0 + j, wo, cnt, acc[j]);
  }
}

template <typename T, int K, int S, typename Epi>
inline void nchw_fast(int64_t Ho, int64_t Wo, const T* buf, int64_t step, int64_t cols, const T* w, Epi&& epi) {
  V<T> wv[K * K];
  for (int t = 0; t < K * K; ++t) wv[t] = V<T>(w[t]);
  constexpr int NB = K <= 5 ? 4 : 2;
  int64_t ho = 0;
  for (; ho + NB <= Ho; ho += NB) nchw_fast_rows<T, K, S, NB>(ho, Wo, buf, step, cols, wv, epi);
  for (; ho < Ho; ++ho) nchw_fast_rows<T, K, S, 1>(ho, Wo, buf, step, cols, wv, epi);
}

// True (and runs) if the shape has a register-blocked kernel; the caller falls back otherwise.
template <typename T, typename Epi>
inline bool nchw_try_fast(int64_t K, int64_t KW, int64_t S, int64_t SW, int64_t D, int64_t DW, int64_t Ho,
                          int64_t Wo, const T* buf, int64_t step, int64_t cols, const T* w, Epi&& epi) {
  if (K != KW || S != SW || D != 1 || DW != 1) return false;
  if (S == 1) {
    if (K == 3) return nchw_fast<T, 3, 1>(Ho, Wo, buf, step, cols, w, epi), true;
    if (K == 5) return nchw_fast<T, 5, 1>(Ho, Wo, buf, step, cols, w, epi), true;
    if (K == 7) return nchw_fast<T, 7, 1>(Ho, Wo, buf, step, cols, w, epi), true;
  } else if (S == 2) {
    if (K == 3) return nchw_fast<T, 3, 2>(Ho, Wo, buf, step, cols, w, epi), true;
    if (K == 5) return nchw_fast<T, 5, 2>(Ho, Wo, buf, step, cols, w, epi), true;
    if (K == 7) return nchw_fast<T, 7, 2>(Ho, Wo, buf, step, cols, w, epi), true;
  }
  return false;
}

// Conv of one NCHW plane (already in scratch) with taps w[0..taps); `next` takes one step per
// output row (the next plane's prefetch, spread over this plane's conv).
template <typename T, typename Epi>
inline void nchw_conv_plane(const ConvShape& s, const PlaneBuf& d, const std::vector<int64_t>& off,
                            const T* buf, const T* w, const SpreadPrefetch& next, Epi&& epi) {
  auto e = [&](int64_t ho, int64_t wo, int64_t cnt, V<T> acc) {
    if (wo == 0) next.step(ho);
    epi(ho, wo, cnt, acc);
  };
  if (nchw_try_fast(s.KH, s.KW, s.SH, s.SW, s.DH, s.DW, s.Ho, s.Wo, buf, d.step, d.cols, w, e)) return;
  nchw_core(s.Ho, s.Wo, buf, s.SH * d.cols, off.data(), s.taps(), w, e);
}

// ---- forward ---------------------------------------------------------------------------------

// s1[c] = sum_wo (row[wo][c] - k[c]), s2[c] = sum_wo (row[wo][c] - k[c])^2 over one NHWC output row
// of W pixels, four channel vectors at a time with the sums in registers.
template <typename T>
inline void row_moments(const T* row, int64_t W, int64_t C, const T* k, T* s1, T* s2) {
  constexpr int64_t VL = V<T>::size();
  int64_t c = 0;
  for (; c + 4 * VL <= C; c += 4 * VL) {
    V<T> a[4], q[4], kv[4];
    for (int j = 0; j < 4; ++j) {
      a[j] = q[j] = V<T>(0);
      kv[j] = V<T>::loadu(k + c + j * VL);
    }
    for (int64_t wo = 0; wo < W; ++wo) {
      const T* p = row + wo * C + c;
      for (int j = 0; j < 4; ++j) {
        const V<T> d = V<T>::loadu(p + j * VL) - kv[j];
        a[j] = a[j] + d;
        q[j] = at::vec::fmadd(d, d, q[j]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      a[j].store(s1 + c + j * VL);
      q[j].store(s2 + c + j * VL);
    }
  }
  for (; c < C; c += VL) {
    const int64_t cnt = std::min(VL, C - c);
    const V<T> kv = load(k + c, cnt);
    V<T> a(0), q(0);
    for (int64_t wo = 0; wo < W; ++wo) {
      const V<T> d = V<T>::set(V<T>(0), load(row + wo * C + c, cnt) - kv, cnt);
      a = a + d;
      q = at::vec::fmadd(d, d, q);
    }
    store(a, s1 + c, cnt);
    store(q, s2 + c, cnt);
  }
}

// sum of (p[i] - k)^P for i < n (P = 1 or 2) in double: four vector accumulators, added into the
// double total every 64 vectors so that long planes do not lose float precision.
template <typename T, int P>
inline double plane_moment(const T* p, int64_t n, T k) {
  constexpr int64_t VL = V<T>::size();
  const V<T> kv(k);
  auto term = [&](const V<T>& v, const V<T>& acc) {
    const V<T> dv = v - kv;
    if constexpr (P == 1) return acc + dv;
    else return at::vec::fmadd(dv, dv, acc);
  };
  double total = 0;
  int64_t i = 0;
  while (i + 4 * VL <= n) {
    V<T> a0(0), a1(0), a2(0), a3(0);
    const int64_t stop = std::min(n - 4 * VL, i + 64 * VL);
    for (; i <= stop; i += 4 * VL) {
      a0 = term(V<T>::loadu(p + i), a0);
      a1 = term(V<T>::loadu(p + i + VL), a1);
      a2 = term(V<T>::loadu(p + i + 2 * VL), a2);
      a3 = term(V<T>::loadu(p + i + 3 * VL), a3);
    }
    total += hsum(a0, VL) + hsum(a1, VL) + hsum(a2, VL) + hsum(a3, VL);
  }
  for (; i < n; ++i) {
    const double dv = double(p[i]) - double(k);
    total += P == 1 ? dv : dv * dv;
  }
  return total;
}

// The per-channel mean and biased variance from per-(image, channel) parts of hw values each:
// Chan's merge over the images in order (the result does not depend on the threads' chunks).
inline void merge_image_stats(int64_t N, int64_t C, int64_t hw, const double* pmean, const double* pm2, double* mean,
                              double* var) {
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, m = 0, m2 = 0;
    for (int64_t i = 0; i < N; ++i) chan_merge(n, m, m2, double(hw), pmean[i * C + c], pm2[i * C + c]);
    mean[c] = m;
    var[c] = n > 0 ? m2 / n : 0.0;
  }
}

template <typename T, int A>
void forward_impl(const ConvShape& s, const T* x, const T* w, const T* b, T* out, double* mean, double* var) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C;
  const bool stats = mean != nullptr;
  if (s.N == 0) {
    if (stats) for (int64_t c = 0; c < C; ++c) mean[c] = var[c] = 0;
    return;
  }
  if (s.cl) {
    const int64_t rows = s.N * s.Ho;
    const int nt = at::get_num_threads();
    std::vector<double> tn(stats ? nt : 0, 0.0), tmean(stats ? nt * C : 0, 0.0), tm2(stats ? nt * C : 0, 0.0);
    const bool stream = !stats && s.N * s.Ho * s.Wo * C * int64_t(sizeof(T)) >= stream_min_bytes();
    const bool ahead = !stats && s.N * s.H * s.W * C * int64_t(sizeof(T)) >= stream_min_bytes();
    at::parallel_for(0, rows, grain_for(s.Wo * C * s.taps()), [&](int64_t r0, int64_t r1) {
      if (!stats) {
        // Two instantiations: a step() left in the epilogue with the prefetch off still cost
        // (8x144x56x56, in-process A/B: 662-856 -> 990-1010 us).
        auto rows_loop = [&](auto with_prefetch) {
          constexpr bool kAhead = decltype(with_prefetch)::value;
          AheadPrefetch pf;
          for (int64_t r = r0; r < r1;) {
            T* orow = out + r * s.Wo * C;
            if constexpr (kAhead)
              pf.start(s, x, r + 2, r1, 2 * s.Wo * ((C + kChannelGroup<T> - 1) / kChannelGroup<T>));
            r += nhwc_conv_rows(s, x, w, r, r1, [&](int64_t dr, int64_t wo, int64_t c, int64_t cnt, V<T> acc) {
              const V<T> y = act_fwd<A>(acc + load(b + c, cnt));
              T* o = orow + (dr * s.Wo + wo) * C + c;
              if (stream && cnt == VL) stream_store(y, o);
              else store(y, o, cnt);
              if constexpr (kAhead) pf.step();
            });
          }
        };
        if (ahead) rows_loop(std::true_type{});
        else rows_loop(std::false_type{});
        if (stream) stream_fence();
        return;
      }
      // Statistics of this task's rows, shifted by K = the first row's mean (so the sums below do
      // not cancel): per row, sum(z - K) and sum((z - K)^2) per channel with the accumulators in
      // registers while the row is in L1, added up in double; merged into the thread's
      // accumulators once per task. (Merging every row in double cost ~15% of the forward.)
      AlignedVec<T> shift(C, T(0)), rs1(C), rs2(C);
      std::vector<double> s1(C, 0.0), s2(C, 0.0);
      for (int64_t r = r0; r < r1;) {
        T* orows = out + r * s.Wo * C;
        const int64_t k = nhwc_conv_rows(s, x, w, r, r1, [&](int64_t dr, int64_t wo, int64_t c, int64_t cnt, V<T> acc) {
          store(acc + load(b + c, cnt), orows + (dr * s.Wo + wo) * C + c, cnt);
        });
        for (int64_t q = r; q < r + k; ++q) {
          const T* orow = out + q * s.Wo * C;
          if (q == r0) {
            row_moments(orow, s.Wo, C, shift.data(), rs1.data(), rs2.data());
            for (int64_t c = 0; c < C; ++c) shift[c] = rs1[c] / T(s.Wo);
          }
          row_moments(orow, s.Wo, C, shift.data(), rs1.data(), rs2.data());
          for (int64_t c = 0; c < C; ++c) {
            s1[c] += rs1[c];
            s2[c] += rs2[c];
          }
        }
        r += k;
      }
      const int tid = at::get_thread_num();
      const double cnt = double((r1 - r0) * s.Wo);
      for (int64_t c = 0; c < C; ++c) {
        double na = tn[tid];
        const double m2 = std::max(0.0, s2[c] - s1[c] * s1[c] / cnt);
        chan_merge(na, tmean[tid * C + c], tm2[tid * C + c], cnt, double(shift[c]) + s1[c] / cnt, m2);
      }
      tn[tid] += cnt;
    });
    if (stats) {
      for (int64_t c = 0; c < C; ++c) {
        double n = 0, m = 0, m2 = 0;
        for (int t = 0; t < nt; ++t) chan_merge(n, m, m2, tn[t], tmean[t * C + c], tm2[t * C + c]);
        mean[c] = m;
        var[c] = n > 0 ? m2 / n : 0.0;
      }
    }
    return;
  }
  // NCHW
  const PlaneBuf d = plane_buf_dims(s, VL);
  const int64_t planes = s.N * C;
  const int64_t hw = s.Ho * s.Wo;
  std::vector<double> pmean(stats ? planes : 0), pm2(stats ? planes : 0);
  const std::vector<int64_t> off = plane_offsets(s, d);
  const bool pf = prefetch_planes<T>(s);
  at::parallel_for(0, planes, grain_for(hw * s.taps()), [&](int64_t p0, int64_t p1) {
    PlaneScratch<T> sc(s, d);
    const T* buf = sc.data();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      sc.fill(s, d, x + s.in_plane(p));
      const SpreadPrefetch next(pf && p + 1 < p1 ? x + s.in_plane(p + 1) : nullptr, s.H * s.W * sizeof(T), s.Ho);
      T* op = out + p * hw;
      const V<T> bv(b[c]);
      if (!stats) {
        nchw_conv_plane(s, d, off, buf, w + c * s.taps(), next, [&](int64_t ho, int64_t wo, int64_t cnt, V<T> acc) {
          store(act_fwd<A>(acc + bv), op + ho * s.Wo + wo, cnt);
        });
        continue;
      }
      // The plane is written as in eval, then its mean and squared deviations are summed in two
      // linear passes over it while it is in L1 (a 56x56 float plane is 12.5 KB). Summing in the
      // conv's epilogue kept one accumulator chain per output vector and stopped the compiler
      // from inlining the epilogue: as costly as the conv itself (perf, 1x144x56x56); and its
      // float row sums of z lost precision for a large mean (variance off by 7e-4 relative at
      // mean 1e3, spread 1e-2, 58x58: test_batch_statistics_with_a_large_mean).
      nchw_conv_plane(s, d, off, buf, w + c * s.taps(), next, [&](int64_t ho, int64_t wo, int64_t cnt, V<T> acc) {
        store(acc + bv, op + ho * s.Wo + wo, cnt);
      });
      // Sums of z - z[0], small next to z: no cancellation for a large mean and a small spread.
      const double pm = double(op[0]) + plane_moment<T, 1>(op, hw, op[0]) / double(hw);
      const double m2 = plane_moment<T, 2>(op, hw, static_cast<T>(pm));
      // m2 was taken about the rounded mean; correct it to the exact plane mean.
      const double shift = pm - double(static_cast<T>(pm));
      pmean[p] = pm;
      pm2[p] = std::max(0.0, m2 - double(hw) * shift * shift);
    }
  });
  if (stats) merge_image_stats(s.N, C, hw, pmean.data(), pm2.data(), mean, var);
}

template <typename T>
void forward(const ConvShape& s, Act a, const T* x, const T* w, const T* b, T* out, double* mean, double* var) {
  dispatch_act(a, [&](auto A) { forward_impl<T, decltype(A)::value>(s, x, w, b, out, mean, var); });
}

// ---- elementwise passes ----------------------------------------------------------------------

// f(v, c_vec_index_or_plane_scalar...) over the output tensor in its layout.
template <typename T, typename F>
inline void for_each_output(const ConvShape& s, F&& f) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C;
  const int64_t hw = s.Ho * s.Wo;
  if (s.cl) {
    const int64_t pos = s.N * hw;
    at::parallel_for(0, pos, grain_for(C), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        for (int64_t c = 0; c < C; c += VL) f(q * C + c, c, std::min(VL, C - c), true);
    });
  } else {
    at::parallel_for(0, s.N * C, grain_for(hw), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t i = 0; i < hw; i += VL) f(p * hw + i, p % C, std::min(VL, hw - i), false);
    });
  }
}

template <typename T, int A>
void scale_shift_act_impl(const ConvShape& s, T* out, const T* scale, const T* shift) {
  for_each_output<T>(s, [&](int64_t i, int64_t c, int64_t cnt, bool vec_c) {
    V<T> sc = vec_c ? load(scale + c, cnt) : V<T>(scale[c]);
    V<T> sh = vec_c ? load(shift + c, cnt) : V<T>(shift[c]);
    store(act_fwd<A>(at::vec::fmadd(load(out + i, cnt), sc, sh)), out + i, cnt);
  });
}

template <typename T>
void scale_shift_act(const ConvShape& s, Act a, T* out, const T* scale, const T* shift) {
  dispatch_act(a, [&](auto A) { scale_shift_act_impl<T, decltype(A)::value>(s, out, scale, shift); });
}

// ---- backward: recompute, activation, BN backward --------------------------------------------

// The BN/activation backward terms of one vector of outputs, the seven coefficients of BwdParams in
// registers: per channel vector (NHWC, cnt channels from c) or one channel broadcast (NCHW plane).
template <typename T, int A>
struct BnActGrad {
  V<T> a0, a1, ga, be, k1, k2, k3;
  static BnActGrad lanes(const BwdParams<T>& p, int64_t c, int64_t cnt) {
    return {load(p.a0 + c, cnt), load(p.a1 + c, cnt), load(p.gamma + c, cnt), load(p.beta + c, cnt),
            load(p.k1 + c, cnt), load(p.k2 + c, cnt), load(p.k3 + c, cnt)};
  }
  static BnActGrad channel(const BwdParams<T>& p, int64_t c) {
    return {V<T>(p.a0[c]), V<T>(p.a1[c]), V<T>(p.gamma[c]), V<T>(p.beta[c]),
            V<T>(p.k1[c]), V<T>(p.k2[c]), V<T>(p.k3[c])};
  }
  V<T> xhat(const V<T>& z) const { return (z + a0) * a1; }  // subtract first: exact near the mean
  // grad_out * act'(y), y = xhat * gamma + beta
  V<T> g(const V<T>& go, const V<T>& xh) const { return act_bwd<A>(go, at::vec::fmadd(xh, ga, be)); }
  // the conv-output gradient k1 * g + k2 * xhat + k3
  V<T> gz(const V<T>& g, const V<T>& xh) const { return at::vec::fmadd(k1, g, at::vec::fmadd(k2, xh, k3)); }
};

// xhat = (z + a0) * a1, y = xhat * gamma + beta, g = grad_out * act'(y) for one NHWC row of W pixels
// whose bias-free conv output is z. out (nullable): k1 * g + k2 * xhat + k3 (may alias z: each
// element is read before it is written). s1 / s2 (nullable): the row's per-channel sums of g and
// g * xhat. Channel vector by channel vector, with that vector's seven coefficients and the sums in
// registers (in the conv's epilogue they cost ~12 loads and stores per vector).
template <typename T, int A>
inline void bn_act_grad_row(const T* z, const T* go, T* out, int64_t W, int64_t C, const BwdParams<T>& p, T* s1,
                            T* s2) {
  constexpr int64_t VL = V<T>::size();
  for (int64_t c = 0; c < C; c += VL) {
    const int64_t cnt = std::min(VL, C - c);
    const auto t = BnActGrad<T, A>::lanes(p, c, cnt);
    V<T> v1(0), v2(0);
    for (int64_t wo = 0; wo < W; ++wo) {
      const int64_t i = wo * C + c;
      const V<T> xh = t.xhat(load(z + i, cnt));
      const V<T> g = t.g(load(go + i, cnt), xh);
      if (out) store(t.gz(g, xh), out + i, cnt);
      if (s1) {
        v1 = v1 + g;  // lanes past cnt stay 0: their loads are zero-filled
        v2 = at::vec::fmadd(g, xh, v2);
      }
    }
    if (s1) {
      store(v1, s1 + c, cnt);
      store(v2, s2 + c, cnt);
    }
  }
}

// Zeroes the outputs of a backward that are present (sum_gy / sum_gyx, gw / gb: nullable).
inline void clear_backward_sums(int64_t C, int64_t taps, double* sum_gy, double* sum_gyx, double* gw, double* gb) {
  if (sum_gy) {
    std::fill(sum_gy, sum_gy + C, 0.0);
    std::fill(sum_gyx, sum_gyx + C, 0.0);
  }
  if (gw) {
    std::fill(gw, gw + C * taps, 0.0);
    std::fill(gb, gb + C, 0.0);
  }
}

// ---- backward: the training sums from the forward's output --------------------------------------

// NHWC out / grad_out of P = N * Ho * Wo pixels, ReLU or ReLU6: wherever the activation passes a
// gradient, out = y = gamma * xhat + beta, so g = grad_out * act'(out) and g * xhat = g * (out -
// beta) / gamma need no conv. sum_gy[c] = sum of g, sum_gob[c] = sum of g * (out - beta) (the
// caller divides by gamma). Pixel after pixel, every channel, so both tensors are read in order:
// groups of channel vectors with the sums in registers walking a block's pixels read each pixel's
// channels as a strided gather that the hardware prefetchers did not follow (8x144x56x56, 1
// thread: 1.8 ms for this pass against 0.8 for a conv recompute that reads as many bytes). Sums in
// T (L1-resident rows of C) over kSumPixels pixels, then in double per thread, merged in thread
// order.
constexpr int64_t kSumPixels = 64;
template <typename T, int A>
void output_sums_impl(const ConvShape& s, const T* out, const T* go, const T* beta, double* sum_gy,
                      double* sum_gob) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C, P = s.N * s.Ho * s.Wo, blocks = (P + kSumPixels - 1) / kSumPixels;
  std::fill(sum_gy, sum_gy + C, 0.0);
  std::fill(sum_gob, sum_gob + C, 0.0);
  if (P == 0 || C == 0) return;
  const int nt = at::get_num_threads();
  std::vector<double> t1(nt * C, 0.0), t2(nt * C, 0.0);
  const int64_t whole = C / VL * VL;
  at::parallel_for(0, blocks, grain_for(kSumPixels * C), [&](int64_t b0, int64_t b1) {
    AlignedVec<T> r1(C), r2(C);
    std::vector<double> d1(C, 0.0), d2(C, 0.0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      std::fill(r1.begin(), r1.end(), T(0));
      std::fill(r2.begin(), r2.end(), T(0));
      for (int64_t px = blk * kSumPixels, pe = std::min(P, px + kSumPixels); px < pe; ++px) {
        const T* o = out + px * C;
        const T* d = go + px * C;
        for (int64_t c = 0; c < whole; c += VL) {
          const V<T> ov = V<T>::loadu(o + c);
          const V<T> g = act_bwd<A, T>(V<T>::loadu(d + c), ov);
          (V<T>::loadu(r1.data() + c) + g).store(r1.data() + c);
          at::vec::fmadd(g, ov - V<T>::loadu(beta + c), V<T>::loadu(r2.data() + c)).store(r2.data() + c);
        }
        if (whole < C) {  // the last partial vector; lanes past it load as 0 and give g = 0
          const int64_t c = whole, cnt = C - whole;
          const V<T> ov = load(o + c, cnt);
          const V<T> g = act_bwd<A, T>(load(d + c, cnt), ov);
          store(load(r1.data() + c, cnt) + g, r1.data() + c, cnt);
          store(at::vec::fmadd(g, ov - load(beta + c, cnt), load(r2.data() + c, cnt)), r2.data() + c, cnt);
        }
      }
      for (int64_t k = 0; k < C; ++k) {
        d1[k] += r1[k];
        d2[k] += r2[k];
      }
    }
    const int tid = at::get_thread_num();
    for (int64_t k = 0; k < C; ++k) {
      t1[tid * C + k] += d1[k];
      t2[tid * C + k] += d2[k];
    }
  });
  for (int t = 0; t < nt; ++t)
    for (int64_t k = 0; k < C; ++k) {
      sum_gy[k] += t1[t * C + k];
      sum_gob[k] += t2[t * C + k];
    }
}

template <typename T>
void output_sums(const ConvShape& s, Act a, const T* out, const T* go, const T* beta, double* sum_gy,
                 double* sum_gob) {
  if (a == Act::ReLU)  // else ReLU6: the caller takes this path for these two only
    output_sums_impl<T, int(Act::ReLU)>(s, out, go, beta, sum_gy, sum_gob);
  else
    output_sums_impl<T, int(Act::ReLU6)>(s, out, go, beta, sum_gy, sum_gob);
}

// ---- backward: input gradient (transposed depthwise conv, as a gather) ------------------------

// NHWC input gradient for any stride (stride 2 in MobileNets). Input pixel (hi, wi) gathers the
// taps (kh, kw) whose output pixel ((hi + PH - kh*DH) / SH, (wi + PW - kw*DW) / SW) exists (the
// division exact). Along a row, the columns of one residue class mod SW share their taps kw, and
// their output columns advance by one per step: a run. Per run and channel vector, the run's
// weights are loaded once and the loop over its columns only loads gz (NR x NK taps known at
// compile time for kernel size 3 at stride 2, the common case). Before: the tap lists were walked
// per pixel and channel vector with every weight reloaded, 40% of the kernel time of a training
// step at 1x96x112x112 stride 2.
struct TapList {
  int n = 0;
  int64_t k[4], o[4];  // taps and their output index (of the run's first column)
};

// f(k, o) for the taps k of input index i whose output index o = (i + P - k*D) / S exists: the
// division exact and o inside [0, O).
template <typename F>
inline void for_each_tap(int64_t i, int64_t P, int64_t D, int64_t S, int64_t K, int64_t O, F&& f) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t q = i + P - k * D;
    if (q >= 0 && q % S == 0 && q / S < O) f(k, q / S);
  }
}

// The taps of input index i (for_each_tap); false if more than 4.
inline bool taps_at(int64_t i, int64_t P, int64_t D, int64_t S, int64_t K, int64_t O, TapList& t) {
  t.n = 0;
  bool fits = true;
  for_each_tap(i, P, D, S, K, O, [&](int64_t k, int64_t o) {
    if (t.n == 4) {
      fits = false;
      return;
    }
    t.k[t.n] = k;
    t.o[t.n++] = o;
  });
  return fits;
}

struct ColRun {
  int64_t wi0, len;  // columns wi0 + j * SW for j < len; output column of tap b: col.o[b] + j
  TapList col;
};

// NR x NK row x column taps at compile time, or 0 x 0: the run's own counts.
template <typename T, int NR, int NK>
inline void bwd_input_run(const ConvShape& s, const T* const* gzr, const TapList& row, const ColRun& run,
                          const T* w, T* gr) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C;
  const int R = NR > 0 ? NR : row.n, K = NK > 0 ? NK : run.col.n;
  for (int64_t c = 0; c < C; c += VL) {
    const int64_t cnt = std::min(VL, C - c);
    V<T> wv[4][4];
    for (int a = 0; a < R; ++a)
      for (int b = 0; b < K; ++b) wv[a][b] = load(w + (row.k[a] * s.KW + run.col.k[b]) * C + c, cnt);
    const T* src[4][4];
    for (int a = 0; a < R; ++a)
      for (int b = 0; b < K; ++b) src[a][b] = gzr[a] + run.col.o[b] * C + c;
    T* dst = gr + run.wi0 * C + c;
    for (int64_t j = 0; j < run.len; ++j) {
      V<T> acc(0);
      for (int a = 0; a < R; ++a)
        for (int b = 0; b < K; ++b) acc = at::vec::fmadd(wv[a][b], load(src[a][b] + j * C, cnt), acc);
      store(acc, dst + j * s.SW * C, cnt);
    }
  }
}

// NHWC input gradient, one or two input rows at a time, from a band of gz rows: in backward_rows,
// and in the small-plane NCHW backward on its slabs. Three ways, chosen once per shape:
//  * stride 1 with padding <= (K - 1) * D: conv(gz, flipped w) with padding (K-1)*D - P on the
//    forward's row kernel;
//  * other strides: the column runs of bwd_input_run;
//  * more than 4 taps per input row or column: the tap lists walked per pixel.
template <typename T>
struct NhwcInputGrad {
  using Taps = std::vector<std::pair<int64_t, int64_t>>;  // (tap, output index)
  ConvShape s, t;  // t: the flipped conv (stride 1)
  bool flip = false, use_runs = true;
  AlignedVec<T> wf;  // stride 1: the flipped weights [taps][C]
  const T* w = nullptr;
  std::vector<ColRun> runs;
  std::vector<TapList> rows;  // per input row (the same for every image)
  std::vector<Taps> row_taps, col_taps;  // the per-pixel fallback

  explicit NhwcInputGrad(const ConvShape& shape) : s(shape), t(shape) {
    const int64_t OH = (s.KH - 1) * s.DH, OW = (s.KW - 1) * s.DW;
    flip = s.SH == 1 && s.SW == 1 && OH >= s.PH && OW >= s.PW;
    if (flip) {
      t.H = s.Ho; t.W = s.Wo; t.Ho = s.H; t.Wo = s.W; t.PH = OH - s.PH; t.PW = OW - s.PW;
      return;
    }
    for (int64_t r0 = 0; r0 < std::min(s.SW, s.W) && use_runs; ++r0) {
      for (int64_t wi = r0; wi < s.W && use_runs; wi += s.SW) {
        TapList tl;
        use_runs = taps_at(wi, s.PW, s.DW, s.SW, s.KW, s.Wo, tl);
        ColRun* last = runs.empty() ? nullptr : &runs.back();
        bool same = last && last->wi0 % s.SW == r0 && last->col.n == tl.n;
        for (int b = 0; same && b < tl.n; ++b) same = last->col.k[b] == tl.k[b];
        if (same) ++last->len;
        else runs.push_back({wi, 1, tl});
      }
    }
    rows.resize(s.H);
    for (int64_t hi = 0; hi < s.H && use_runs; ++hi) use_runs = taps_at(hi, s.PH, s.DH, s.SH, s.KH, s.Ho, rows[hi]);
    if (use_runs) return;
    auto lists = [](int64_t i, int64_t P, int64_t D, int64_t S, int64_t K, int64_t O, Taps& out) {
      for_each_tap(i, P, D, S, K, O, [&](int64_t k, int64_t o) { out.emplace_back(k, o); });
    };
    row_taps.resize(s.H);
    col_taps.resize(s.W);
    for (int64_t hi = 0; hi < s.H; ++hi) lists(hi, s.PH, s.DH, s.SH, s.KH, s.Ho, row_taps[hi]);
    for (int64_t wi = 0; wi < s.W; ++wi) lists(wi, s.PW, s.DW, s.SW, s.KW, s.Wo, col_taps[wi]);
  }

  // The weights, [taps][C] for C channels (the slabs of the small-plane backward change C).
  void set_weights(const T* weights, int64_t C) {
    s.C = t.C = C;
    w = weights;
    if (!flip) return;
    wf.resize(s.taps() * C);
    for (int64_t kh = 0; kh < s.KH; ++kh)
      for (int64_t kw = 0; kw < s.KW; ++kw)
        std::memcpy(wf.data() + ((s.KH - 1 - kh) * s.KW + (s.KW - 1 - kw)) * C, w + (kh * s.KW + kw) * C,
                    sizeof(T) * C);
  }

  // Rows [hi, hi_end) of one image's input gradient gxn from gz rows [ho0, ho0 + nrows) of that
  // image at gzb (row ho at gzb + (ho - ho0) * Wo * C), which must hold every gz row those input
  // rows read (the band of backward_rows). Returns the rows done: two where nhwc_conv_rows pairs
  // them (the flipped conv of a 3x3 kernel), else one.
  int64_t rows_from(const T* gzb, int64_t ho0, int64_t nrows, T* gxn, int64_t hi, int64_t hi_end) const {
    const int64_t C = s.C;
    T* gr = gxn + hi * s.W * C;
    if (flip) {
      // The band is the flipped conv's whole input: gz rows outside it are its padding, and an
      // input row reads none of them but rows outside the image.
      ConvShape u = t;
      u.N = 1;
      u.H = nrows;
      u.PH = t.PH + ho0;
      return nhwc_conv_rows(u, gzb, wf.data(), hi, hi_end, [&](int64_t dr, int64_t wi, int64_t c, int64_t cnt, V<T> acc) {
        store(acc, gr + (dr * s.W + wi) * C + c, cnt);
      });
    }
    if (!use_runs) {
      constexpr int64_t VL = V<T>::size();
      for (int64_t wi = 0; wi < s.W; ++wi)
        for (int64_t c = 0; c < C; c += VL) {
          const int64_t cnt = std::min(VL, C - c);
          V<T> acc(0);
          for (auto [kh, ho] : row_taps[hi])
            for (auto [kw, wo] : col_taps[wi])
              acc = at::vec::fmadd(load(w + (kh * s.KW + kw) * C + c, cnt),
                                   load(gzb + ((ho - ho0) * s.Wo + wo) * C + c, cnt), acc);
          store(acc, gr + wi * C + c, cnt);
        }
      return 1;
    }
    const TapList& rt = rows[hi];
    const T* gzr[4];
    for (int a = 0; a < rt.n; ++a) gzr[a] = gzb + (rt.o[a] - ho0) * s.Wo * C;
    for (const ColRun& run : runs) {
      const int nr = rt.n, nk = run.col.n;
      if (nr == 0 || nk == 0) {
        for (int64_t j = 0; j < run.len; ++j) std::memset(gr + (run.wi0 + j * s.SW) * C, 0, sizeof(T) * C);
      } else if (nr == 1 && nk == 1) {
        bwd_input_run<T, 1, 1>(s, gzr, rt, run, w, gr);
      } else if (nr == 1 && nk == 2) {
        bwd_input_run<T, 1, 2>(s, gzr, rt, run, w, gr);
      } else if (nr == 2 && nk == 1) {
        bwd_input_run<T, 2, 1>(s, gzr, rt, run, w, gr);
      } else if (nr == 2 && nk == 2) {
        bwd_input_run<T, 2, 2>(s, gzr, rt, run, w, gr);
      } else {
        bwd_input_run<T, 0, 0>(s, gzr, rt, run, w, gr);
      }
    }
    return 1;
  }
};

// ---- backward: weight and bias gradients -----------------------------------------------------

// NHWC, one output row, taps rows [kh0, kh1) inside the image: columns [wlo, whi) are interior; per
// channel vector the K*K tap sums stay in registers across the row (taps outside add nothing).
template <typename T, int K>
inline void wgrad_row_fast(const ConvShape& s, const T* xn, const T* grow, int64_t hi0, int64_t kh0, int64_t kh1,
                           int64_t wlo, int64_t whi, T* rw, T* rb) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C;
  auto chunk = [&](int64_t c, auto full) {
    constexpr bool FULL = decltype(full)::value;
    const int64_t cnt = FULL ? VL : C - c;
    auto ld = [&](const T* p) { if constexpr (FULL) return V<T>::loadu(p); else return V<T>::loadu(p, cnt); };
    V<T> acc[K * K];
    for (int t = 0; t < K * K; ++t) acc[t] = V<T>(0);
    V<T> bs(0);
    for (int64_t wo = wlo; wo < whi; ++wo) {
      const V<T> g = ld(grow + wo * C + c);
      bs = bs + g;
      const T* xr = xn + (hi0 * s.W + wo * s.SW - s.PW) * C + c;
      for (int kh = 0; kh < K; ++kh) {
        if (kh < kh0 || kh >= kh1) continue;  // the row above / below the image (same for the whole row)
        for (int kw = 0; kw < K; ++kw)
          acc[kh * K + kw] = at::vec::fmadd(g, ld(xr + (kh * s.DH * s.W + kw * s.DW) * C), acc[kh * K + kw]);
      }
    }
    for (int t = 0; t < K * K; ++t) store(load(rw + t * C + c, cnt) + acc[t], rw + t * C + c, cnt);
    store(load(rb + c, cnt) + bs, rb + c, cnt);
  };
  int64_t c = 0;
  for (; c + VL <= C; c += VL) chunk(c, std::true_type{});
  if (c < C) chunk(c, std::false_type{});
}

// NCHW, one plane in the phase buffer: sums over the plane of g * x for every tap (registers when
// TAPS > 0), flushed to double every ~2048 pixels (every 16 rows cost 10% of the pass at 28x28).
// g: the plane's conv-output gradient, rows gs apart.
template <typename T, int TAPS>
inline void wgrad_plane_t(const ConvShape& s, const PlaneBuf& d, const int64_t* off, const T* buf, const T* g,
                          int64_t gs, double* out) {
  constexpr int64_t VL = V<T>::size();
  constexpr int64_t NT = TAPS > 0 ? TAPS + 1 : 1;
  const int64_t taps = TAPS > 0 ? TAPS : s.taps();
  V<T> acc_fixed[NT];
  std::vector<V<T>> acc_dyn(TAPS > 0 ? 0 : taps + 1);
  V<T>* acc = TAPS > 0 ? acc_fixed : acc_dyn.data();
  auto flush = [&] {
    for (int64_t t = 0; t <= taps; ++t) {
      out[t] += hsum(acc[t], VL);
      acc[t] = V<T>(0);
    }
  };
  for (int64_t t = 0; t <= taps; ++t) acc[t] = V<T>(0);
  const int64_t flush_rows = std::max<int64_t>(1, 2048 / s.Wo);  // ~2K pixels per float sum
  for (int64_t ho = 0; ho < s.Ho; ++ho) {
    const T* base = buf + ho * s.SH * d.cols;
    for (int64_t wo = 0; wo < s.Wo; wo += VL) {
      const V<T> gv = load(g + ho * gs + wo, std::min(VL, s.Wo - wo));  // zero past the row end
      for (int64_t t = 0; t < taps; ++t) acc[t] = at::vec::fmadd(gv, V<T>::loadu(base + off[t] + wo), acc[t]);
      acc[taps] = acc[taps] + gv;
    }
    if ((ho + 1) % flush_rows == 0) flush();
  }
  flush();
}

// NHWC: the weight and bias gradient sums of output row (n, ho) added to rw [taps][C] and rb [C]
// (in T; the caller flushes them to double).
template <typename T>
inline void wgrad_row(const ConvShape& s, const T* x, const T* grow, int64_t n, int64_t ho, T* rw, T* rb) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C;
  const ColRange cols_in = interior_columns(s, s.KW, s.DW, s.SW);
  const int64_t wlo = cols_in.lo, whi = cols_in.hi;
  const int64_t hi0 = ho * s.SH - s.PH;
  int64_t kh0, kh1;
  tap_range(hi0, s.DH, s.KH, s.H, kh0, kh1);
  const T* xn = x + n * s.H * s.W * C;
  auto slow = [&](int64_t wo) {
    const int64_t wi0 = wo * s.SW - s.PW;
    int64_t kw0, kw1;
    tap_range(wi0, s.DW, s.KW, s.W, kw0, kw1);
    for (int64_t c = 0; c < C; c += VL) {
      const int64_t cnt = std::min(VL, C - c);
      const V<T> g = load(grow + wo * C + c, cnt);
      store(load(rb + c, cnt) + g, rb + c, cnt);
      for (int64_t kh = kh0; kh < kh1; ++kh) {
        const T* xr = xn + ((hi0 + kh * s.DH) * s.W + wi0) * C + c;
        T* wr = rw + kh * s.KW * C + c;
        for (int64_t kw = kw0; kw < kw1; ++kw)
          store(at::vec::fmadd(g, load(xr + kw * s.DW * C, cnt), load(wr + kw * C, cnt)), wr + kw * C, cnt);
      }
    }
  };
  if (s.KH == s.KW && (s.KH == 3 || s.KH == 5)) {
    for (int64_t wo = 0; wo < wlo; ++wo) slow(wo);
    if (s.KH == 3) wgrad_row_fast<T, 3>(s, xn, grow, hi0, kh0, kh1, wlo, whi, rw, rb);
    else wgrad_row_fast<T, 5>(s, xn, grow, hi0, kh0, kh1, wlo, whi, rw, rb);
    for (int64_t wo = whi; wo < s.Wo; ++wo) slow(wo);
  } else {
    for (int64_t wo = 0; wo < s.Wo; ++wo) slow(wo);
  }
}

// NHWC (NCHW: backward_planes), the whole backward in one pass over chunks of output rows (a chunk:
// one image, or a part of one when there are fewer images than threads). Per chunk, z = conv(x, w)
// is recomputed two rows at a time (nhwc_conv_rows) into a band of a few rows, and bn_act_grad_row
// takes each row to g and, with sums, the per-channel sums of g and g * xhat. If gx or gw, gz =
// k1 * g + k2 * xhat + k3 replaces z in the band; there it feeds its row's weight and bias
// gradient sums (wgrad_row) and, as soon as the band holds every gz row an input row reads, that
// input row's gradient (NhwcInputGrad::rows_from). gz never goes to memory. An input row belongs to
// the chunk of the last gz row it reads; a chunk first recomputes the gz rows before its own that
// its input rows read (for 3x3 at stride 1 or 2, one row). Training calls this twice: the sums
// (gx, gw null: no gz, no extra rows), then with k2 / k3 from them, the gradients (sum_gy null).
// Before, four passes over whole tensors (z and the sums; gz from z; gx from gz; gw from gz) wrote
// z, wrote gz and read it twice.
template <typename T, int A>
void backward_rows_impl(const ConvShape& s, const T* x, const T* w, const BwdParams<T>& p, const T* go, T* gx,
                        double* gw, double* gb, double* sum_gy, double* sum_gyx) {
  const int64_t C = s.C, taps = s.taps(), row = s.Wo * C;
  const bool sums = sum_gy != nullptr, grads = gx || gw;
  clear_backward_sums(C, taps, sum_gy, sum_gyx, gw, gb);
  if (s.N == 0) return;
  // Input row hi reads gz rows in [lo[hi], own[hi]] (a row that reads none: own of the row before).
  std::vector<int64_t> lo(s.H), own(s.H);
  int64_t keep = 0;  // the most gz rows before its own that an input row reads
  for (int64_t hi = 0, last = 0; hi < s.H; ++hi) {
    int64_t mn = s.Ho, mx = -1;
    for_each_tap(hi, s.PH, s.DH, s.SH, s.KH, s.Ho, [&](int64_t, int64_t o) {
      mn = std::min(mn, o);
      mx = std::max(mx, o);
    });
    if (mx >= 0) last = mx;
    own[hi] = last;
    lo[hi] = mx >= 0 ? mn : last;
    keep = std::max(keep, own[hi] - lo[hi]);
  }
  // The input rows by their own row; first[ho]: the first of them whose own row is >= ho.
  std::vector<int64_t> ord(s.H), first(s.Ho + 1);
  for (int64_t hi = 0; hi < s.H; ++hi) ord[hi] = hi;
  std::stable_sort(ord.begin(), ord.end(), [&](int64_t a, int64_t b) { return own[a] < own[b]; });
  for (int64_t ho = 0, i = 0; ho <= s.Ho; ++ho) {
    while (i < s.H && own[ord[i]] < ho) ++i;
    first[ho] = i;
  }
  // Enough chunks that every thread gets the same number of them.
  const int nt = at::get_num_threads();
  const int64_t per_thread = (s.N + nt - 1) / nt;
  const int64_t parts = std::min(s.Ho, std::max<int64_t>(1, (nt * per_thread + s.N - 1) / s.N));
  const int64_t chunks = s.N * parts;
  const int64_t hold = gx ? keep : 0;  // band rows kept when it moves on
  const int64_t cap = hold + (gx ? 8 : 2);  // band rows
  std::vector<double> t1(sums ? nt * C : 0, 0.0), t2(sums ? nt * C : 0, 0.0), tw(gw ? nt * (taps + 1) * C : 0, 0.0);
  at::parallel_for(0, chunks, grain_for(3 * s.Ho / parts * row * taps), [&](int64_t c0, int64_t c1) {
    NhwcInputGrad<T> ig(s);
    if (gx) ig.set_weights(w, C);
    const AlignedBuf<T> band = aligned_buf<T>(cap * row);  // not zeroed: at 7x7x960, zeroing it was 6% of the backward
    AlignedVec<T> r1s(C), r2s(C), rw(gw ? taps * C : 0, T(0)), rb(gw ? C : 0, T(0));
    std::vector<double> d1(sums ? C : 0, 0.0), d2(sums ? C : 0, 0.0), dw(gw ? (taps + 1) * C : 0, 0.0);
    // Weight gradient sums in T over ~256 output pixels, then into double: flushing every row cost
    // a memset and a double add of taps * C values per row, as much as the row itself at 7x7.
    const int64_t flush_rows = std::max<int64_t>(1, 256 / s.Wo);
    int64_t pending = 0;
    auto flush = [&] {
      for (int64_t i = 0; i < taps * C; ++i) dw[i] += rw[i];
      for (int64_t c = 0; c < C; ++c) dw[taps * C + c] += rb[c];
      std::fill(rw.begin(), rw.end(), T(0));
      std::fill(rb.begin(), rb.end(), T(0));
      pending = 0;
    };
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t n = ch / parts, part = ch % parts;
      // Split points rounded up: the later part also recomputes the gz rows before it (7 rows in
      // 2 parts: 4 + 3, each part then 4 gz rows, and 3 and 4 input rows).
      const int64_t a = (part * s.Ho + parts - 1) / parts, b = ((part + 1) * s.Ho + parts - 1) / parts;
      const T* gon = go + n * s.Ho * row;
      T* gxn = gx ? gx + n * s.H * s.W * C : nullptr;
      int64_t b0 = std::max<int64_t>(0, a - hold);  // the band holds gz rows [b0, pe)
      int64_t next = first[a];                                 // the next input row (in ord) to do
      const int64_t last = first[b];
      for (int64_t pe = b0; pe < b;) {
        if (pe + 2 > b0 + cap) {  // full: keep the rows the input rows still to do may read
          const int64_t nb0 = std::max(b0, pe - hold);
          std::memmove(band.get(), band.get() + (nb0 - b0) * row, sizeof(T) * (pe - nb0) * row);
          b0 = nb0;
        }
        T* zb = band.get() + (pe - b0) * row;
        const int64_t k = nhwc_conv_rows(s, x, w, n * s.Ho + pe, n * s.Ho + b,
                                         [&](int64_t dr, int64_t wo, int64_t c, int64_t cnt, V<T> acc) {
                                           store(acc, zb + dr * row + wo * C + c, cnt);
                                         });
        for (int64_t q = pe; q < pe + k; ++q) {
          T* zr = zb + (q - pe) * row;
          const bool mine = q >= a;
          bn_act_grad_row<T, A>(zr, gon + q * row, grads ? zr : nullptr, s.Wo, C, p,
                                sums && mine ? r1s.data() : nullptr, r2s.data());
          if (!mine) continue;
          if (sums)
            for (int64_t c = 0; c < C; ++c) {
              d1[c] += r1s[c];
              d2[c] += r2s[c];
            }
          if (gw) {
            wgrad_row(s, x, zr, n, q, rw.data(), rb.data());
            if (++pending == flush_rows) flush();
          }
        }
        pe += k;
        if (!gx) continue;
        const int64_t ready = first[pe];
        while (next < std::min(ready, last)) {
          const int64_t hi = ord[next];
          const int64_t end = next + 1 < std::min(ready, last) && ord[next + 1] == hi + 1 ? hi + 2 : hi + 1;
          next += ig.rows_from(band.get(), b0, pe - b0, gxn, hi, end);
        }
      }
    }
    if (gw && pending > 0) flush();
    const int tid = at::get_thread_num();
    for (int64_t c = 0; c < C && sums; ++c) {
      t1[tid * C + c] += d1[c];
      t2[tid * C + c] += d2[c];
    }
    for (int64_t i = 0; i < (taps + 1) * C && gw; ++i) tw[tid * (taps + 1) * C + i] += dw[i];
  });
  for (int t = 0; t < nt; ++t) {
    for (int64_t c = 0; c < C && sums; ++c) {
      sum_gy[c] += t1[t * C + c];
      sum_gyx[c] += t2[t * C + c];
    }
    if (!gw) continue;
    const double* src = tw.data() + t * (taps + 1) * C;
    for (int64_t k = 0; k < taps; ++k)
      for (int64_t c = 0; c < C; ++c) gw[c * taps + k] += src[k * C + c];
    for (int64_t c = 0; c < C; ++c) gb[c] += src[taps * C + c];
  }
}

template <typename T>
void backward_rows(const ConvShape& s, Act a, const T* x, const T* w, const BwdParams<T>& p, const T* go, T* gx,
                   double* gw, double* gb, double* sum_gy, double* sum_gyx) {
  dispatch_act(a, [&](auto A) { backward_rows_impl<T, decltype(A)::value>(s, x, w, p, go, gx, gw, gb, sum_gy, sum_gyx); });
}

// ---- backward: NCHW, one pass per plane --------------------------------------------------------

// The input gradient of one NCHW plane from its conv-output gradient gz, which the caller first
// writes into this object's buffer (row ho: Wo values at gz_row(ho)). The rest of the buffer is
// zeroed once per task and never written, so it stays zero from plane to plane.
//  * stride 1: gx = correlation of the zero-bordered gz with the flipped taps (the forward's
//    register-blocked kernels).
//  * other strides, by phases: input column wi = SW * j + r gathers the taps kw with
//    r + PW - kw*DW divisible by SW, from output column j + (r + PW - kw*DW) / SW, and input row hi
//    the taps kh of for_each_tap. Each (row, phase) is then a sum of a few gz rows over contiguous
//    columns, and stride 2's two phases are interleaved into the gx row with one permute pair.
//    The old code correlated a zero-upsampled plane: at stride 2, 3 of every 4 products were
//    with inserted zeros, and the plane was cleared and scattered per channel.
template <typename T>
struct InputGradPlane {
  static constexpr int64_t VL = V<T>::size();
  struct ColTap {
    int64_t kw, delta;  // tap column and output column offset (wo = j + delta)
  };
  const ConvShape& s;
  const bool unit;                             // stride 1
  int64_t rows = 0, cols = 0, r0 = 0, c0 = 0;  // gz (ho, wo) at buf[(r0 + ho) * cols + c0 + wo]
  int64_t origin = 0;                          // stride 1: where the correlation's input starts
  AlignedVec<T> buf, wflip;
  std::vector<int64_t> off, rn, rk, ro;  // strided: input row hi's rn[hi] taps rk / ro[hi * KH + a]
  std::vector<std::vector<ColTap>> phase;  // strided: the column taps of each phase r < SW
  std::vector<T> wv;  // a row's tap weights (scalars: storing broadcast vectors per row stalled)
  std::vector<const T*> pt;

  explicit InputGradPlane(const ConvShape& sh) : s(sh), unit(sh.SH == 1 && sh.SW == 1) {
    const int64_t OH = (s.KH - 1) * s.DH, OW = (s.KW - 1) * s.DW, taps = s.taps();
    if (unit) {
      // U[r][q] = gz[r - OH + PH][q - OW + PW], read for r < H + OH, q < W + OW (+ one vector of
      // overrun); the margins mr / mc hold gz rows / columns no input pixel reads (padding beyond
      // the kernel's reach), + 8 spare rows as before.
      const int64_t mr = std::max<int64_t>(0, s.PH - OH), mc = std::max<int64_t>(0, s.PW - OW);
      rows = mr + std::max(s.H + OH, s.Ho + OH - s.PH) + 8;
      cols = (mc + std::max(s.W + OW, s.Wo + OW - s.PW) + 2 * VL - 1) / VL * VL;
      r0 = mr + OH - s.PH;
      c0 = mc + OW - s.PW;
      origin = mr * cols + mc;
      off.resize(taps);
      for (int64_t kh = 0; kh < s.KH; ++kh)
        for (int64_t kw = 0; kw < s.KW; ++kw)
          off[kh * s.KW + kw] = (s.KH - 1 - kh) * s.DH * cols + (s.KW - 1 - kw) * s.DW;
      wflip.resize(taps);
    } else {
      phase.resize(s.SW);
      int64_t dmin = 0, dmax = 0;
      for (int64_t r = 0; r < s.SW; ++r)
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const int64_t q = r + s.PW - kw * s.DW;
          if ((q % s.SW + s.SW) % s.SW != 0) continue;
          phase[r].push_back({kw, q / s.SW});  // exact division
          dmin = std::min(dmin, q / s.SW);
          dmax = std::max(dmax, q / s.SW);
        }
      // Phase 0 has the most columns, J; its vector loads reach column J - 1 + dmax + VL - 1.
      const int64_t J = (s.W + s.SW - 1) / s.SW;
      rows = s.Ho;
      c0 = -dmin;
      cols = (c0 + std::max(s.Wo, J + dmax) + 2 * VL - 1) / VL * VL;
      // the row taps of every input row, once per task (their divisions cost more than a
      // 56-wide row's FMAs when done per plane)
      rn.assign(s.H, 0);
      rk.resize(s.H * s.KH);
      ro.resize(s.H * s.KH);
      for (int64_t hi = 0; hi < s.H; ++hi)
        for_each_tap(hi, s.PH, s.DH, s.SH, s.KH, s.Ho, [&](int64_t kh, int64_t ho) {
          rk[hi * s.KH + rn[hi]] = kh;
          ro[hi * s.KH + rn[hi]++] = ho;
        });
      wv.resize(2 * taps);
      pt.resize(2 * taps);
    }
    buf.assign(rows * cols, T(0));
  }

  T* gz_row(int64_t ho) { return buf.data() + (r0 + ho) * cols + c0; }

  // gxp: the plane's input gradient (H x W); wc: the channel's taps.
  void run(const T* wc, T* gxp) {
    if (unit) {
      const int64_t taps = s.taps();
      const T* u = buf.data() + origin;
      auto epi = [&](int64_t hi, int64_t wi, int64_t cnt, V<T> acc) { store(acc, gxp + hi * s.W + wi, cnt); };
      for (int64_t t = 0; t < taps; ++t) wflip[taps - 1 - t] = wc[t];
      if (!nchw_try_fast(s.KH, s.KW, int64_t(1), int64_t(1), s.DH, s.DW, s.H, s.W, u, rows * cols, cols, wflip.data(),
                         epi))
        nchw_core(s.H, s.W, u, cols, off.data(), taps, wc, epi);
      return;
    }
    const int64_t taps = s.taps();
    for (int64_t hi = 0; hi < s.H; ++hi) {
      T* gr = gxp + hi * s.W;
      const int64_t nr = rn[hi];
      const int64_t* kh = rk.data() + hi * s.KH;
      const int64_t* ho = ro.data() + hi * s.KH;
      // The weights and gz row pointers of phase r's taps in this row.
      auto collect = [&](int64_t r, T* w, const T** p) {
        int64_t n = 0;
        for (int64_t a = 0; a < nr; ++a)
          for (const ColTap& ct : phase[r]) {
            w[n] = wc[kh[a] * s.KW + ct.kw];
            p[n++] = buf.data() + ho[a] * cols + c0 + ct.delta;
          }
        return n;
      };
      if (s.SW == 2) {
        const int64_t ne = collect(0, wv.data(), pt.data()), no = collect(1, wv.data() + taps, pt.data() + taps);
        igrad_row_s2_dispatch(ne, no, gr);
        continue;
      }
      for (int64_t r = 0; r < s.SW && r < s.W; ++r) {
        const int64_t n = collect(r, wv.data(), pt.data()), J = (s.W - r + s.SW - 1) / s.SW;
        for (int64_t j = 0; j < J; j += VL) {
          V<T> acc(0);
          for (int64_t t = 0; t < n; ++t) acc = at::vec::fmadd(V<T>(wv[t]), V<T>::loadu(pt[t] + j), acc);
          const int64_t cnt = std::min(VL, J - j);
          if (s.SW == 1) {
            store(acc, gr + j, cnt);
          } else {
            alignas(64) T tmp[VL];
            acc.store(tmp);
            for (int64_t l = 0; l < cnt; ++l) gr[(j + l) * s.SW + r] = tmp[l];
          }
        }
      }
    }
  }

  // Stride 2: the even (ne taps) and odd (no taps) phases of one gx row, NE / NO taps at compile
  // time (-1: the runtime counts).
  template <int NE, int NO>
  void igrad_row_s2(int64_t ne, int64_t no, T* gr) const {
    [[maybe_unused]] const int64_t me = NE >= 0 ? NE : ne, mo = NO >= 0 ? NO : no;
    const int64_t taps = s.taps();
    // compile-time counts: weights broadcast into registers and pointers copied once per row
    constexpr int FE = NE > 0 ? NE : 1, FO = NO > 0 ? NO : 1;
    V<T> we[FE], wo[FO];
    const T* pe[FE];
    const T* po[FO];
    if constexpr (NE >= 0) {
      for (int t = 0; t < NE; ++t) {
        we[t] = V<T>(wv[t]);
        pe[t] = pt[t];
      }
      for (int t = 0; t < NO; ++t) {
        wo[t] = V<T>(wv[taps + t]);
        po[t] = pt[taps + t];
      }
    }
    for (int64_t j = 0; 2 * j < s.W; j += VL) {
      V<T> e(0), o(0);
      if constexpr (NE >= 0) {
        for (int t = 0; t < NE; ++t) e = at::vec::fmadd(we[t], V<T>::loadu(pe[t] + j), e);
        for (int t = 0; t < NO; ++t) o = at::vec::fmadd(wo[t], V<T>::loadu(po[t] + j), o);
      } else {
        for (int64_t t = 0; t < me; ++t) e = at::vec::fmadd(V<T>(wv[t]), V<T>::loadu(pt[t] + j), e);
        for (int64_t t = 0; t < mo; ++t) o = at::vec::fmadd(V<T>(wv[taps + t]), V<T>::loadu(pt[taps + t] + j), o);
      }
      const auto lh = at::vec::interleave2(e, o);
      const int64_t n = s.W - 2 * j;
      store(lh.first, gr + 2 * j, std::min(VL, n));
      if (n > VL) store(lh.second, gr + 2 * j + VL, std::min(VL, n - VL));
    }
  }

  void igrad_row_s2_dispatch(int64_t ne, int64_t no, T* gr) const {
    // 3x3 with padding 1 at stride 2: rows with 1 or 2 taps, even columns 1 tap, odd columns 2.
    if (ne == 1 && no == 2) return igrad_row_s2<1, 2>(ne, no, gr);
    if (ne == 2 && no == 4) return igrad_row_s2<2, 4>(ne, no, gr);
    if (ne == 2 && no == 1) return igrad_row_s2<2, 1>(ne, no, gr);
    if (ne == 4 && no == 2) return igrad_row_s2<4, 2>(ne, no, gr);
    igrad_row_s2<-1, -1>(ne, no, gr);
  }
};

// One row of n values of one NCHW channel: z (the conv output) -> xhat, g, and with store the
// conv-output gradient k1 * g + k2 * xhat + k3 in place of z; with SUMS, v1 / v2 += g and g * xhat
// (lanes past n add nothing).
template <typename T, int A, bool SUMS>
inline void bn_act_grad_line(const BnActGrad<T, A>& t, T* z, const T* go, int64_t n, bool store_gz, V<T>& v1,
                             V<T>& v2) {
  constexpr int64_t VL = V<T>::size();
  for (int64_t i = 0; i < n; i += VL) {
    const int64_t cnt = std::min(VL, n - i);
    const V<T> xh = t.xhat(load(z + i, cnt));
    const V<T> g = t.g(load(go + i, cnt), xh);
    if (store_gz) store(t.gz(g, xh), z + i, cnt);
    if constexpr (SUMS) {
      const V<T> gm = cnt == VL ? g : V<T>::set(V<T>(0), g, cnt);
      v1 = v1 + gm;
      v2 = at::vec::fmadd(gm, xh, v2);
    }
  }
}

// The per-(image, channel) partial sums of an NCHW backward added into its outputs in a fixed
// order (the result does not depend on the threads' chunks): p1 / p2 (nullable) into sum_gy /
// sum_gyx, pw (nullable; taps + 1 values per part, the bias last) into gw / gb.
inline void merge_image_grads(int64_t N, int64_t C, int64_t taps, const double* p1, const double* p2, const double* pw,
                              double* sum_gy, double* sum_gyx, double* gw, double* gb) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t pl = n * C + c;
      if (p1) {
        sum_gy[c] += p1[pl];
        sum_gyx[c] += p2[pl];
      }
      if (pw) {
        const double* src = pw + pl * (taps + 1);
        for (int64_t t = 0; t < taps; ++t) gw[c * taps + t] += src[t];
        gb[c] += src[taps];
      }
    }
}

// The NCHW backward, one task per (n, c) plane (eval) or per channel (training), gz recomputed
// from x in the phase buffer and used while in cache: the weight and bias gradient sums
// (wgrad_plane_t on the same phase buffer) and the input gradient; gz never goes to memory.
//  * eval (k2 = k3 = 0): one pass; the BN sums (if sum_gy) come from the same pass.
//  * training: gz needs the sums over the whole channel first. Per channel: z of every plane and
//    the sums, then k2 / k3, then per plane gz and the gradients. With N == 1 the plane's x and z
//    are still in the buffers, so the conv runs once per backward; with N > 1 each plane is
//    refilled and its conv recomputed (cheaper than keeping N planes of z).
template <typename T, int A>
void backward_planes_impl(const ConvShape& s, const T* x, const T* w, const BwdParams<T>& p, const T* go, T* gx,
                          double* gw, double* gb, double* sum_gy, double* sum_gyx, bool training) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C, taps = s.taps();
  const bool sums = sum_gy != nullptr;
  clear_backward_sums(C, taps, sum_gy, sum_gyx, gw, gb);
  if (s.N == 0) return;
  const PlaneBuf d = plane_buf_dims(s, VL);
  const int64_t planes = s.N * C, hw = s.Ho * s.Wo;
  const std::vector<int64_t> off = plane_offsets(s, d);
  std::vector<double> pw(gw ? planes * (taps + 1) : 0), p1(sums ? planes : 0), p2(sums ? planes : 0);
  const bool grads = gx || gw;
  const double M = double(s.N * hw);

  struct Scratch {
    PlaneScratch<T> sc;
    InputGradPlane<T> ig;
  };
  // z of plane pl into the input gradient's buffer (x into the phase buffer on the way), with the
  // input of plane `next` (if >= 0) prefetched for large inputs (prefetch_planes).
  const bool pf = prefetch_planes<T>(s);
  auto plane_z = [&](Scratch& sr, int64_t pl, int64_t next) {
    sr.sc.fill(s, d, x + s.in_plane(pl));
    const SpreadPrefetch pn(pf && next >= 0 ? x + s.in_plane(next) : nullptr, s.H * s.W * sizeof(T), s.Ho);
    nchw_conv_plane(s, d, off, sr.sc.data(), w + (pl % C) * taps, pn,
                    [&](int64_t ho, int64_t wo, int64_t cnt, V<T> acc) { store(acc, sr.ig.gz_row(ho) + wo, cnt); });
  };
  // A linear pass over the plane's z rows in L1 (in the conv's epilogue the seven coefficients and
  // the sums were spilled to the stack: ~35% of the pass at 1x192x28x28): gz in place of z if
  // store, the sums of g and g * xhat into p1 / p2[pl] if with_sums.
  auto plane_act = [&](Scratch& sr, int64_t pl, const BnActGrad<T, A>& t, bool with_sums, bool store) {
    const T* gop = go + pl * hw;
    V<T> v1(0), v2(0);
    if (!with_sums) {
      for (int64_t ho = 0; ho < s.Ho; ++ho)
        bn_act_grad_line<T, A, false>(t, sr.ig.gz_row(ho), gop + ho * s.Wo, s.Wo, store, v1, v2);
      return;
    }
    double s1 = 0, s2 = 0;
    for (int64_t ho = 0, nv = 0; ho < s.Ho; ++ho) {
      bn_act_grad_line<T, A, true>(t, sr.ig.gz_row(ho), gop + ho * s.Wo, s.Wo, store, v1, v2);
      nv += (s.Wo + VL - 1) / VL;
      if (nv >= 64 || ho == s.Ho - 1) {  // vector sums into double every ~64 vectors
        s1 += hsum(v1, VL);
        s2 += hsum(v2, VL);
        v1 = v2 = V<T>(0);
        nv = 0;
      }
    }
    p1[pl] = s1;
    p2[pl] = s2;
  };
  // The weight / bias gradient sums and the input gradient of plane pl from its gz.
  auto plane_grads = [&](Scratch& sr, int64_t pl) {
    if (gw) {
      double* out = pw.data() + pl * (taps + 1);
      std::fill(out, out + taps + 1, 0.0);
      const T* buf = sr.sc.data();
      const T* g = sr.ig.gz_row(0);
      switch (taps) {
        case 9: wgrad_plane_t<T, 9>(s, d, off.data(), buf, g, sr.ig.cols, out); break;
        case 25: wgrad_plane_t<T, 25>(s, d, off.data(), buf, g, sr.ig.cols, out); break;
        default: wgrad_plane_t<T, 0>(s, d, off.data(), buf, g, sr.ig.cols, out); break;
      }
    }
    if (gx) sr.ig.run(w + (pl % C) * taps, gx + s.in_plane(pl));
  };

  if (!training) {
    at::parallel_for(0, planes, grain_for(3 * hw * taps), [&](int64_t q0, int64_t q1) {
      Scratch sr{PlaneScratch<T>(s, d), InputGradPlane<T>(s)};
      for (int64_t pl = q0; pl < q1; ++pl) {
        plane_z(sr, pl, pl + 1 < q1 ? pl + 1 : -1);
        plane_act(sr, pl, BnActGrad<T, A>::channel(p, pl % C), sums, grads);
        if (grads) plane_grads(sr, pl);
      }
    });
  } else {
    at::parallel_for(0, C, grain_for(4 * s.N * hw * taps), [&](int64_t c0, int64_t c1) {
      Scratch sr{PlaneScratch<T>(s, d), InputGradPlane<T>(s)};
      for (int64_t c = c0; c < c1; ++c) {
        auto t = BnActGrad<T, A>::channel(p, c);
        double s1 = 0, s2 = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t pl = n * C + c;
          plane_z(sr, pl, n + 1 < s.N ? pl + C : -1);
          plane_act(sr, pl, t, true, false);  // the sums only (z stays): gz needs them
          s1 += p1[pl];
          s2 += p2[pl];
        }
        if (!grads) continue;
        BnBackward bn{0.0, 0.0, static_cast<double>(p.k1[c]), 0.0, 0.0};  // the kernel's k1
        bn_train_terms(bn, s1, s2, M);
        t.k2 = V<T>(static_cast<T>(bn.k2));
        t.k3 = V<T>(static_cast<T>(bn.k3));
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t pl = n * C + c;
          if (s.N > 1) plane_z(sr, pl, n + 1 < s.N ? pl + C : -1);
          plane_act(sr, pl, t, false, true);
          plane_grads(sr, pl);
        }
      }
    });
  }
  merge_image_grads(s.N, C, taps, sums ? p1.data() : nullptr, p2.data(), gw ? pw.data() : nullptr, sum_gy, sum_gyx,
                    gw, gb);
}

template <typename T>
void backward_planes(const ConvShape& s, Act a, const T* x, const T* w, const BwdParams<T>& p, const T* go, T* gx,
                     double* gw, double* gb, double* sum_gy, double* sum_gyx, bool training) {
  dispatch_act(a, [&](auto A) {
    backward_planes_impl<T, decltype(A)::value>(s, x, w, p, go, gx, gw, gb, sum_gy, sum_gyx, training);
  });
}

// ---- layout ----------------------------------------------------------------------------------

// Batched matrix transpose in 64 x 64 tiles (16 x 16 register blocks where the ISA has them:
// transpose_tile), the tiles spread over threads. ~4-8x faster than Tensor.contiguous() between
// NCHW and channels_last at MobileNet's 14x14 / 7x7 layers, where it is the small-plane path's
// fixed cost.
template <typename T>
void transpose(const T* src, T* dst, int64_t N, int64_t R, int64_t Cols) {
  constexpr int64_t B = 64;
  const int64_t tr = (R + B - 1) / B, tc = (Cols + B - 1) / B, per = tr * tc;
  at::parallel_for(0, N * per, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / per, i0 = (t % per) / tc * B, j0 = (t % tc) * B;
      const int m = static_cast<int>(std::min(B, R - i0)), k = static_cast<int>(std::min(B, Cols - j0));
      transpose_tile<T>(src + (n * R + i0) * Cols + j0, Cols, dst + (n * Cols + j0) * R + i0, R, m, k);
    }
  });
}

// ---- small NCHW planes on NHWC slabs ----------------------------------------------------------

// The planes of one (image, channel block) of an NCHW tensor, transposed to and from an NHWC slab
// of cb channels that stays in L1/L2; the NHWC row kernels run on the slab (u: s with N = 1,
// C = cb).
template <typename T>
struct Slab {
  static constexpr int64_t CB = kChannelGroup<T>;  // one channel group of the NHWC row kernels
  const ConvShape& s;
  int64_t nb;  // channel blocks
  ConvShape u;
  explicit Slab(const ConvShape& shape) : s(shape), nb((shape.C + CB - 1) / CB), u(shape) {
    u.N = 1;
    u.cl = true;
    u.chan_src = nullptr;
    u.nhwc_slabs = false;
  }
  int64_t c0(int64_t b) const { return b * CB; }
  int64_t width(int64_t b) const { return std::min(CB, s.C - b * CB); }
  // image n's channels [c0, c0 + cb) of HW pixels -> slab [HW][cb]: NCHW planes [cb][HW]
  // transposed, or (s.nhwc_slabs) each NHWC pixel's cb channels copied
  void in(const T* t, int64_t HW, int64_t n, int64_t c0, int64_t cb, T* slab) const {
    const int64_t C = s.C;
    if (s.nhwc_slabs) {
      for (int64_t q = 0; q < HW; ++q) std::memcpy(slab + q * cb, t + (n * HW + q) * C + c0, sizeof(T) * cb);
      return;
    }
    transpose_tile<T>(t + (n * C + c0) * HW, HW, slab, cb, static_cast<int>(cb), static_cast<int>(HW));
  }
  // slab [HW][cb] -> image n's channels [c0, c0 + cb), the inverse of in
  void out(const T* slab, int64_t HW, int64_t n, int64_t c0, int64_t cb, T* t) const {
    const int64_t C = s.C;
    if (s.nhwc_slabs) {
      for (int64_t q = 0; q < HW; ++q) std::memcpy(t + (n * HW + q) * C + c0, slab + q * cb, sizeof(T) * cb);
      return;
    }
    transpose_tile<T>(slab, cb, t + (n * C + c0) * HW, HW, static_cast<int>(HW), static_cast<int>(cb));
  }
  // The weights of block [c0, c0 + cb) from w [taps][C] into wsl [taps][cb].
  void weights(const T* w, int64_t c0, int64_t cb, T* wsl) const {
    for (int64_t k = 0; k < s.taps(); ++k) std::memcpy(wsl + k * cb, w + k * s.C + c0, sizeof(T) * cb);
  }
};

// Forward of NCHW x / out with small planes, per (image, channel block): the planes transposed into
// a slab, convolved by the NHWC row kernel, transposed back. With mean / var (training, A = None):
// out = z + b, and the per-channel mean and biased variance of out in double (per slab: sums about
// the first row's mean; Chan's merge over the images in order). w in the NHWC layout [taps][C].
template <typename T, int A>
void forward_small_nchw_impl(const ConvShape& s, const T* x, const T* w, const T* b, T* out, double* mean,
                             double* var) {
  const Slab<T> sl(s);
  const int64_t C = s.C, HW = s.H * s.W, HWo = s.Ho * s.Wo, CB = Slab<T>::CB;
  const bool stats = mean != nullptr;
  std::vector<double> pmean(stats ? s.N * C : 0), pm2(stats ? s.N * C : 0);  // N = 0: no task, stats 0
  at::parallel_for(0, s.N * sl.nb, 1, [&](int64_t t0, int64_t t1) {
    AlignedVec<T> xin(HW * CB), yout(HWo * CB), wsl(s.taps() * CB), zero(CB, T(0)), shift(CB), s1(CB), s2(CB);
    ConvShape u = sl.u;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / sl.nb, c0 = sl.c0(t % sl.nb), cb = sl.width(t % sl.nb);
      u.C = cb;
      sl.in(x, HW, n, c0, cb, xin.data());
      sl.weights(w, c0, cb, wsl.data());
      for (int64_t ho = 0; ho < s.Ho; ++ho) {
        T* orow = yout.data() + ho * s.Wo * cb;
        nhwc_conv_row(u, xin.data(), wsl.data(), 0, ho, [&](int64_t wo, int64_t c, int64_t cnt, V<T> acc) {
          store(act_fwd<A>(acc + load(b + c0 + c, cnt)), orow + wo * cb + c, cnt);
        });
      }
      if (stats) {
        // the slab is one "row" of HWo pixels for row_moments, shifted by its first row's mean
        row_moments(yout.data(), s.Wo, cb, zero.data(), s1.data(), s2.data());
        for (int64_t c = 0; c < cb; ++c) shift[c] = s1[c] / T(s.Wo);
        row_moments(yout.data(), HWo, cb, shift.data(), s1.data(), s2.data());
        for (int64_t c = 0; c < cb; ++c) {
          const double d1 = s1[c], d2 = s2[c];
          pmean[n * C + c0 + c] = double(shift[c]) + d1 / double(HWo);
          pm2[n * C + c0 + c] = std::max(0.0, d2 - d1 * d1 / double(HWo));
        }
      }
      sl.out(yout.data(), HWo, n, c0, cb, out);
    }
  });
  if (stats) merge_image_stats(s.N, C, HWo, pmean.data(), pm2.data(), mean, var);
}

template <typename T>
void forward_small_nchw(const ConvShape& s, Act a, const T* x, const T* w, const T* b, T* out, double* mean,
                        double* var) {
  dispatch_act(a, [&](auto A) { forward_small_nchw_impl<T, decltype(A)::value>(s, x, w, b, out, mean, var); });
}

// The backward of NCHW tensors with small planes on slabs, one task per channel block (all images):
// per image, x and grad_out transposed into slabs, z recomputed by the NHWC row kernel, then the
// BN / activation gradient over the slab (bn_act_grad_row), the weight gradient rows (wgrad_row)
// and the input gradient rows (NhwcInputGrad) on the slabs, and the input gradient transposed out.
// Training: the block's sums over all images first, then k2 / k3 (as backward_planes); with N == 1
// the slabs of the sums pass are reused, so the conv runs once. Arguments as backward_planes, but
// w in the NHWC layout [taps][C].
template <typename T, int A>
void backward_small_nchw_impl(const ConvShape& s, const T* x, const T* w, const BwdParams<T>& p, const T* go, T* gx,
                              double* gw, double* gb, double* sum_gy, double* sum_gyx, bool training) {
  const Slab<T> sl(s);
  const int64_t C = s.C, HW = s.H * s.W, HWo = s.Ho * s.Wo, CB = Slab<T>::CB, taps = s.taps();
  const bool sums = sum_gy != nullptr;
  clear_backward_sums(C, taps, sum_gy, sum_gyx, gw, gb);
  if (s.N == 0) return;
  const bool grads = gx || gw;
  const double M = double(s.N * HWo);
  // per (image, channel) partial sums, merged in a fixed order at the end
  std::vector<double> p1(sums ? s.N * C : 0), p2(sums ? s.N * C : 0), pw(gw ? s.N * C * (taps + 1) : 0);
  at::parallel_for(0, sl.nb, grain_for(4 * s.N * HWo * CB * taps), [&](int64_t b0, int64_t b1) {
    AlignedVec<T> xs(HW * CB), zs(HWo * CB), gos(HWo * CB), gxs(gx ? HW * CB : 0), wsl(taps * CB);
    AlignedVec<T> k2(CB, T(0)), k3(CB, T(0)), r1(CB), r2(CB), rw(gw ? taps * CB : 0), rb(gw ? CB : 0);
    NhwcInputGrad<T> ig(sl.u);
    ConvShape u = sl.u;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = sl.c0(b), cb = sl.width(b);
      u.C = cb;
      sl.weights(w, c0, cb, wsl.data());
      if (gx) ig.set_weights(wsl.data(), cb);
      const BwdParams<T> pb{p.a1 + c0, p.a0 + c0, p.gamma + c0, p.beta + c0, p.k1 + c0,
                            training ? k2.data() : p.k2 + c0, training ? k3.data() : p.k3 + c0};
      // z of image n into zs (x and grad_out into their slabs on the way)
      auto slab_z = [&](int64_t n) {
        sl.in(x, HW, n, c0, cb, xs.data());
        sl.in(go, HWo, n, c0, cb, gos.data());
        for (int64_t ho = 0; ho < s.Ho; ++ho) {
          T* zr = zs.data() + ho * s.Wo * cb;
          nhwc_conv_row(u, xs.data(), wsl.data(), 0, ho,
                        [&](int64_t wo, int64_t c, int64_t cnt, V<T> acc) { store(acc, zr + wo * cb + c, cnt); });
        }
      };
      auto keep_sums = [&](int64_t n) {
        for (int64_t c = 0; c < cb; ++c) {
          p1[n * C + c0 + c] = r1[c];
          p2[n * C + c0 + c] = r2[c];
        }
      };
      // gz (in zs) -> the weight / bias gradient sums and the input gradient of image n
      auto slab_grads = [&](int64_t n) {
        if (gw) {
          std::fill(rw.begin(), rw.end(), T(0));
          std::fill(rb.begin(), rb.end(), T(0));
          for (int64_t ho = 0; ho < s.Ho; ++ho)
            wgrad_row(u, xs.data(), zs.data() + ho * s.Wo * cb, 0, ho, rw.data(), rb.data());
          double* dst = pw.data() + (n * C + c0) * (taps + 1);
          for (int64_t c = 0; c < cb; ++c) {
            for (int64_t k = 0; k < taps; ++k) dst[c * (taps + 1) + k] = rw[k * cb + c];
            dst[c * (taps + 1) + taps] = rb[c];
          }
        }
        if (gx) {
          for (int64_t hi = 0; hi < s.H;) hi += ig.rows_from(zs.data(), 0, s.Ho, gxs.data(), hi, s.H);
          sl.out(gxs.data(), HW, n, c0, cb, gx);
        }
      };
      if (!training) {
        for (int64_t n = 0; n < s.N; ++n) {
          slab_z(n);
          bn_act_grad_row<T, A>(zs.data(), gos.data(), grads ? zs.data() : nullptr, HWo, cb, pb,
                                sums ? r1.data() : nullptr, r2.data());
          if (sums) keep_sums(n);
          if (grads) slab_grads(n);
        }
        continue;
      }
      for (int64_t n = 0; n < s.N; ++n) {
        slab_z(n);
        bn_act_grad_row<T, A>(zs.data(), gos.data(), nullptr, HWo, cb, pb, r1.data(), r2.data());
        keep_sums(n);
      }
      if (!grads) continue;
      for (int64_t c = 0; c < cb; ++c) {
        double d1 = 0, d2 = 0;  // the channel's sums over the images, in order
        for (int64_t n = 0; n < s.N; ++n) {
          d1 += p1[n * C + c0 + c];
          d2 += p2[n * C + c0 + c];
        }
        BnBackward bn{0.0, 0.0, static_cast<double>(p.k1[c0 + c]), 0.0, 0.0};  // the kernel's k1
        bn_train_terms(bn, d1, d2, M);
        k2[c] = static_cast<T>(bn.k2);
        k3[c] = static_cast<T>(bn.k3);
      }
      for (int64_t n = 0; n < s.N; ++n) {
        if (s.N > 1) slab_z(n);
        bn_act_grad_row<T, A>(zs.data(), gos.data(), zs.data(), HWo, cb, pb, nullptr, nullptr);
        slab_grads(n);
      }
    }
  });
  merge_image_grads(s.N, C, taps, sums ? p1.data() : nullptr, p2.data(), gw ? pw.data() : nullptr, sum_gy, sum_gyx,
                    gw, gb);
}

template <typename T>
void backward_small_nchw(const ConvShape& s, Act a, const T* x, const T* w, const BwdParams<T>& p, const T* go,
                         T* gx, double* gw, double* gb, double* sum_gy, double* sum_gyx, bool training) {
  dispatch_act(a, [&](auto A) {
    backward_small_nchw_impl<T, decltype(A)::value>(s, x, w, p, go, gx, gw, gb, sum_gy, sum_gyx, training);
  });
}

template <typename T>
constexpr DWKernels<T> make_kernels() {
  return DWKernels<T>{&forward<T>,         &scale_shift_act<T>, &backward_rows<T>,       &backward_planes<T>,
                      &transpose<T>,       &forward_small_nchw<T>, &backward_small_nchw<T>, &output_sums<T>};
}

}  // namespace fastdw::cpu::CPU_CAPABILITY

#define FASTDW_DEFINE_DWCONV_BN_ACT_TABLE()                                                         \
  FASTDW_ISA_DEFINE(DWKernelTable, dw_table, FASTDW_STR(CPU_CAPABILITY),                            \
                    make_kernels<float>(), make_kernels<double>())
