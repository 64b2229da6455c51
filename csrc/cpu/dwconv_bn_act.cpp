// CPU implementation of fastdw::dwconv_bn_act and its backward: argument checks, BatchNorm
// folding, layout handling, then the kernels of csrc/cpu/dwconv_bn_act_impl.h for the best
// instruction set of this CPU.
//
// Forward, eval: BN is folded into the weights once per call (w' = w * g / sqrt(v + eps),
// b' = (b - m) * g / sqrt(v + eps) + beta): one pass, activation applied before the only store.
// Forward, training: pass 1 writes z = conv(x) + b and reduces per-channel statistics while each
// row (NHWC) or plane (NCHW) is in cache; pass 2 normalises and activates in place (the output is
// smaller than the input, so this is cheaper than recomputing the conv).
// Backward: recomputes z from x (x and per-channel vectors are saved; in training with relu /
// relu6 also the output, see sums_from_output), applies the activation derivative, reduces the BN
// parameter gradients, then the conv input and weight gradients. The conv-output gradient gz is
// never stored: NHWC, each band of a few rows feeds both gradients while it is in cache
// (backward_rows; in training after a first pass for the BN sums, from the output where it can);
// NCHW, one task per channel (training) or plane (eval), each plane's gz used the same way
// (backward_planes); small planes the same way on slabs of 64 channels (backward_small_nchw).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "cpu/aligned.h"
#include "cpu/dwconv_bn_act_kernel.h"

namespace fastdw::cpu {
namespace {

// Per-channel parameters are tiny; read them straight from memory (no ATen op per call: the
// fixed cost matters for the small layers of batch-1 inference).
std::vector<double> as_doubles(const at::Tensor& t, int64_t n) {
  std::vector<double> out(n);
  const int64_t st = t.dim() > 0 ? t.stride(0) : 0;
  if (t.scalar_type() == at::kFloat) {
    const float* p = t.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i * st];
  } else if (t.scalar_type() == at::kDouble) {
    const double* p = t.const_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i * st];
  } else {
    at::Tensor d = t.detach().to(at::kDouble).contiguous();
    std::copy(d.const_data_ptr<double>(), d.const_data_ptr<double>() + n, out.begin());
  }
  return out;
}

std::vector<double> as_doubles(const std::optional<at::Tensor>& t, int64_t n, double fill) {
  if (!t.has_value() || !t->defined()) return std::vector<double>(n, fill);
  return as_doubles(*t, n);
}

