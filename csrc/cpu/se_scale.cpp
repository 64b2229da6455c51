// CPU implementation of fastdw::se_scale and its backward: argument checks, layout handling, then
// the kernels of csrc/cpu/se_scale_impl.h for the best instruction set of this CPU.
//
// Forward (two passes over x, the minimum):
//   p = mean_hw(x)                       pass 1 (reads x)
//   h = W1 p + b1, z = W2 act(h) + b2, g = gate(z)     [N][S] and [N][C] vectors only
//   out = x * g                          pass 2 (reads x, writes out)
// Returns (out, p); only x and p are saved for backward, h, z and g are recomputed from p.
// Backward, given go = dL/dout:
//   dg[n, c] = sum_hw go * x             one pass reading go and x
//   dz = dg gate'(z); dW2 = dz^T act(h); db2 = sum_n dz; dh = (dz W2) act'(h);
//   dW1 = dh^T p; db1 = sum_n dh; dp = dh W1
//   dx = go * g + dp / HW                one pass reading go, writing dx
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/checks.h"
#include "cpu/se_scale_kernel.h"

namespace fastdw::cpu {
namespace {

template <typename T>
const SEKernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return se_table_for_cpu().f32;
  else return se_table_for_cpu().f64;
}

template <typename T>
std::vector<T> bias_or_zeros(const std::optional<at::Tensor>& b, int64_t n) {
  if (!b.has_value() || !b->defined()) return std::vector<T>(n, T(0));
  at::Tensor c = b->contiguous();
  return std::vector<T>(c.const_data_ptr<T>(), c.const_data_ptr<T>() + n);
}

// Recomputes h, z and g from the pooled means (cheap: [N][S] and [N][C] vectors).
template <typename T>
void run_excite(const SEShape& s, SEAct act, SEGate gate, const T* p, const at::Tensor& w1,
                const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                std::vector<T>& h, std::vector<T>& z, std::vector<T>& g) {
  const std::vector<T> bb1 = bias_or_zeros<T>(b1, s.S), bb2 = bias_or_zeros<T>(b2, s.C);
  h.resize(s.N * s.S);
  z.resize(s.N * s.C);
  g.resize(s.N * s.C);
  kernels<T>().excite(s, act, gate, p, w1.const_data_ptr<T>(), bb1.data(), w2.const_data_ptr<T>(), bb2.data(),
                      h.data(), z.data(), g.data());
}

std::tuple<at::Tensor, at::Tensor> se_scale_cpu(const at::Tensor& x, const at::Tensor& fc1_weight,
                                                const std::optional<at::Tensor>& fc1_bias,
                                                const at::Tensor& fc2_weight,
                                                const std::optional<at::Tensor>& fc2_bias,
                                                c10::string_view activation, c10::string_view gate) {
  const SEShape s = make_se_shape(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  const SEAct act = parse_se_act(activation);
  const SEGate gt = parse_se_gate(gate);
  const auto fmt = layout_format(x, s.cl);
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor pooled = at::empty({s.N, s.C}, x.options());
  const at::Tensor w1 = fc1_weight.reshape({s.S, s.C}).contiguous();
  const at::Tensor w2 = fc2_weight.reshape({s.C, s.S}).contiguous();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "se_scale_cpu", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    std::vector<double> sums(s.N * s.C);
    k.channel_sums(s, xc.const_data_ptr<T>(), nullptr, sums.data());
    T* p = pooled.mutable_data_ptr<T>();
    for (int64_t i = 0; i < s.N * s.C; ++i) p[i] = static_cast<T>(sums[i] / double(s.HW));
    std::vector<T> h, z, g;
    run_excite<T>(s, act, gt, p, w1, fc1_bias, w2, fc2_bias, h, z, g);
    k.scale(s, xc.const_data_ptr<T>(), g.data(), nullptr, out.mutable_data_ptr<T>());
  });
  return {out, pooled};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_scale_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pooled, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, c10::string_view activation, c10::string_view gate,
    std::array<bool, 5> mask) {
  const SEShape s = make_se_shape(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  const SEAct act = parse_se_act(activation);
  const SEGate gt = parse_se_gate(gate);
  check_se_backward(s, grad_out, x, pooled);
  const auto fmt = layout_format(x, s.cl);
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor pc = pooled.contiguous();
  const at::Tensor w1 = fc1_weight.reshape({s.S, s.C}).contiguous();
  const at::Tensor w2 = fc2_weight.reshape({s.C, s.S}).contiguous();
  const bool has_b1 = fc1_bias.has_value() && fc1_bias->defined();
  const bool has_b2 = fc2_bias.has_value() && fc2_bias->defined();
  auto [gx, gw1, gb1, gw2, gb2] = se_backward_outputs(s, x, fc1_weight, fc2_weight, has_b1, has_b2, mask, fmt);
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return {gx, gw1, gb1, gw2, gb2};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "se_scale_backward_cpu", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const T* p = pc.const_data_ptr<T>();
    std::vector<T> h, z, g;
    run_excite<T>(s, act, gt, p, w1, fc1_bias, w2, fc2_bias, h, z, g);
    std::vector<double> sums(s.N * s.C);
    k.channel_sums(s, go.const_data_ptr<T>(), xc.const_data_ptr<T>(), sums.data());
    std::vector<T> dg(sums.begin(), sums.end()), dp(mask[0] ? s.N * s.C : 0);
    auto ptr = [](at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<T>() : nullptr; };
    k.excite_backward(s, act, gt, p, w1.const_data_ptr<T>(), w2.const_data_ptr<T>(), h.data(), z.data(), dg.data(),
                      mask[0] ? dp.data() : nullptr, ptr(gw1), ptr(gb1), ptr(gw2), ptr(gb2));
    if (mask[0]) {
      const T inv = T(1) / T(s.HW);
      for (T& v : dp) v *= inv;
      k.scale(s, go.const_data_ptr<T>(), g.data(), dp.data(), gx.mutable_data_ptr<T>());
    }
  });
  return {gx, gw1, gb1, gw2, gb2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CPU, m) {
  m.impl("se_scale", &se_scale_cpu);
  m.impl("se_scale_backward", &se_scale_backward_cpu);
}

}  // namespace fastdw::cpu
