// Per-element maths of fastdw::dwconv_bn_act, shared by csrc/cpu and csrc/cuda (see hd.h): the
// activations and their derivatives, the BatchNorm fold and backward coefficients, the statistics
// merge, tap ranges and output sizes. The CPU kernels run these functions (activations through
// their vector primitives, the rest as they are), so the CPU tests exercise them.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/hd.h"

namespace fastdw {

enum class Act : int { None = 0, ReLU = 1, ReLU6 = 2, HardSwish = 3, SiLU = 4 };

struct ConvShape {
  int64_t N, C, H, W, Ho, Wo;
  int64_t KH, KW, SH, SW, PH, PW, DH, DW;
  bool cl;  // channels_last (NHWC) data; CPU weights are then laid out [KH*KW][C], else [C][KH*KW]
  // CPU, NCHW only: channel c of the conv reads input plane chan_src[c] (and writes its input
  // gradient there): a channel shuffle absorbed into the read. nullptr = identity.
  const int64_t* chan_src = nullptr;
  // CPU slab kernels (forward_small_nchw, backward_small_nchw): the tensors are NHWC, a slab is
  // channels [c0, c0 + cb) of every pixel (else NCHW planes, transposed into the slab).
  bool nhwc_slabs = false;
  int64_t taps() const { return KH * KW; }
  // Offset of input plane (n, c) in an NCHW tensor, through chan_src.
  int64_t in_plane(int64_t p) const {
    const int64_t n = p / C, c = p - n * C;
    return (n * C + (chan_src ? chan_src[c] : c)) * H * W;
  }
};

// Output size of a conv along one dimension (callers check that the numerator is >= 0).
FASTDW_HD inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Taps k in [k0, k1) keep i0 + k * d inside [0, size).
FASTDW_HD inline void tap_range(int64_t i0, int64_t d, int64_t K, int64_t size, int64_t& k0, int64_t& k1) {
  k0 = i0 >= 0 ? 0 : (-i0 + d - 1) / d;
  const int64_t last = size - 1 - i0;  // need k * d <= last
  k1 = last < 0 ? 0 : hd_min<int64_t>(K, last / d + 1);
  if (k1 < k0) k1 = k0;
}

// ---- activations -------------------------------------------------------------------------------
// Written once over a primitive set Ops (ScalarOps<T> in hd.h; the CPU's vector primitives in
// csrc/cpu/dwconv_bn_act_impl.h), so the formula and the conventions at the kinks are one text.

template <int A, typename Ops>
FASTDW_HD inline typename Ops::V act_fwd(typename Ops::V y) {
  if constexpr (A == int(Act::ReLU)) {
    return Ops::clamp_min(y, Ops::splat(0));
  } else if constexpr (A == int(Act::ReLU6)) {
    return Ops::clamp(y, Ops::splat(0), Ops::splat(6));
  } else if constexpr (A == int(Act::HardSwish)) {
    return y * Ops::clamp(y + Ops::splat(3), Ops::splat(0), Ops::splat(6)) / Ops::splat(6);
  } else if constexpr (A == int(Act::SiLU)) {
    return y / (Ops::splat(1) + Ops::exp_neg(y));
  } else {
    return y;
  }
}

// grad_out * act'(y), with PyTorch's conventions at the kinks (relu: y > 0; relu6: 0 < y < 6;
// hardswish: 0 below -3, y/3 + 1/2 up to 3 inclusive, 1 above).
template <int A, typename Ops>
FASTDW_HD inline typename Ops::V act_bwd(typename Ops::V go, typename Ops::V y) {
  using V = typename Ops::V;
  if constexpr (A == int(Act::ReLU)) {
    return Ops::select(y > Ops::splat(0), go, Ops::splat(0));
  } else if constexpr (A == int(Act::ReLU6)) {
    return Ops::select((y > Ops::splat(0)) & (y < Ops::splat(6)), go, Ops::splat(0));
  } else if constexpr (A == int(Act::HardSwish)) {
    const V mid = go * (y / Ops::splat(3) + Ops::splat(0.5));
    const V r = Ops::select(y > Ops::splat(3), go, mid);
    return Ops::select(y < Ops::splat(-3), Ops::splat(0), r);
  } else if constexpr (A == int(Act::SiLU)) {
    const V s = Ops::splat(1) / (Ops::splat(1) + Ops::exp_neg(y));
    return go * s * (Ops::splat(1) + y * (Ops::splat(1) - s));
  } else {
    return go;
  }
}

// Calls f(std::integral_constant<int, A>{}) for the run-time activation a (host side).
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

// ---- BatchNorm ---------------------------------------------------------------------------------

// y = (z - mean) * gamma / sqrt(var + eps) + beta = z * scale + shift. bn_scale is applied to the
// weights (eval: w' = w * scale) and shift absorbs the conv bias: b' = (b - mean) * scale + beta.
FASTDW_HD inline double bn_scale(double gamma, double var, double eps) { return gamma / sqrt(var + eps); }
FASTDW_HD inline double bn_shift(double bias, double mean, double scale, double beta) {
  return (bias - mean) * scale + beta;
}

// Backward, per channel: xhat = (z + a0) * a1 (z the bias-free conv output; the mean is subtracted
// before the scaling, exact near the mean even for a tiny batch variance), y = xhat * gamma + beta,
// and the conv-output gradient gz = k1 * g + k2 * xhat + k3 with g = grad_out * act'(y). In eval
// (or without BN) k2 = k3 = 0; in training bn_train_terms gives them from the sums of g and
// g * xhat over the M = N * Ho * Wo values of the channel.
struct BnBackward {
  double a1, a0, k1, k2, k3;
};
FASTDW_HD inline BnBackward bn_backward(double bias, double mean, double invstd, double gamma) {
  return BnBackward{invstd, bias - mean, gamma * invstd, 0.0, 0.0};
}
// xhat of the backward (scalar or vector V).
template <typename V>
FASTDW_HD inline V bn_xhat(V z, V a0, V a1) {
  return (z + a0) * a1;
}
FASTDW_HD inline void bn_train_terms(BnBackward& b, double sum_g, double sum_g_xhat, double M) {
  b.k2 = -b.k1 * sum_g_xhat / M;
  b.k3 = -b.k1 * sum_g / M;
}

// Chan et al.: merge the statistics (n_b, mean_b, m2_b) of one part into (n_a, mean_a, m2_a).
FASTDW_HD inline void chan_merge(double& n_a, double& mean_a, double& m2_a, double n_b, double mean_b, double m2_b) {
  if (n_b == 0) return;
  const double n = n_a + n_b;
  const double delta = mean_b - mean_a;
  mean_a += delta * n_b / n;
  m2_a += m2_b + delta * delta * n_a * n_b / n;
  n_a = n;
}

}  // namespace fastdw