// Weights in the kernel's layout: [C][taps] (NCHW) or [taps][C] (NHWC), each scaled by scale[c]
// (in double, rounded once). Read straight from the weight's memory: no double copy of it.
template <typename T>
AlignedVec<T> weights(const ConvShape& s, const at::Tensor& w, const std::vector<double>& scale) {
  const int64_t C = s.C, taps = s.taps();
  AlignedVec<T> out(C * taps);
  auto fill = [&](const auto* p) {
    if (s.cl) {
      for (int64_t t = 0; t < taps; ++t) {
        T* o = out.data() + t * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(static_cast<double>(p[c * taps + t]) * scale[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < taps; ++t)
          out[c * taps + t] = static_cast<T>(static_cast<double>(p[c * taps + t]) * scale[c]);
    }
  };
  const at::Tensor wc = w.contiguous();
  if (wc.scalar_type() == at::kFloat) fill(wc.const_data_ptr<float>());
  else if (wc.scalar_type() == at::kDouble) fill(wc.const_data_ptr<double>());
  else fill(wc.to(at::kDouble).const_data_ptr<double>());
  return out;
}

// Input channel c of the conv is channel src[c] of x when x is read through channel_shuffle(x, g).
std::vector<int64_t> shuffle_sources(int64_t C, int64_t g) {
  if (g == 1) return {};  // read in order: the kernels take no source table then
  std::vector<int64_t> src(C);
  for (int64_t c = 0; c < C; ++c) src[c] = shuffle_src(c, C, g);
  return src;
}

// Which kernels run a call. Small NCHW planes (MobileNet's 7x7 and 14x14 layers) waste most of
// each vector along W and pay a per-plane setup; there the channels_last kernels run instead: on
// slabs of 64 channels transposed inside the kernel (forward_small_nchw, backward_small_nchw) when
// x is dense, else on a transposed copy; the result is returned in NCHW as usual.
// Tiny channels_last planes (<= 64 pixels, MobileNet's 7x7 layers) run on slabs too, each slab's
// channels copied out of every pixel (ConvShape::nhwc_slabs): one task per 64 channels over the
// whole batch, and at batch 1 the training backward's sums and gradients from one recompute of z
// (the row kernel, backward_rows, splits a 7-row image between threads, recomputes the rows either
// side of the split and z twice). Training step at 1x960x7x7, 2 threads, in one run of
// python -m bench.dwconv_bn_act: channels_last 0.419-0.435 ms, NCHW (slabs) 0.355-0.380. Their
// forward stays on the row kernel: on slabs, 1x960x7x7 eval took 39.5-46.4 us against 36.7-38.1
// and the training forward 60-67 against 65-66 (two runs each, 2 threads).
struct KernelPath {
  bool slabs = false;      // forward_small_nchw / backward_small_nchw
  bool nhwc_copy = false;  // NCHW x on a channels_last copy: results relayouted back to NCHW
  at::MemoryFormat fmt;    // the layout the kernels read and write
};

// Chooses the path from x's own layout and sets s.cl / s.nhwc_slabs for the kernels.
KernelPath choose_path(ConvShape& s, const at::Tensor& x, int64_t shuffle_groups, bool backward) {
  KernelPath k;
  const bool plain = shuffle_groups == 1 && s.C >= 8;
  k.fmt = s.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (plain && !s.cl && s.H * s.W <= 256) {
    k.slabs = x.is_contiguous();  // the slabs read and write the NCHW tensors themselves
    k.nhwc_copy = !k.slabs;
    if (k.nhwc_copy) k.fmt = at::MemoryFormat::ChannelsLast;
    s.cl = true;
  } else if (plain && s.cl && s.H * s.W <= 64 && backward) {
    k.slabs = true;
    s.nhwc_slabs = true;
  }
  return k;
}

template <typename T>
AlignedVec<T> cast(const std::vector<double>& v) {
  return AlignedVec<T>(v.begin(), v.end());
}

template <typename T>
const DWKernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return dw_table_for_cpu().f32;
  else return dw_table_for_cpu().f64;
}

// t in memory format fmt (ChannelsLast or Contiguous). A dense 4-D tensor of the other layout
// goes through the kernels' blocked transpose, ~4-8x faster than Tensor::contiguous at the small
// planes where NCHW runs on the NHWC kernel; anything else is Tensor::contiguous.
at::Tensor relayout(const at::Tensor& t, at::MemoryFormat fmt) {
  if (t.is_contiguous(fmt)) return t;
  const bool to_cl = fmt == at::MemoryFormat::ChannelsLast;
  const bool other = to_cl ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto dt = t.scalar_type();
  if (t.dim() != 4 || !other || (dt != at::kFloat && dt != at::kDouble)) return t.contiguous(fmt);
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(fmt));
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  AT_DISPATCH_FLOATING_TYPES(dt, "fastdw_relayout", [&] {
    kernels<scalar_t>().transpose(t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N,
                                  to_cl ? C : HW, to_cl ? HW : C);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, bool training, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    int64_t shuffle_groups) {
  auto [s, act] = check_dwconv(x, weight, bias, bn_weight, bn_bias, mean, var, stride, padding, dilation,
                               activation, shuffle_groups);
  check_dwconv_forward(s, mean, var, training);
  const std::vector<int64_t> src = shuffle_sources(s.C, shuffle_groups);
  const KernelPath path = choose_path(s, x, shuffle_groups, /*backward=*/false);
  const bool has_stats = defined(mean);
  const bool normalises = training || has_stats;
  const auto fmt = path.fmt;
  at::Tensor xc = shuffle_groups > 1 && s.cl ? shuffled(x, shuffle_groups, fmt) : relayout(x, fmt);
  if (shuffle_groups > 1 && !s.cl) s.chan_src = src.data();
  at::Tensor out = at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(fmt));
  at::Tensor save_mean = at::empty({training ? s.C : 0}, x.options());
  at::Tensor save_var = at::empty({training ? s.C : 0}, x.options());

  const std::vector<double> b = as_doubles(bias, s.C, 0.0);
  const std::vector<double> g = as_doubles(bn_weight, s.C, 1.0);
  const std::vector<double> beta = as_doubles(bn_bias, s.C, 0.0);
  std::vector<double> scale(s.C, 1.0), shift(s.C, 0.0);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_act_cpu", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    if (training) {
      std::vector<double> bm(s.C), bv(s.C);
      const AlignedVec<T> w = weights<T>(s, weight, scale);
      const AlignedVec<T> bt = cast<T>(b);
      if (path.slabs)
        k.forward_small_nchw(s, Act::None, xc.const_data_ptr<T>(), w.data(), bt.data(), out.mutable_data_ptr<T>(),
                             bm.data(), bv.data());
      else
        k.forward(s, Act::None, xc.const_data_ptr<T>(), w.data(), bt.data(), out.mutable_data_ptr<T>(), bm.data(),
                  bv.data());
      for (int64_t c = 0; c < s.C; ++c) {
        scale[c] = bn_scale(g[c], bv[c], eps);
        shift[c] = bn_shift(0.0, bm[c], scale[c], beta[c]);
        save_mean.mutable_data_ptr<T>()[c] = static_cast<T>(bm[c]);
        save_var.mutable_data_ptr<T>()[c] = static_cast<T>(bv[c]);
      }
      const AlignedVec<T> sc = cast<T>(scale), sh = cast<T>(shift);
      ConvShape so = s;
      so.cl = fmt == at::MemoryFormat::ChannelsLast;  // out's layout (NCHW slabs: NCHW)
      k.scale_shift_act(so, act, out.mutable_data_ptr<T>(), sc.data(), sh.data());
      return;
    }
    std::vector<double> fb(b);
    if (normalises) {
      const std::vector<double> m = as_doubles(mean, s.C, 0.0), v = as_doubles(var, s.C, 1.0);
      for (int64_t c = 0; c < s.C; ++c) {
        scale[c] = bn_scale(g[c], v[c], eps);
        fb[c] = bn_shift(b[c], m[c], scale[c], beta[c]);
      }
    }
    const AlignedVec<T> w = weights<T>(s, weight, scale);
    const AlignedVec<T> bt = cast<T>(fb);
    if (path.slabs)
      k.forward_small_nchw(s, act, xc.const_data_ptr<T>(), w.data(), bt.data(), out.mutable_data_ptr<T>(), nullptr,
                           nullptr);
    else
      k.forward(s, act, xc.const_data_ptr<T>(), w.data(), bt.data(), out.mutable_data_ptr<T>(), nullptr, nullptr);
  });
  if (path.nhwc_copy) out = relayout(out, at::MemoryFormat::Contiguous);
  return {out, save_mean, save_var};
}

