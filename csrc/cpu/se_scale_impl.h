// Squeeze-and-Excitation kernels, written once with at::vec::Vectorized and compiled per
// instruction set (csrc/cpu/isa/<isa>.cpp defines CPU_CAPABILITY and the -m flags).
//
// The op makes exactly two passes over x (pool, then scale); everything between works on
// [N][C] and [N][S] vectors and the two small FC matrices.
//  * channel_sums, NCHW: one task = VL planes, four vector accumulators per plane, the VL
//    partial-sum vectors reduced together (reduce_lanes). NHWC: one task = (n, block of pixels);
//    a block of 4 channel vectors is accumulated in registers while walking the pixels, per-block
//    partial sums are merged in double in a fixed order, so batch 1 splits across threads and
//    results do not depend on scheduling.
//  * scale: NCHW one plane times a scalar; NHWC one pixel row times the sample's gate vector.
//  * excite / excite_backward: the 1x1 "convolutions" of SE on the pooled vectors: blocks of VL
//    dot products reduced together (forward), row-parallel outer products (weight gradients) and
//    column-parallel axpys (input gradients), so each weight row is read once per sample.
// Helpers live in namespace `se` because every op's impl header shares one translation unit.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/se_scale_kernel.h"
#include "cpu/vec_util.h"

namespace fastdw::cpu::CPU_CAPABILITY::se {

using at::vec::Vectorized;
template <typename T>
using V = Vectorized<T>;

// load / store of partial vectors: cpu/vec_util.h (partial loads zero the lanes past n, so
// partial vectors can be summed as they are).
// Pairwise, so the adds of one level are independent (a serial sum of 16 lanes is ~60 cycles of
// latency, which dominated the small FCs and the per-plane sums).
template <typename T>
inline T hsum(const V<T>& v) {
  alignas(64) T t[V<T>::size()];
  v.store(t);
  for (int64_t w = V<T>::size() / 2; w > 0; w /= 2)
    for (int64_t i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// Lane l of the result = sum of the lanes of acc[l], for VL vectors acc[0..VL): log2(VL) rounds of
// interleave2 + add instead of VL horizontal sums. Each round pairs neighbours, which leaves the
// rows in bit-reversed lane order, so the inputs are taken in bit-reversed order.
constexpr int64_t bit_reverse(int64_t i, int64_t n) {
  int64_t r = 0;
  for (int64_t b = 1; b < n; b <<= 1) r = (r << 1) | ((i & b) ? 1 : 0);
  return r;
}
template <typename T>
inline V<T> reduce_lanes(const V<T>* acc) {
  constexpr int64_t VL = V<T>::size();
  V<T> t[VL];
  for (int64_t p = 0; p < VL; ++p) t[p] = acc[bit_reverse(p, VL)];
  for (int64_t n = VL; n > 1; n /= 2) {
    for (int64_t i = 0; i < n / 2; ++i) {
      auto [lo, hi] = at::vec::interleave2(t[2 * i], t[2 * i + 1]);
      t[i] = lo + hi;
    }
  }
  return t[0];
}

// Elements per parallel task: enough to amortise scheduling, few enough that batch 1 and the
// small late-stage tensors (C x 7 x 7) still split across threads.
constexpr int64_t kChunk = 16384;
inline int64_t grain(int64_t per_task) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, per_task)); }

// ---- scalar activation and gate (on [N][S] and [N][C] vectors only) ---------------------------
// The shared functions of csrc/common/se_scale_math.h, the same the CUDA kernels run.

template <typename T>
inline T act_f(SEAct a, T h) { return se_act(a, h); }
template <typename T>
inline T act_d(SEAct a, T h) { return se_act_grad(a, h); }
template <typename T>
inline T gate_f(SEGate g, T z) { return se_gate(g, z); }
template <typename T>
inline T gate_d(SEGate g, T z) { return se_gate_grad(g, z); }

// ---- pass over x: per-(n, c) sums ---------------------------------------------------------------

template <typename T, bool Prod>
inline V<T> term(const T* x, const T* y, int64_t i) {
  if constexpr (Prod) return V<T>::loadu(x + i) * V<T>::loadu(y + i);
  else return V<T>::loadu(x + i);
}
template <typename T, bool Prod>
inline V<T> term(const T* x, const T* y, int64_t i, int64_t cnt) {
  if constexpr (Prod) return load(x + i, cnt) * load(y + i, cnt);
  else return load(x + i, cnt);
}

