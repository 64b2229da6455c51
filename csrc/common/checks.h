// Argument checks of every fastdw op, shared by the CPU and CUDA implementations (host code), so
// bad input gets the same clear error, naming the argument, on every device. The Python wrappers
// (fastdw/_validate.py) check first; these guard direct torch.ops.fastdw calls.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "common/channel_shuffle_math.h"
#include "common/dwconv_bn_act_math.h"
#include "common/layout.h"
#include "common/se_scale_math.h"

namespace fastdw {

// The dtypes the kernels of x's device support: float32/float64 on CPU, also float16/bfloat16 on CUDA.
inline void check_kernel_dtype(const at::Tensor& x, const char* op, const char* name) {
  const auto t = x.scalar_type();
  if (x.is_cuda()) {
    TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "fastdw::", op,
                     " (cuda): ", name, " must be float16, bfloat16, float32 or float64, got ", t);
  } else {
    TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble, "fastdw::", op, " (cpu): ", name,
                     " must be float32 or float64, got ", t);
  }
}

// ---- dwconv_bn_act -----------------------------------------------------------------------------

inline Act parse_act(c10::string_view a) {
  if (a == "relu") return Act::ReLU;
  if (a == "relu6") return Act::ReLU6;
  if (a == "hardswish") return Act::HardSwish;
  if (a == "silu") return Act::SiLU;
  TORCH_CHECK_VALUE(a == "none", "fastdw::dwconv_bn_act: unknown activation '", std::string(a),
                    "'; expected relu, relu6, hardswish, silu or none");
  return Act::None;
}

// Must agree with _is_channels_last() in fastdw/ops/dwconv_bn_act.py (fake kernel strides).
inline bool dw_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_dw_vec(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t C) {
  if (!defined(t)) return;
  TORCH_CHECK(t->device() == x.device(), "fastdw::dwconv_bn_act: ", name, " is on ", t->device(),
              " but the input is on ", x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "fastdw::dwconv_bn_act: ", name,
                   " must be floating point, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, "fastdw::dwconv_bn_act: ", name, " must have shape [", C,
                    "], got ", t->sizes());
}

inline ConvShape make_conv_shape(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fastdw::dwconv_bn_act: input must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  check_kernel_dtype(x, "dwconv_bn_act", "input");
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "fastdw::dwconv_bn_act: weight dtype ", w.scalar_type(),
                   " does not match input dtype ", x.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "fastdw::dwconv_bn_act: weight is on ", w.device(), " but the input is on ",
              x.device());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) >= 1 && w.size(3) >= 1,
                    "fastdw::dwconv_bn_act: weight must have shape [C, 1, kh, kw] with C = ", C, ", got ",
                    w.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "fastdw::dwconv_bn_act: stride, padding and dilation must have 2 elements");
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "fastdw::dwconv_bn_act: stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "fastdw::dwconv_bn_act: dilation must be >= 1, got ",
                    dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "fastdw::dwconv_bn_act: padding must be >= 0, got ",
                    padding);
  ConvShape s;
  s.N = x.size(0);
  s.C = C;
  s.H = x.size(2);
  s.W = x.size(3);
  s.KH = w.size(2);
  s.KW = w.size(3);
  s.SH = stride[0];
  s.SW = stride[1];
  s.PH = padding[0];
  s.PW = padding[1];
  s.DH = dilation[0];
  s.DW = dilation[1];
  TORCH_CHECK_VALUE(s.H + 2 * s.PH - s.DH * (s.KH - 1) - 1 >= 0 && s.W + 2 * s.PW - s.DW * (s.KW - 1) - 1 >= 0,
                    "fastdw::dwconv_bn_act: input ", s.H, "x", s.W, " is too small for the kernel ", s.KH, "x", s.KW,
                    " with this padding and dilation");
  s.Ho = conv_out_size(s.H, s.KH, s.SH, s.PH, s.DH);
  s.Wo = conv_out_size(s.W, s.KW, s.SW, s.PW, s.DW);
  s.cl = dw_channels_last(x);
  return s;
}

inline void check_shuffle_groups(int64_t C, int64_t g) {
  TORCH_CHECK_VALUE(g >= 1, "fastdw::dwconv_bn_act: shuffle_groups must be >= 1, got ", g);
  TORCH_CHECK_VALUE(C % g == 0, "fastdw::dwconv_bn_act: shuffle_groups (", g, ") must divide the channels (", C, ")");
}

