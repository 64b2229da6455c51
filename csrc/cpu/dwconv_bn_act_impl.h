// Depthwise conv + BN + activation kernels, written once with at::vec::Vectorized and compiled
// per instruction set (csrc/cpu/isa/<isa>.cpp defines CPU_CAPABILITY and the -m flags).
//
// Layouts
//  * NHWC (channels_last): vectorised over channels. One task = one output row (n, ho); every tap
//    is a contiguous load of C values, taps outside the image are skipped by index ranges computed
//    per row / column, so the inner loops have no branches.
//  * NCHW: vectorised over output columns. One task = one (n, c) plane. The plane is first copied
//    into a zero-padded, stride-deinterleaved buffer (phase j holds padded columns j, j+s, ...), so
//    every tap of every stride becomes a contiguous vector load; the buffer is L1/L2 resident.
// BatchNorm and the activation are applied to the accumulator in registers before the one store.
// Statistics and weight gradients are reduced per row in T, then merged in double in a fixed
// order, so results do not depend on scheduling.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/dwconv_bn_act_kernel.h"

namespace fastdw::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;
template <typename T>
using V = Vectorized<T>;

template <typename T>
inline V<T> load(const T* p, int64_t n) {
  return n == V<T>::size() ? V<T>::loadu(p) : V<T>::loadu(p, n);
}
template <typename T>
inline void store(const V<T>& v, T* p, int64_t n) {
  if (n == V<T>::size()) v.store(p); else v.store(p, n);
}
template <typename T>
inline double hsum(const V<T>& v, int64_t n) {
  alignas(64) T tmp[V<T>::size()];
  v.store(tmp);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += tmp[i];
  return s;
}

// ---- activations ---------------------------------------------------------------------------

template <int A, typename T>
inline V<T> act_fwd(const V<T>& y) {
  if constexpr (A == int(Act::ReLU)) {
    return at::vec::clamp_min(y, V<T>(0));
  } else if constexpr (A == int(Act::ReLU6)) {
    return at::vec::clamp(y, V<T>(0), V<T>(6));
  } else if constexpr (A == int(Act::HardSwish)) {
    return y * at::vec::clamp(y + V<T>(3), V<T>(0), V<T>(6)) / V<T>(6);
  } else if constexpr (A == int(Act::SiLU)) {
    return y / (V<T>(1) + y.neg().exp());
  } else {
    return y;
  }
}

// grad_out * act'(y), with PyTorch's conventions at the kinks (relu: y > 0; relu6: 0 < y < 6;
// hardswish: 0 below -3, y/3 + 1/2 up to 3 inclusive, 1 above).
template <int A, typename T>
inline V<T> act_bwd(const V<T>& go, const V<T>& y) {
  if constexpr (A == int(Act::ReLU)) {
    return V<T>::blendv(V<T>(0), go, y > V<T>(0));
  } else if constexpr (A == int(Act::ReLU6)) {
    return V<T>::blendv(V<T>(0), go, (y > V<T>(0)) & (y < V<T>(6)));
  } else if constexpr (A == int(Act::HardSwish)) {
    V<T> mid = go * (y / V<T>(3) + V<T>(0.5));
    V<T> r = V<T>::blendv(mid, go, y > V<T>(3));
    return V<T>::blendv(r, V<T>(0), y < V<T>(-3));
  } else if constexpr (A == int(Act::SiLU)) {
    V<T> s = V<T>(1) / (V<T>(1) + y.neg().exp());
    return go * s * (V<T>(1) + y * (V<T>(1) - s));
  } else {
    return go;
  }
}

template <typename F>
inline void dispatch_act(Act a, F&& f) {
  switch (a) {
    case Act::ReLU: f(std::integral_constant<int, int(Act::ReLU)>{}); break;
    case Act::ReLU6: f(std::integral_constant<int, int(Act::ReLU6)>{}); break;
    case Act::HardSwish: f(std::integral_constant<int, int(Act::HardSwish)>{}); break;
    case Act::SiLU: f(std::integral_constant<int, int(Act::SiLU)>{}); break;
    default: f(std::integral_constant<int, int(Act::None)>{}); break;
  }
}

// ---- index helpers ---------------------------------------------------------------------------