template <typename T, bool Prod>
void channel_sums_impl(const SEShape& s, const T* x, const T* y, double* sums) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C, HW = s.HW;
  if (!s.cl) {
    // Tasks are blocks of VL planes, whose VL partial-sum vectors are reduced together.
    const int64_t P = s.N * C, nblk = (P + VL - 1) / VL;
    at::parallel_for(0, nblk, grain(VL * HW), [&](int64_t b0, int64_t b1) {
      V<T> acc[VL];
      alignas(64) T out[VL];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t p0 = blk * VL, np = std::min(VL, P - p0);
        for (int64_t j = 0; j < VL; ++j) {
          if (j >= np) {
            acc[j] = V<T>(0);
            continue;
          }
          const T* xp = x + (p0 + j) * HW;
          const T* yp = Prod ? y + (p0 + j) * HW : nullptr;
          V<T> a0(0), a1(0), a2(0), a3(0);
          int64_t i = 0;
          for (; i + 4 * VL <= HW; i += 4 * VL) {
            a0 = a0 + term<T, Prod>(xp, yp, i);
            a1 = a1 + term<T, Prod>(xp, yp, i + VL);
            a2 = a2 + term<T, Prod>(xp, yp, i + 2 * VL);
            a3 = a3 + term<T, Prod>(xp, yp, i + 3 * VL);
          }
          for (; i < HW; i += VL) a0 = a0 + term<T, Prod>(xp, yp, i, std::min(VL, HW - i));
          acc[j] = (a0 + a1) + (a2 + a3);
        }
        reduce_lanes(acc).store(out);
        for (int64_t j = 0; j < np; ++j) sums[p0 + j] = double(out[j]);
      }
    });
    return;
  }
  // NHWC: tasks are (n, block of pixels); the block size depends on the shape only.
  const int64_t bpx = std::max<int64_t>(1, std::min(HW, kChunk / std::max<int64_t>(1, C)));
  const int64_t nb = HW == 0 ? 0 : (HW + bpx - 1) / bpx;
  std::vector<double> part(s.N * nb * C);
  at::parallel_for(0, s.N * nb, grain(bpx * C), [&](int64_t t0, int64_t t1) {
    alignas(64) T tmp[4 * VL];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, px0 = (t % nb) * bpx, px1 = std::min(HW, px0 + bpx);
      const T* xb = x + n * HW * C;
      const T* yb = Prod ? y + n * HW * C : nullptr;
      double* out = part.data() + t * C;
      for (int64_t c0 = 0; c0 < C; c0 += 4 * VL) {
        const int64_t w = std::min(4 * VL, C - c0);
        V<T> a0(0), a1(0), a2(0), a3(0);
        // J = number of vectors in this channel block (the last one possibly partial), fixed at
        // compile time so the pixel loop keeps its accumulators in registers.
        auto walk = [&](auto J) {
          constexpr int64_t nv = decltype(J)::value;
          const int64_t last = w - (nv - 1) * VL;  // lanes of the last vector
          for (int64_t px = px0; px < px1; ++px) {
            const int64_t i = px * C + c0;
            if constexpr (nv == 4) a3 = a3 + term<T, Prod>(xb, yb, i + 3 * VL, last);
            if constexpr (nv == 3) a2 = a2 + term<T, Prod>(xb, yb, i + 2 * VL, last);
            if constexpr (nv >= 4) a2 = a2 + term<T, Prod>(xb, yb, i + 2 * VL);
            if constexpr (nv == 2) a1 = a1 + term<T, Prod>(xb, yb, i + VL, last);
            if constexpr (nv >= 3) a1 = a1 + term<T, Prod>(xb, yb, i + VL);
            if constexpr (nv == 1) a0 = a0 + term<T, Prod>(xb, yb, i, last);
            if constexpr (nv >= 2) a0 = a0 + term<T, Prod>(xb, yb, i);
          }
        };
        if (w == 4 * VL) {
          for (int64_t px = px0; px < px1; ++px) {
            const int64_t i = px * C + c0;
            a0 = a0 + term<T, Prod>(xb, yb, i);
            a1 = a1 + term<T, Prod>(xb, yb, i + VL);
            a2 = a2 + term<T, Prod>(xb, yb, i + 2 * VL);
            a3 = a3 + term<T, Prod>(xb, yb, i + 3 * VL);
          }
        } else {
          switch ((w + VL - 1) / VL) {
            case 1: walk(std::integral_constant<int64_t, 1>{}); break;
            case 2: walk(std::integral_constant<int64_t, 2>{}); break;
            case 3: walk(std::integral_constant<int64_t, 3>{}); break;
            default: walk(std::integral_constant<int64_t, 4>{}); break;
          }
        }
        a0.store(tmp);
        a1.store(tmp + VL);
        a2.store(tmp + 2 * VL);
        a3.store(tmp + 3 * VL);
        for (int64_t j = 0; j < w; ++j) out[c0 + j] = double(tmp[j]);
      }
    }
  });
  for (int64_t n = 0; n < s.N; ++n) {
    double* dst = sums + n * C;
    std::fill(dst, dst + C, 0.0);
    for (int64_t b = 0; b < nb; ++b) {
      const double* src = part.data() + (n * nb + b) * C;
      for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
    }
  }
}