// The checks common to dwconv_bn_act and its backward; returns the geometry and the activation.
inline std::pair<ConvShape, Act> check_dwconv(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& bn_weight,
                                              const std::optional<at::Tensor>& bn_bias,
                                              const std::optional<at::Tensor>& mean,
                                              const std::optional<at::Tensor>& var, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                              c10::string_view activation, int64_t shuffle_groups) {
  ConvShape s = make_conv_shape(x, weight, stride, padding, dilation);
  check_shuffle_groups(s.C, shuffle_groups);
  const Act act = parse_act(activation);
  for (auto [t, name] : {std::pair{&bias, "bias"}, {&bn_weight, "bn_weight"}, {&bn_bias, "bn_bias"},
                         {&mean, "mean"}, {&var, "var"}})
    check_dw_vec(*t, name, x, s.C);
  return {s, act};
}

// Forward only: statistics given in pairs; training needs more than one value per channel.
inline void check_dwconv_forward(const ConvShape& s, const std::optional<at::Tensor>& mean,
                                 const std::optional<at::Tensor>& var, bool training) {
  TORCH_CHECK_VALUE(defined(mean) == defined(var), "fastdw::dwconv_bn_act: mean and var must be given together");
  TORCH_CHECK_VALUE(!training || s.N * s.Ho * s.Wo != 1,
                    "Expected more than 1 value per channel when training, got input size [", s.N, ", ", s.C, ", ",
                    s.Ho, ", ", s.Wo, "]");
}

// Backward only: grad_out (and the forward's output, if given) has the output's shape; training
// needs the saved batch statistics.
inline void check_dwconv_backward(const ConvShape& s, const at::Tensor& x, const at::Tensor& grad_out,
                                  const std::optional<at::Tensor>& mean, bool training,
                                  const std::optional<at::Tensor>& out) {
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.C &&
                        grad_out.size(2) == s.Ho && grad_out.size(3) == s.Wo,
                    "fastdw::dwconv_bn_act_backward: grad_out has shape ", grad_out.sizes(), ", expected [", s.N,
                    ", ", s.C, ", ", s.Ho, ", ", s.Wo, "]");
  TORCH_CHECK_VALUE(!training || (defined(mean) && mean->numel() > 0),
                    "fastdw::dwconv_bn_act_backward: training needs the saved batch mean/var");
  if (!defined(out)) return;
  TORCH_CHECK(out->device() == x.device(), "fastdw::dwconv_bn_act_backward: out is on ", out->device(),
              " but the input is on ", x.device());
  TORCH_CHECK_TYPE(out->scalar_type() == x.scalar_type(), "fastdw::dwconv_bn_act_backward: out has dtype ",
                   out->scalar_type(), ", the input ", x.scalar_type());
  TORCH_CHECK_VALUE(out->dim() == 4 && out->size(0) == s.N && out->size(1) == s.C && out->size(2) == s.Ho &&
                        out->size(3) == s.Wo,
                    "fastdw::dwconv_bn_act_backward: out has shape ", out->sizes(), ", expected [", s.N, ", ", s.C,
                    ", ", s.Ho, ", ", s.Wo, "]");
}

// ---- se_scale ----------------------------------------------------------------------------------

inline SEAct parse_se_act(c10::string_view a) {
  if (a == "relu") return SEAct::ReLU;
  TORCH_CHECK_VALUE(a == "silu", "fastdw::se_scale: unknown activation '", std::string(a),
                    "'; expected relu or silu");
  return SEAct::SiLU;
}

inline SEGate parse_se_gate(c10::string_view g) {
  if (g == "hardsigmoid") return SEGate::HardSigmoid;
  TORCH_CHECK_VALUE(g == "sigmoid", "fastdw::se_scale: unknown gate '", std::string(g),
                    "'; expected hardsigmoid or sigmoid");
  return SEGate::Sigmoid;
}

inline void check_se_same(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fastdw::se_scale: ", name, " is on ", t.device(), " but the input is on ",
              x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "fastdw::se_scale: ", name, " has dtype ", t.scalar_type(),
                   " but the input has dtype ", x.scalar_type());
}

// A 1x1 conv weight [rows, cols, 1, 1] (or a Linear weight [rows, cols]).
inline void check_se_fc(const at::Tensor& w, const char* name, const at::Tensor& x, int64_t rows, int64_t cols) {
  check_se_same(w, name, x);
  const bool ok = (w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1)) && w.size(0) == rows &&
                  w.size(1) == cols;
  TORCH_CHECK_VALUE(ok, "fastdw::se_scale: ", name, " must have shape [", rows, ", ", cols, ", 1, 1], got ",
                    w.sizes());
}