// Taps k in [k0, k1) keep i0 + k * d inside [0, size).
inline void tap_range(int64_t i0, int64_t d, int64_t K, int64_t size, int64_t& k0, int64_t& k1) {
  k0 = i0 >= 0 ? 0 : (-i0 + d - 1) / d;
  int64_t last = size - 1 - i0;  // need k * d <= last
  k1 = last < 0 ? 0 : std::min<int64_t>(K, last / d + 1);
  if (k1 < k0) k1 = k0;
}

// Chan et al.: merge (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a).
inline void chan_merge(double& n_a, double& mean_a, double& m2_a, double n_b, double mean_b, double m2_b) {
  if (n_b == 0) return;
  double n = n_a + n_b;
  double delta = mean_b - mean_a;
  mean_a += delta * n_b / n;
  m2_a += m2_b + delta * delta * n_a * n_b / n;
  n_a = n;
}

inline int64_t grain_for(int64_t work_per_task) {
  // Enough tasks per chunk that a chunk does ~32K multiply-adds.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_task));
}

// ---- NHWC core -------------------------------------------------------------------------------

// Calls epi(wo, c, count, acc) with acc = sum over taps of w * x for output row (n, ho).
template <typename T, typename Epi>
inline void nhwc_conv_row(const ConvShape& s, const T* x, const T* w, int64_t n, int64_t ho, Epi&& epi) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C;
  const int64_t hi0 = ho * s.SH - s.PH;
  int64_t kh0, kh1;
  tap_range(hi0, s.DH, s.KH, s.H, kh0, kh1);
  const T* xn = x + n * s.H * s.W * C;
  for (int64_t wo = 0; wo < s.Wo; ++wo) {
    const int64_t wi0 = wo * s.SW - s.PW;
    int64_t kw0, kw1;
    tap_range(wi0, s.DW, s.KW, s.W, kw0, kw1);
    for (int64_t c = 0; c < C; c += VL) {
      const int64_t cnt = std::min(VL, C - c);
      V<T> acc(0);
      for (int64_t kh = kh0; kh < kh1; ++kh) {
        const T* xr = xn + ((hi0 + kh * s.DH) * s.W + wi0) * C + c;
        const T* wr = w + kh * s.KW * C + c;
        for (int64_t kw = kw0; kw < kw1; ++kw) {
          acc = at::vec::fmadd(load(wr + kw * C, cnt), load(xr + kw * s.DW * C, cnt), acc);
        }
      }
      epi(wo, c, cnt, acc);
    }
  }
}

// ---- NCHW core -------------------------------------------------------------------------------

struct PlaneBuf {
  int64_t rows, cols;  // rows of padded input used; columns per phase (with vector slack)
};

inline PlaneBuf plane_buf_dims(const ConvShape& s, int64_t VL) {
  PlaneBuf b;
  b.rows = (s.Ho - 1) * s.SH + (s.KH - 1) * s.DH + 1;
  b.cols = s.Wo + ((s.KW - 1) * s.DW) / s.SW + VL;
  return b;
}

// buf[(j * rows + hp) * cols + q] = padded input at row hp, column q * SW + j (0 outside).
template <typename T>
inline void fill_plane_buf(const ConvShape& s, const PlaneBuf& d, const T* xp, T* buf) {
  for (int64_t hp = 0; hp < d.rows; ++hp) {
    const int64_t hi = hp - s.PH;
    const bool row_ok = hi >= 0 && hi < s.H;
    const T* src = xp + hi * s.W;
    for (int64_t j = 0; j < s.SW; ++j) {
      T* dst = buf + (j * d.rows + hp) * d.cols;
      if (!row_ok) {
        std::fill(dst, dst + d.cols, T(0));
        continue;
      }
      if (s.SW == 1) {
        // columns q -> wi = q - PW
        const int64_t q0 = std::min<int64_t>(d.cols, std::max<int64_t>(0, s.PW));
        const int64_t q1 = std::min<int64_t>(d.cols, std::max<int64_t>(q0, s.W + s.PW));
        std::fill(dst, dst + q0, T(0));
        std::memcpy(dst + q0, src + (q0 - s.PW), sizeof(T) * (q1 - q0));
        std::fill(dst + q1, dst + d.cols, T(0));
      } else {
        for (int64_t q = 0; q < d.cols; ++q) {
          const int64_t wi = q * s.SW + j - s.PW;
          dst[q] = (wi >= 0 && wi < s.W) ? src[wi] : T(0);
        }
      }
    }
  }
}