template <typename T>
void channel_sums(const SEShape& s, const T* x, const T* y, double* sums) {
  if (y) channel_sums_impl<T, true>(s, x, y, sums);
  else channel_sums_impl<T, false>(s, x, nullptr, sums);
}

// ---- pass over x: out = x * a[n, c] (+ b[n, c]) -------------------------------------------------

template <typename T, bool Shift>
void scale_impl(const SEShape& s, const T* x, const T* a, const T* b, T* out) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C, HW = s.HW;
  if (!s.cl) {
    at::parallel_for(0, s.N * C, grain(HW), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const V<T> av(a[p]);
        const V<T> bv(Shift ? b[p] : T(0));
        const T* xp = x + p * HW;
        T* op = out + p * HW;
        int64_t i = 0;
        for (; i + VL <= HW; i += VL) {
          const V<T> v = V<T>::loadu(xp + i);
          (Shift ? at::vec::fmadd(v, av, bv) : v * av).store(op + i);
        }
        if (i < HW) {
          const V<T> v = load(xp + i, HW - i);
          store(Shift ? at::vec::fmadd(v, av, bv) : v * av, op + i, HW - i);
        }
      }
    });
    return;
  }
  at::parallel_for(0, s.N * HW, grain(C), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / HW;
      const T* ar = a + n * C;
      const T* br = Shift ? b + n * C : nullptr;
      const T* xr = x + q * C;
      T* orow = out + q * C;
      int64_t c = 0;
      for (; c + VL <= C; c += VL) {
        const V<T> v = V<T>::loadu(xr + c);
        (Shift ? at::vec::fmadd(v, V<T>::loadu(ar + c), V<T>::loadu(br + c)) : v * V<T>::loadu(ar + c))
            .store(orow + c);
      }
      if (c < C) {
        const int64_t cnt = C - c;
        const V<T> v = load(xr + c, cnt);
        store(Shift ? at::vec::fmadd(v, load(ar + c, cnt), load(br + c, cnt)) : v * load(ar + c, cnt), orow + c,
              cnt);
      }
    }
  });
}

template <typename T>
void scale(const SEShape& s, const T* x, const T* a, const T* b, T* out) {
  if (b) scale_impl<T, true>(s, x, a, b, out);
  else scale_impl<T, false>(s, x, a, nullptr, out);
}

// ---- the small FCs ------------------------------------------------------------------------------

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t VL = V<T>::size();
  V<T> a0(0), a1(0);
  int64_t i = 0;
  for (; i + 2 * VL <= n; i += 2 * VL) {
    a0 = at::vec::fmadd(V<T>::loadu(a + i), V<T>::loadu(b + i), a0);
    a1 = at::vec::fmadd(V<T>::loadu(a + i + VL), V<T>::loadu(b + i + VL), a1);
  }
  for (; i < n; i += VL) {
    const int64_t cnt = std::min(VL, n - i);
    a0 = at::vec::fmadd(load(a + i, cnt), load(b + i, cnt), a0);
  }
  return hsum(a0 + a1);
}

// out[n][r] = dot(W[r], v[n]) + bias[r]. W: [R][K], v: [N][K], out: [N][R]. Parallel over blocks
// of VL rows: VL dot products run side by side (each row of W read once per sample while the block
// is cache resident) and are reduced together into one vector of VL outputs, no horizontal sums.
template <typename T>
void rows_dot(int64_t N, int64_t R, int64_t K, const T* W, const T* v, const T* bias, T* out) {
  constexpr int64_t VL = V<T>::size();
  at::parallel_for(0, (R + VL - 1) / VL, grain(VL * N * K), [&](int64_t b0, int64_t b1) {
    V<T> acc[VL];
    alignas(64) T res[VL];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * VL;
      if (r0 + VL > R) {
        for (int64_t r = r0; r < R; ++r)
          for (int64_t n = 0; n < N; ++n) out[n * R + r] = dot(W + r * K, v + n * K, K) + bias[r];
        continue;
      }
      const T* w = W + r0 * K;
      const V<T> bv = V<T>::loadu(bias + r0);
      for (int64_t n = 0; n < N; ++n) {
        const T* vn = v + n * K;
        for (int64_t j = 0; j < VL; ++j) acc[j] = V<T>(0);
        for (int64_t k = 0; k < K; k += VL) {
          const int64_t cnt = std::min(VL, K - k);
          const V<T> x = load(vn + k, cnt);
          for (int64_t j = 0; j < VL; ++j) acc[j] = at::vec::fmadd(load(w + j * K + k, cnt), x, acc[j]);
        }
        (reduce_lanes(acc) + bv).store(res);
        for (int64_t j = 0; j < VL; ++j) out[n * R + r0 + j] = res[j];
      }
    }
  });
}