inline void check_se_bias(const std::optional<at::Tensor>& b, const char* name, const at::Tensor& x, int64_t n) {
  if (!defined(b)) return;
  check_se_same(*b, name, x);
  TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == n, "fastdw::se_scale: ", name, " must have shape [", n,
                    "], got ", b->sizes());
}

inline SEShape make_se_shape(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                             const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  TORCH_CHECK_VALUE(x.dim() >= 3, "fastdw::se_scale: input must have at least 3 dimensions [N, C, *], got ",
                    x.dim(), "-D");
  check_kernel_dtype(x, "se_scale", "input");
  TORCH_CHECK_VALUE(w1.dim() == 2 || w1.dim() == 4, "fastdw::se_scale: fc1_weight must have shape [S, C, 1, 1], got ",
                    w1.sizes());
  SEShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.S = w1.size(0);
  s.HW = inner_size(x);
  s.cl = channels_last_layout(x);
  check_se_fc(w1, "fc1_weight", x, s.S, s.C);
  check_se_fc(w2, "fc2_weight", x, s.C, s.S);
  check_se_bias(b1, "fc1_bias", x, s.S);
  check_se_bias(b2, "fc2_bias", x, s.C);
  return s;
}

inline void check_se_backward(const SEShape& s, const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& pooled) {
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "fastdw::se_scale_backward: grad_out has shape ",
                    grad_out.sizes(), ", expected ", x.sizes());
  TORCH_CHECK_VALUE(pooled.dim() == 2 && pooled.size(0) == s.N && pooled.size(1) == s.C,
                    "fastdw::se_scale_backward: pooled must have shape [", s.N, ", ", s.C, "], got ",
                    pooled.sizes());
  check_se_same(pooled, "pooled", x);
  check_se_same(grad_out, "grad_out", x);
}

// The outputs of se_scale_backward: allocated where mask asks for them (and the bias exists),
// empty [0] tensors elsewhere, as the schema's callers expect.
struct SEGrads {
  at::Tensor gx, gw1, gb1, gw2, gb2;
};
inline SEGrads se_backward_outputs(const SEShape& s, const at::Tensor& x, const at::Tensor& fc1_weight,
                                   const at::Tensor& fc2_weight, bool has_b1, bool has_b2, std::array<bool, 5> mask,
                                   at::MemoryFormat fmt) {
  auto none = [&] { return at::empty({0}, x.options()); };
  return SEGrads{mask[0] ? at::empty(x.sizes(), x.options().memory_format(fmt)) : none(),
                 mask[1] ? at::empty(fc1_weight.sizes(), x.options()) : none(),
                 mask[2] && has_b1 ? at::empty({s.S}, x.options()) : none(),
                 mask[3] ? at::empty(fc2_weight.sizes(), x.options()) : none(),
                 mask[4] && has_b2 ? at::empty({s.C}, x.options()) : none()};
}

// ---- channel_shuffle, concat_shuffle -----------------------------------------------------------

inline void check_shuffle_input(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.dim() >= 3, "fastdw::", op, ": ", name, " must have at least 3 dimensions [N, C, *], got ",
                    x.dim(), "-D");
  check_kernel_dtype(x, op, name);
}

inline void check_channel_shuffle(const at::Tensor& x, int64_t groups) {
  check_shuffle_input(x, "channel_shuffle", "input");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(groups >= 1, "fastdw::channel_shuffle: groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(C % groups == 0, "fastdw::channel_shuffle: groups (", groups,
                    ") must divide the number of channels (", C, ")");
}

inline void check_concat_shuffle(const at::Tensor& a, const at::Tensor& b) {
  check_shuffle_input(a, "concat_shuffle", "a");
  check_shuffle_input(b, "concat_shuffle", "b");
  TORCH_CHECK(b.device() == a.device(), "fastdw::concat_shuffle: b is on ", b.device(), " but a is on ", a.device());
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), "fastdw::concat_shuffle: b has dtype ", b.scalar_type(),
                   " but a has dtype ", a.scalar_type());
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "fastdw::concat_shuffle: a and b must have the same shape, got ",
                    a.sizes(), " and ", b.sizes());
}

inline void check_concat_shuffle_backward(const at::Tensor& grad_out) {
  check_shuffle_input(grad_out, "concat_shuffle_backward", "grad_out");
  TORCH_CHECK_VALUE(grad_out.size(1) % 2 == 0, "fastdw::concat_shuffle_backward: grad_out must have an even number "
                    "of channels, got ", grad_out.size(1));
}

}  // namespace fastdw