// Calls epi(ho, wo, count, acc) for every output vector of one plane.
template <typename T, typename Epi>
inline void nchw_conv_plane(const ConvShape& s, const PlaneBuf& d, const T* buf, const T* w, Epi&& epi) {
  constexpr int64_t VL = V<T>::size();
  const int64_t taps = s.taps();
  std::vector<V<T>> wv(taps);
  std::vector<int64_t> off(taps);
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    for (int64_t kw = 0; kw < s.KW; ++kw) {
      const int64_t t = kh * s.KW + kw;
      const int64_t o = kw * s.DW;
      wv[t] = V<T>(w[t]);
      off[t] = ((o % s.SW) * d.rows + kh * s.DH) * d.cols + o / s.SW;
    }
  }
  for (int64_t ho = 0; ho < s.Ho; ++ho) {
    const T* base = buf + ho * s.SH * d.cols;
    for (int64_t wo = 0; wo < s.Wo; wo += VL) {
      const int64_t cnt = std::min(VL, s.Wo - wo);
      V<T> acc(0);
      for (int64_t t = 0; t < taps; ++t) acc = at::vec::fmadd(wv[t], V<T>::loadu(base + off[t] + wo), acc);
      epi(ho, wo, cnt, acc);
    }
  }
}

// ---- forward ---------------------------------------------------------------------------------

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
    at::parallel_for(0, rows, grain_for(s.Wo * C * s.taps()), [&](int64_t r0, int64_t r1) {
      std::vector<T> rsum(stats ? C : 0), rm2(stats ? C : 0);
      const int tid = at::get_thread_num();
      for (int64_t r = r0; r < r1; ++r) {
        T* orow = out + r * s.Wo * C;
        if (!stats) {
          nhwc_conv_row(s, x, w, r / s.Ho, r % s.Ho, [&](int64_t wo, int64_t c, int64_t cnt, V<T> acc) {
            store(act_fwd<A>(acc + load(b + c, cnt)), orow + wo * C + c, cnt);
          });
          continue;
        }
        std::fill(rsum.begin(), rsum.end(), T(0));
        std::fill(rm2.begin(), rm2.end(), T(0));
        nhwc_conv_row(s, x, w, r / s.Ho, r % s.Ho, [&](int64_t wo, int64_t c, int64_t cnt, V<T> acc) {
          V<T> z = acc + load(b + c, cnt);
          store(z, orow + wo * C + c, cnt);
          store(load(rsum.data() + c, cnt) + z, rsum.data() + c, cnt);
        });
        // Two-pass variance of this row while it is in cache: first the row mean, then M2.
        const T inv = T(1) / T(s.Wo);
        for (int64_t c = 0; c < C; ++c) rsum[c] *= inv;
        for (int64_t wo = 0; wo < s.Wo; ++wo) {
          for (int64_t c = 0; c < C; c += VL) {
            const int64_t cnt = std::min(VL, C - c);
            V<T> dlt = load(orow + wo * C + c, cnt) - load(rsum.data() + c, cnt);
            store(at::vec::fmadd(dlt, dlt, load(rm2.data() + c, cnt)), rm2.data() + c, cnt);
          }
        }
        double n_a = tn[tid];
        for (int64_t c = 0; c < C; ++c) {
          double na = n_a;
          chan_merge(na, tmean[tid * C + c], tm2[tid * C + c], double(s.Wo), rsum[c], rm2[c]);
        }
        tn[tid] = n_a + s.Wo;
      }
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
  at::parallel_for(0, planes, grain_for(hw * s.taps()), [&](int64_t p0, int64_t p1) {
    std::vector<T> buf(s.SW * d.rows * d.cols);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      fill_plane_buf(s, d, x + p * s.H * s.W, buf.data());
      T* op = out + p * hw;
      const V<T> bv(b[c]);
      if (!stats) {
        nchw_conv_plane(s, d, buf.data(), w + c * s.taps(), [&](int64_t ho, int64_t wo, int64_t cnt, V<T> acc) {
          store(act_fwd<A>(acc + bv), op + ho * s.Wo + wo, cnt);
        });
        continue;
      }
      double psum = 0;
      V<T> rowsum(0);
      int64_t cur_ho = 0;
      nchw_conv_plane(s, d, buf.data(), w + c * s.taps(), [&](int64_t ho, int64_t wo, int64_t cnt, V<T> acc) {
        if (ho != cur_ho) {
          psum += hsum(rowsum, VL);
          rowsum = V<T>(0);
          cur_ho = ho;
        }
        V<T> z = acc + bv;
        store(z, op + ho * s.Wo + wo, cnt);
        rowsum = rowsum + V<T>::set(V<T>(0), z, cnt);
      });
      psum += hsum(rowsum, VL);
      const double pm = psum / double(hw);
      double m2 = 0;
      for (int64_t ho = 0; ho < s.Ho; ++ho) {
        V<T> a(0);
        const V<T> mv(static_cast<T>(pm));
        for (int64_t wo = 0; wo < s.Wo; wo += VL) {
          const int64_t cnt = std::min(VL, s.Wo - wo);
          V<T> dlt = V<T>::set(V<T>(0), load(op + ho * s.Wo + wo, cnt) - mv, cnt);
          a = at::vec::fmadd(dlt, dlt, a);
        }
        m2 += hsum(a, VL);
      }
      // m2 was taken about the rounded mean; correct it to the exact plane mean.
      const double shift = pm - double(static_cast<T>(pm));
      pmean[p] = pm;
      pm2[p] = std::max(0.0, m2 - double(hw) * shift * shift);
    }
  });
  if (stats) {
    for (int64_t c = 0; c < C; ++c) {
      double n = 0, m = 0, m2 = 0;
      for (int64_t in = 0; in < s.N; ++in) chan_merge(n, m, m2, double(hw), pmean[in * C + c], pm2[in * C + c]);
      mean[c] = m;
      var[c] = n > 0 ? m2 / n : 0.0;
    }
  }
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

template <typename T>
void bn_backward(const ConvShape& s, T* g, const T* xhat, const T* k1, const T* k2, const T* k3) {
  for_each_output<T>(s, [&](int64_t i, int64_t c, int64_t cnt, bool vec_c) {
    V<T> a = vec_c ? load(k1 + c, cnt) : V<T>(k1[c]);
    V<T> bb = vec_c ? load(k2 + c, cnt) : V<T>(k2[c]);
    V<T> cc = vec_c ? load(k3 + c, cnt) : V<T>(k3[c]);
    store(at::vec::fmadd(a, load(g + i, cnt), at::vec::fmadd(bb, load(xhat + i, cnt), cc)), g + i, cnt);
  });
}

// ---- backward: recompute, activation and BN-parameter sums -------------------------------------

template <typename T, int A>
void backward_act_impl(const ConvShape& s, const T* x, const T* w, const T* b, const T* mean, const T* invstd,
                       const T* gamma, const T* beta, const T* go, T* gy, T* xhat, double* sum_gy,
                       double* sum_gyx) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C;
  std::fill(sum_gy, sum_gy + C, 0.0);
  std::fill(sum_gyx, sum_gyx + C, 0.0);
  if (s.N == 0) return;
  if (s.cl) {
    const int nt = at::get_num_threads();
    std::vector<double> t1(nt * C, 0.0), t2(nt * C, 0.0);
    at::parallel_for(0, s.N * s.Ho, grain_for(s.Wo * C * s.taps()), [&](int64_t r0, int64_t r1) {
      std::vector<T> r1s(C), r2s(C);
      const int tid = at::get_thread_num();
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(r1s.begin(), r1s.end(), T(0));
        std::fill(r2s.begin(), r2s.end(), T(0));
        const int64_t base = r * s.Wo * C;
        nhwc_conv_row(s, x, w, r / s.Ho, r % s.Ho, [&](int64_t wo, int64_t c, int64_t cnt, V<T> acc) {
          const int64_t i = base + wo * C + c;
          V<T> xh = (acc + load(b + c, cnt) - load(mean + c, cnt)) * load(invstd + c, cnt);
          V<T> y = at::vec::fmadd(xh, load(gamma + c, cnt), load(beta + c, cnt));
          V<T> g = act_bwd<A>(load(go + i, cnt), y);
          store(g, gy + i, cnt);
          if (xhat) store(xh, xhat + i, cnt);
          store(load(r1s.data() + c, cnt) + g, r1s.data() + c, cnt);
          store(at::vec::fmadd(g, xh, load(r2s.data() + c, cnt)), r2s.data() + c, cnt);
        });
        for (int64_t c = 0; c < C; ++c) {
          t1[tid * C + c] += r1s[c];
          t2[tid * C + c] += r2s[c];
        }
      }
    });
    for (int t = 0; t < nt; ++t)
      for (int64_t c = 0; c < C; ++c) {
        sum_gy[c] += t1[t * C + c];
        sum_gyx[c] += t2[t * C + c];
      }
    return;
  }
  const PlaneBuf d = plane_buf_dims(s, VL);
  const int64_t planes = s.N * C, hw = s.Ho * s.Wo;
  std::vector<double> p1(planes), p2(planes);
  at::parallel_for(0, planes, grain_for(hw * s.taps()), [&](int64_t q0, int64_t q1) {
    std::vector<T> buf(s.SW * d.rows * d.cols);
    for (int64_t p = q0; p < q1; ++p) {
      const int64_t c = p % C;
      fill_plane_buf(s, d, x + p * s.H * s.W, buf.data());
      const V<T> bm(b[c] - mean[c]), is(invstd[c]), ga(gamma[c]), be(beta[c]);
      double a1 = 0, a2 = 0;
      V<T> v1(0), v2(0);
      int64_t cur = 0;
      const int64_t off = p * hw;
      nchw_conv_plane(s, d, buf.data(), w + c * s.taps(), [&](int64_t ho, int64_t wo, int64_t cnt, V<T> acc) {
        if (ho != cur) {
          a1 += hsum(v1, VL);
          a2 += hsum(v2, VL);
          v1 = v2 = V<T>(0);
          cur = ho;
        }
        const int64_t i = off + ho * s.Wo + wo;
        V<T> xh = (acc + bm) * is;
        V<T> g = V<T>::set(V<T>(0), act_bwd<A>(load(go + i, cnt), at::vec::fmadd(xh, ga, be)), cnt);
        store(g, gy + i, cnt);
        if (xhat) store(xh, xhat + i, cnt);
        v1 = v1 + g;
        v2 = at::vec::fmadd(g, xh, v2);
      });
      p1[p] = a1 + hsum(v1, VL);
      p2[p] = a2 + hsum(v2, VL);
    }
  });
  for (int64_t in = 0; in < s.N; ++in)
    for (int64_t c = 0; c < C; ++c) {
      sum_gy[c] += p1[in * C + c];
      sum_gyx[c] += p2[in * C + c];
    }
}