// Whether the NHWC training backward takes its BatchNorm sums (sum of g and of g * xhat) from the
// forward's output out instead of a conv recompute: relu / relu6, where the activation passes a
// gradient y = out, so g = grad_out * act'(out) and xhat = (out - beta) / gamma. The division
// costs accuracy where gamma is small against what out holds (out's rounding, ~eps * |out|, over
// gamma): every channel needs |gamma| >= 1/64 of |beta| (relu) or of min(|beta|, 6) (relu6), and
// gamma != 0; else z is recomputed (the error of xhat then stays within eps * (|xhat| + 64)).
// The pass reads out and grad_out instead of x and grad_out plus a conv: at stride 2 a quarter of
// the bytes. Training backward at op level, 2 threads, interleaved, recompute / from out (us):
// 1x96x112x112 s2 487 / 400, 1x576x14x14 s2 88 / 81, 1x144x56x56 377 / 359, 1x32x112x112 296 /
// 280; 8x144x56x56 2667 / 2627 (as many bytes either way; with 1 thread 6845 / 7118).
bool sums_from_output(const ConvShape& s, Act act, const std::optional<at::Tensor>& out, const std::vector<double>& g,
                      const std::vector<double>& beta) {
  if (!defined(out) || (act != Act::ReLU && act != Act::ReLU6) || !s.cl || s.nhwc_slabs ||
      !out->is_contiguous(at::MemoryFormat::ChannelsLast))
    return false;
  for (int64_t c = 0; c < s.C; ++c) {
    const double held = act == Act::ReLU6 ? std::min(std::abs(beta[c]), 6.0) : std::abs(beta[c]);
    if (!(g[c] != 0.0 && held <= 64.0 * std::abs(g[c]))) return false;  // also false for NaN
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, bool training, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    std::array<bool, 5> mask, int64_t shuffle_groups, const std::optional<at::Tensor>& out) {
  auto [s, act] = check_dwconv(x, weight, bias, bn_weight, bn_bias, mean, var, stride, padding, dilation,
                               activation, shuffle_groups);
  check_dwconv_backward(s, x, grad_out, mean, training, out);
  const std::vector<int64_t> src = shuffle_sources(s.C, shuffle_groups);
  const KernelPath path = choose_path(s, x, shuffle_groups, /*backward=*/true);
  const bool has_stats = defined(mean) && mean->numel() > 0;
  const bool normalises = training || has_stats;
  const auto fmt = path.fmt;
  const bool shuffle_copy = shuffle_groups > 1 && s.cl;
  at::Tensor xc = shuffle_copy ? shuffled(x, shuffle_groups, fmt) : relayout(x, fmt);
  if (shuffle_groups > 1 && !s.cl) s.chan_src = src.data();
  at::Tensor go = relayout(grad_out.to(x.scalar_type()), fmt);
  at::Tensor gx = mask[0] ? at::empty_like(xc, x.options().memory_format(fmt)) : at::empty({0}, x.options());

  const std::vector<double> b = as_doubles(bias, s.C, 0.0);
  const std::vector<double> g = as_doubles(bn_weight, s.C, 1.0);
  const std::vector<double> beta = as_doubles(bn_bias, s.C, 0.0);
  std::vector<double> m(s.C, 0.0), invstd(s.C, 1.0);
  if (normalises) {
    m = as_doubles(mean, s.C, 0.0);
    const std::vector<double> v = as_doubles(var, s.C, 1.0);
    for (int64_t c = 0; c < s.C; ++c) invstd[c] = 1.0 / std::sqrt(v[c] + eps);
  }
  std::vector<double> sum_gy(s.C), sum_gyx(s.C), dw(s.C * s.taps()), db(s.C);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_act_backward_cpu", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const std::vector<double> ones(s.C, 1.0);
    const AlignedVec<T> w = weights<T>(s, weight, ones);
    // xhat = (z + a0) * a1 with z the bias-free conv output (the mean is subtracted before the
    // scaling: with a tiny batch variance, z * invstd - mean * invstd would cancel badly);
    // gz = k1 * g + k2 * xhat + k3. The coefficients: bn_backward (csrc/common).
    std::vector<double> a1(s.C), a0(s.C), k1(s.C), k2(s.C, 0.0), k3(s.C, 0.0);
    std::vector<BnBackward> bn(s.C);
    for (int64_t c = 0; c < s.C; ++c) {
      bn[c] = bn_backward(b[c], m[c], invstd[c], g[c]);
      a1[c] = bn[c].a1;
      a0[c] = bn[c].a0;
      k1[c] = bn[c].k1;
    }
    const AlignedVec<T> a1t = cast<T>(a1), a0t = cast<T>(a0), gt = cast<T>(g), bet = cast<T>(beta);
    AlignedVec<T> k1t = cast<T>(k1), k2t = cast<T>(k2), k3t = cast<T>(k3);
    BwdParams<T> p{a1t.data(), a0t.data(), gt.data(), bet.data(), k1t.data(), k2t.data(), k3t.data()};
    const bool need_gz = mask[0] || mask[1] || mask[2];
    const T* xp = xc.const_data_ptr<T>();
    const T* gop = go.const_data_ptr<T>();
    T* gxp = mask[0] ? gx.mutable_data_ptr<T>() : nullptr;
    const bool wgrad = mask[1] || mask[2];
    double* gwp = wgrad ? dw.data() : nullptr;
    if (!s.cl || path.slabs) {
      // NCHW planes or slabs: gz is recomputed per plane (or slab) and used there, never stored; in
      // training the kernel derives k2 / k3 per channel itself.
      (path.slabs ? k.backward_small_nchw : k.backward_planes)(s, act, xp, w.data(), p, gop, gxp, gwp, db.data(),
                                                               sum_gy.data(), sum_gyx.data(), training);
      return;
    }
    // NHWC: gz recomputed per band of rows and used there, never stored (backward_rows).
    if (!training) {
      // One pass: BN parameter sums and the gradients (gz = k1 * g) together.
      k.backward_rows(s, act, xp, w.data(), p, gop, gxp, gwp, db.data(), sum_gy.data(), sum_gyx.data());
      return;
    }
    // Pass 1: the sums, which gz needs (from the forward's output where it can: no conv); pass 2:
    // the gradients.
    if (sums_from_output(s, act, out, g, beta)) {
      k.output_sums(s, act, out->const_data_ptr<T>(), gop, bet.data(), sum_gy.data(), sum_gyx.data());
      for (int64_t c = 0; c < s.C; ++c) sum_gyx[c] /= g[c];
    } else {
      k.backward_rows(s, act, xp, w.data(), p, gop, nullptr, nullptr, nullptr, sum_gy.data(), sum_gyx.data());
    }
    if (!need_gz) return;
    const double M = double(s.N * s.Ho * s.Wo);
    for (int64_t c = 0; c < s.C; ++c) {
      bn_train_terms(bn[c], sum_gy[c], sum_gyx[c], M);
      k2t[c] = static_cast<T>(bn[c].k2);
      k3t[c] = static_cast<T>(bn[c].k3);
    }
    k.backward_rows(s, act, xp, w.data(), p, gop, gxp, gwp, db.data(), nullptr, nullptr);
  });
  // The double sums rounded once into a tensor of the parameter's dtype (directly: at::tensor, reshape
  // and a dtype copy were ~12 us of a batch-1 backward).
  auto to_tensor = [&](const std::vector<double>& v, at::IntArrayRef shape, at::ScalarType dt) {
    at::Tensor t = at::empty(shape, x.options().dtype(dt));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "fastdw_grad_tensor", [&] {
      scalar_t* p = t.mutable_data_ptr<scalar_t>();
      for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
    });
    return t;
  };
  auto none = [&] { return at::empty({0}, x.options()); };  // separate tensors: outputs must not alias
  const at::Tensor gw = mask[1] ? to_tensor(dw, weight.sizes(), weight.scalar_type()) : none();
  const at::Tensor gb = mask[2] && bias.has_value() ? to_tensor(db, {s.C}, bias->scalar_type()) : none();
  const at::Tensor gbw = mask[3] && bn_weight.has_value() ? to_tensor(sum_gyx, {s.C}, bn_weight->scalar_type()) : none();
  const at::Tensor gbb = mask[4] && bn_bias.has_value() ? to_tensor(sum_gy, {s.C}, bn_bias->scalar_type()) : none();
  if (path.nhwc_copy && mask[0]) gx = relayout(gx, at::MemoryFormat::Contiguous);
  if (!mask[0]) gx = none();
  else if (shuffle_copy) {
    // gx holds the gradient of the shuffled copy: un-shuffle (the inverse is a shuffle by C / g).
    gx = shuffled(gx, s.C / shuffle_groups, fmt);
  }
  return {gx, gw, gb, gbw, gbb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CPU, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act_cpu);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward_cpu);
}

}  // namespace fastdw::cpu