// out[n][k] = sum_r coef[n][r] * W[r][k]. coef: [N][R], W: [R][K]. Parallel over column blocks, so
// no two threads write the same output.
template <typename T>
void cols_axpy(int64_t N, int64_t R, int64_t K, const T* coef, const T* W, T* out) {
  constexpr int64_t VL = V<T>::size();
  constexpr int64_t BW = 8 * VL;
  const int64_t nblk = (K + BW - 1) / BW;
  at::parallel_for(0, nblk, grain(N * R * BW), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t k0 = blk * BW, k1 = std::min(K, k0 + BW);
      for (int64_t n = 0; n < N; ++n) {
        T* o = out + n * K;
        std::fill(o + k0, o + k1, T(0));
        for (int64_t r = 0; r < R; ++r) {
          const T cr = coef[n * R + r];
          if (cr == T(0)) continue;  // relu' and hardsigmoid' zero many rows
          const V<T> cv(cr);
          const T* w = W + r * K;
          for (int64_t k = k0; k < k1; k += VL) {
            const int64_t cnt = std::min(VL, k1 - k);
            store(at::vec::fmadd(cv, load(w + k, cnt), load(o + k, cnt)), o + k, cnt);
          }
        }
      }
    }
  });
}

// out[r][k] = sum_n coef[n][r] * v[n][k] and bias[r] = sum_n coef[n][r] (either may be null).
template <typename T>
void outer_rows(int64_t N, int64_t R, int64_t K, const T* coef, const T* v, T* out, T* bias) {
  constexpr int64_t VL = V<T>::size();
  if (bias) {
    for (int64_t r = 0; r < R; ++r) {
      T acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += coef[n * R + r];
      bias[r] = acc;
    }
  }
  if (!out) return;
  at::parallel_for(0, R, grain(N * K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* o = out + r * K;
      for (int64_t k = 0; k < K; k += VL) {
        const int64_t cnt = std::min(VL, K - k);
        V<T> acc(0);
        for (int64_t n = 0; n < N; ++n) acc = at::vec::fmadd(V<T>(coef[n * R + r]), load(v + n * K + k, cnt), acc);
        store(acc, o + k, cnt);
      }
    }
  });
}

template <typename T>
void excite(const SEShape& s, SEAct act, SEGate gate, const T* p, const T* w1, const T* b1, const T* w2,
            const T* b2, T* h, T* z, T* g) {
  const int64_t N = s.N, C = s.C, S = s.S;
  std::vector<T> a(N * S);
  rows_dot(N, S, C, w1, p, b1, h);
  for (int64_t i = 0; i < N * S; ++i) a[i] = act_f(act, h[i]);
  rows_dot(N, C, S, w2, a.data(), b2, z);
  for (int64_t i = 0; i < N * C; ++i) g[i] = gate_f(gate, z[i]);
}

template <typename T>
void excite_backward(const SEShape& s, SEAct act, SEGate gate, const T* p, const T* w1, const T* w2, const T* h,
                     const T* z, const T* dg, T* dp, T* dw1, T* db1, T* dw2, T* db2) {
  const int64_t N = s.N, C = s.C, S = s.S;
  std::vector<T> a(N * S), dz(N * C), dh(N * S);
  for (int64_t i = 0; i < N * S; ++i) a[i] = act_f(act, h[i]);
  for (int64_t i = 0; i < N * C; ++i) dz[i] = dg[i] * gate_d(gate, z[i]);
  outer_rows(N, C, S, dz.data(), a.data(), dw2, db2);
  if (!(dp || dw1 || db1)) return;
  cols_axpy(N, C, S, dz.data(), w2, dh.data());
  for (int64_t i = 0; i < N * S; ++i) dh[i] *= act_d(act, h[i]);
  outer_rows(N, S, C, dh.data(), p, dw1, db1);
  if (dp) cols_axpy(N, S, C, dh.data(), w1, dp);
}

template <typename T>
constexpr SEKernels<T> make_se_kernels() {
  return SEKernels<T>{&channel_sums<T>, &excite<T>, &excite_backward<T>, &scale<T>};
}

}  // namespace fastdw::cpu::CPU_CAPABILITY::se

#define FASTDW_DEFINE_SE_SCALE_TABLE()                                                              \
  FASTDW_ISA_DEFINE(SEKernelTable, se_table, FASTDW_STR(CPU_CAPABILITY),                            \
                    se::make_se_kernels<float>(), se::make_se_kernels<double>())