template <typename T>
void backward_act(const ConvShape& s, Act a, const T* x, const T* w, const T* b, const T* mean, const T* invstd,
                  const T* gamma, const T* beta, const T* go, T* gy, T* xhat, double* sum_gy, double* sum_gyx) {
  dispatch_act(a, [&](auto A) {
    backward_act_impl<T, decltype(A)::value>(s, x, w, b, mean, invstd, gamma, beta, go, gy, xhat, sum_gy, sum_gyx);
  });
}

// ---- backward: input gradient (transposed depthwise conv, as a gather) ------------------------

template <typename T>
void backward_input(const ConvShape& s, const T* gz, const T* w, T* gx) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C;
  if (s.N == 0) return;
  if (s.cl) {
    // For input column wi: the taps kw with (wi + PW - kw*DW) divisible by SW and the output
    // column inside [0, Wo). Same for rows. Precomputed once per call.
    auto taps_for = [](int64_t i, int64_t P, int64_t D, int64_t S, int64_t K, int64_t O,
                       std::vector<std::pair<int64_t, int64_t>>& out) {
      out.clear();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t t = i + P - k * D;
        if (t < 0 || t % S) continue;
        if (t / S >= O) continue;
        out.emplace_back(k, t / S);
      }
    };
    std::vector<std::vector<std::pair<int64_t, int64_t>>> col(s.W);
    for (int64_t wi = 0; wi < s.W; ++wi) taps_for(wi, s.PW, s.DW, s.SW, s.KW, s.Wo, col[wi]);
    at::parallel_for(0, s.N * s.H, grain_for(s.W * C * s.taps()), [&](int64_t r0, int64_t r1) {
      std::vector<std::pair<int64_t, int64_t>> rowt;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / s.H, hi = r % s.H;
        taps_for(hi, s.PH, s.DH, s.SH, s.KH, s.Ho, rowt);
        T* gr = gx + r * s.W * C;
        const T* gzn = gz + n * s.Ho * s.Wo * C;
        for (int64_t wi = 0; wi < s.W; ++wi) {
          for (int64_t c = 0; c < C; c += VL) {
            const int64_t cnt = std::min(VL, C - c);
            V<T> acc(0);
            for (auto [kh, ho] : rowt) {
              for (auto [kw, wo] : col[wi]) {
                acc = at::vec::fmadd(load(w + (kh * s.KW + kw) * C + c, cnt),
                                     load(gzn + (ho * s.Wo + wo) * C + c, cnt), acc);
              }
            }
            store(acc, gr + wi * C + c, cnt);
          }
        }
      }
    });
    return;
  }
  // NCHW: scatter gz into a zero-upsampled padded plane U, then a stride-1 correlation with the
  // flipped taps: gx[hi][wi] = sum w[kh][kw] * U[hi + (KH-1-kh)*DH][wi + (KW-1-kw)*DW].
  const int64_t OH = (s.KH - 1) * s.DH, OW = (s.KW - 1) * s.DW;
  const int64_t urows = s.H + OH, ucols = s.W + OW + VL;
  const int64_t hw = s.Ho * s.Wo, taps = s.taps();
  at::parallel_for(0, s.N * C, grain_for(s.H * s.W * taps), [&](int64_t p0, int64_t p1) {
    std::vector<T> u(urows * ucols);
    std::vector<V<T>> wv(taps);
    std::vector<int64_t> off(taps);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      std::fill(u.begin(), u.end(), T(0));
      const T* g = gz + p * hw;
      for (int64_t ho = 0; ho < s.Ho; ++ho) {
        const int64_t r = ho * s.SH + OH - s.PH;
        if (r < 0 || r >= urows) continue;
        for (int64_t wo = 0; wo < s.Wo; ++wo) {
          const int64_t q = wo * s.SW + OW - s.PW;
          if (q >= 0 && q < s.W + OW) u[r * ucols + q] = g[ho * s.Wo + wo];
        }
      }
      for (int64_t kh = 0; kh < s.KH; ++kh)
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const int64_t t = kh * s.KW + kw;
          wv[t] = V<T>(w[c * taps + t]);
          off[t] = (s.KH - 1 - kh) * s.DH * ucols + (s.KW - 1 - kw) * s.DW;
        }
      T* gp = gx + p * s.H * s.W;
      for (int64_t hi = 0; hi < s.H; ++hi) {
        const T* base = u.data() + hi * ucols;
        for (int64_t wi = 0; wi < s.W; wi += VL) {
          const int64_t cnt = std::min(VL, s.W - wi);
          V<T> acc(0);
          for (int64_t t = 0; t < taps; ++t) acc = at::vec::fmadd(wv[t], V<T>::loadu(base + off[t] + wi), acc);
          store(acc, gp + hi * s.W + wi, cnt);
        }
      }
    }
  });
}

// ---- backward: weight and bias gradients -----------------------------------------------------

template <typename T>
void backward_weight(const ConvShape& s, const T* x, const T* gz, double* gw, double* gb) {
  constexpr int64_t VL = V<T>::size();
  const int64_t C = s.C, taps = s.taps();
  std::fill(gw, gw + C * taps, 0.0);
  std::fill(gb, gb + C, 0.0);
  if (s.N == 0) return;
  if (s.cl) {
    const int nt = at::get_num_threads();
    std::vector<double> tw(nt * taps * C, 0.0), tb(nt * C, 0.0);
    at::parallel_for(0, s.N * s.Ho, grain_for(s.Wo * C * taps), [&](int64_t r0, int64_t r1) {
      std::vector<T> rw(taps * C), rb(C);
      const int tid = at::get_thread_num();
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / s.Ho, ho = r % s.Ho;
        std::fill(rw.begin(), rw.end(), T(0));
        std::fill(rb.begin(), rb.end(), T(0));
        const int64_t hi0 = ho * s.SH - s.PH;
        int64_t kh0, kh1;
        tap_range(hi0, s.DH, s.KH, s.H, kh0, kh1);
        const T* xn = x + n * s.H * s.W * C;
        const T* grow = gz + r * s.Wo * C;
        for (int64_t wo = 0; wo < s.Wo; ++wo) {
          const int64_t wi0 = wo * s.SW - s.PW;
          int64_t kw0, kw1;
          tap_range(wi0, s.DW, s.KW, s.W, kw0, kw1);
          for (int64_t c = 0; c < C; c += VL) {
            const int64_t cnt = std::min(VL, C - c);
            const V<T> g = load(grow + wo * C + c, cnt);
            store(load(rb.data() + c, cnt) + g, rb.data() + c, cnt);
            for (int64_t kh = kh0; kh < kh1; ++kh) {
              const T* xr = xn + ((hi0 + kh * s.DH) * s.W + wi0) * C + c;
              T* wr = rw.data() + kh * s.KW * C + c;
              for (int64_t kw = kw0; kw < kw1; ++kw) {
                store(at::vec::fmadd(g, load(xr + kw * s.DW * C, cnt), load(wr + kw * C, cnt)), wr + kw * C, cnt);
              }
            }
          }
        }
        double* twt = tw.data() + tid * taps * C;
        for (int64_t i = 0; i < taps * C; ++i) twt[i] += rw[i];
        for (int64_t c = 0; c < C; ++c) tb[tid * C + c] += rb[c];
      }
    });
    for (int t = 0; t < nt; ++t) {
      for (int64_t k = 0; k < taps; ++k)
        for (int64_t c = 0; c < C; ++c) gw[c * taps + k] += tw[(t * taps + k) * C + c];
      for (int64_t c = 0; c < C; ++c) gb[c] += tb[t * C + c];
    }
    return;
  }
  const PlaneBuf d = plane_buf_dims(s, VL);
  const int64_t planes = s.N * C, hw = s.Ho * s.Wo;
  std::vector<double> pw(planes * (taps + 1), 0.0);
  at::parallel_for(0, planes, grain_for(hw * taps), [&](int64_t p0, int64_t p1) {
    std::vector<T> buf(s.SW * d.rows * d.cols);
    std::vector<V<T>> acc(taps + 1);
    std::vector<int64_t> off(taps);
    for (int64_t kh = 0; kh < s.KH; ++kh)
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        const int64_t o = kw * s.DW;
        off[kh * s.KW + kw] = ((o % s.SW) * d.rows + kh * s.DH) * d.cols + o / s.SW;
      }
    for (int64_t p = p0; p < p1; ++p) {
      fill_plane_buf(s, d, x + p * s.H * s.W, buf.data());
      double* out = pw.data() + p * (taps + 1);
      const T* g = gz + p * hw;
      for (int64_t ho = 0; ho < s.Ho; ++ho) {
        std::fill(acc.begin(), acc.end(), V<T>(0));
        const T* base = buf.data() + ho * s.SH * d.cols;
        for (int64_t wo = 0; wo < s.Wo; wo += VL) {
          const int64_t cnt = std::min(VL, s.Wo - wo);
          const V<T> gv = load(g + ho * s.Wo + wo, cnt);  // zero past the row end
          for (int64_t t = 0; t < taps; ++t) acc[t] = at::vec::fmadd(gv, V<T>::loadu(base + off[t] + wo), acc[t]);
          acc[taps] = acc[taps] + gv;
        }
        for (int64_t t = 0; t <= taps; ++t) out[t] += hsum(acc[t], VL);
      }
    }
  });
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const double* src = pw.data() + (n * C + c) * (taps + 1);
      for (int64_t t = 0; t < taps; ++t) gw[c * taps + t] += src[t];
      gb[c] += src[taps];
    }
}

template <typename T>
constexpr DWKernels<T> make_kernels() {
  return DWKernels<T>{&forward<T>, &scale_shift_act<T>, &backward_act<T>, &bn_backward<T>, &backward_input<T>,
                      &backward_weight<T>};
}

}  // namespace fastdw::cpu::CPU_CAPABILITY

#define FASTDW_DEFINE_DWCONV_BN_ACT_TABLE()                                                         \
  FASTDW_ISA_DEFINE(DWKernelTable, dw_table, FASTDW_STR(CPU_CAPABILITY),                            \
                    make_kernels<float>(), make_kernels<double>())
