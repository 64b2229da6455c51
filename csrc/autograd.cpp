// Autograd for the compiled fastdw ops (every device: CPU and CUDA kernels sit below it), as
// torch::autograd::Function kernels on the Autograd dispatch key. Each forward saves what the
// backward op needs and calls the op below autograd; each backward calls the op's own backward op
// (fastdw::<op>_backward, or the op itself for channel_shuffle) through the dispatcher.
//
// Why C++ and not torch.library.register_autograd: the Python autograd layer cost ~45 us per
// training forward of dwconv_bn_act (measured at 1x960x7x7: 94 us through torch.ops against 48 us
// for the kernel) and as much again in backward; a batch-1 depthwise layer's kernels take ~50-150
// us. The Triton twins (fastdw::triton_*) keep the Python registration (fastdw/ops/*.py), and the
// fake kernels for torch.compile stay in Python too.
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastdw {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<at::Tensor>;

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }
at::Tensor or_undefined(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }
bool given(const OptT& t) { return t.has_value() && t->defined(); }
// needs_input_grad for the tensor arguments in order, given which are present: autograd numbers
// its input edges over the defined tensors only (an absent optional tensor has no edge).
class Needs {
 public:
  explicit Needs(AutogradContext* ctx) : ctx_(ctx) {}
  bool operator()(bool present) { return present && ctx_->needs_input_grad(edge_++); }

 private:
  AutogradContext* ctx_;
  size_t edge_ = 0;
};
// The gradient where it was asked for, else undefined (autograd's "None").
at::Tensor keep(bool wanted, const at::Tensor& g) { return wanted ? g : at::Tensor(); }

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// True where autograd would record the call: grad mode on and some input needs a gradient.
// Otherwise the kernels below call the op directly, skipping Function::apply (~0.7 us a call:
// it allocates the graph node and the saved state even when nothing is recorded).
bool records(std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}
const at::Tensor* ptr(const OptT& t) { return t.has_value() ? &*t : nullptr; }

// ---- dwconv_bn_act --------------------------------------------------------------------------------

using DWForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, bool,
    double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, c10::string_view, int64_t);
const c10::TypedOperatorHandle<DWForwardSig>& dw_forward_op() {
  static const auto op = handle<DWForwardSig>("fastdw::dwconv_bn_act");
  return op;
}
using DWBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
    const OptT&, bool, double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, c10::string_view,
    std::array<bool, 5>, int64_t, const OptT&);
const c10::TypedOperatorHandle<DWBackwardSig>& dw_backward_op() {
  static const auto op = handle<DWBackwardSig>("fastdw::dwconv_bn_act_backward");
  return op;
}

class DWConvBNActBackwardFn : public torch::autograd::Function<DWConvBNActBackwardFn> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& weight, const OptT& bias, const OptT& bn_weight, const OptT& bn_bias,
                               const OptT& mean, const OptT& var, bool training, double eps, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
                               std::array<bool, 5> mask, int64_t shuffle_groups, const OptT& out) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [gx, gw, gb, gbw, gbb] = dw_backward_op().call(grad_out, x, weight, bias, bn_weight, bn_bias, mean, var,
                                                        training, eps, stride, padding, dilation, activation, mask,
                                                        shuffle_groups, out);
    return {gx, gw, gb, gbw, gbb};
  }
  static variable_list backward(AutogradContext*, const variable_list&) {
    // Without this a gradient of the gradient would silently be zero.
    TORCH_CHECK(false,
                "fastdw.ops.dwconv_bn_act does not support double backward (gradients of gradients); "
                "use fastdw.use_backend('reference') for that");
  }
};

// Whether the forward saves its output for the backward: in CPU training with relu / relu6, whose
// backward takes the BatchNorm sums from it instead of recomputing the conv (csrc/cpu/
// dwconv_bn_act.cpp, sums_from_output). Eager's Conv2d -> BatchNorm2d -> ReLU6(inplace=True)
// saves the same tensor (hardtanh_'s result), so an in-place change of the output before backward
// raises autograd's "modified by an inplace operation" error in both. The tensor is the one the
// op returns (no extra memory). Other devices and activations save nothing more.
bool saves_output(const at::Tensor& x, bool training, c10::string_view activation) {
  return training && x.device().is_cpu() && (activation == "relu" || activation == "relu6");
}

class DWConvBNActFn : public torch::autograd::Function<DWConvBNActFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                               const OptT& bn_weight, const OptT& bn_bias, const OptT& mean, const OptT& var,
                               bool training, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, c10::string_view activation, int64_t shuffle_groups) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, save_mean, save_var] = dw_forward_op().call(x, weight, bias, bn_weight, bn_bias, mean, var, training,
                                                           eps, stride, padding, dilation, activation, shuffle_groups);
    // Training normalises with the batch statistics the op returns, eval with the running ones.
    // The output too where the CPU backward takes its BatchNorm sums from it (saves_output).
    ctx->save_for_backward({x, weight, or_undefined(bias), or_undefined(bn_weight), or_undefined(bn_bias),
                            training ? save_mean : or_undefined(mean), training ? save_var : or_undefined(var),
                            saves_output(x, training, activation) ? out : at::Tensor()});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["shuffle_groups"] = shuffle_groups;
    ctx->mark_non_differentiable({save_mean, save_var});
    // The statistics never get a gradient: no zero tensors for them (the backward reads grads[0] only).
    ctx->set_materialize_grads(false);
    return {out, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const OptT bias = opt(saved[2]), bn_weight = opt(saved[3]), bn_bias = opt(saved[4]);
    Needs need(ctx);
    const bool nx = need(true), nw = need(true), nb = need(given(bias)), nbw = need(given(bn_weight));
    const std::array<bool, 5> mask{nx, nw, nb, nbw, need(given(bn_bias))};
    variable_list result(14);
    if (!grads[0].defined()) return result;  // the output was not used: every gradient is zero
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto& d = ctx->saved_data;
    auto g = DWConvBNActBackwardFn::apply(grads[0], x, weight, bias, bn_weight, bn_bias, opt(saved[5]), opt(saved[6]),
                                          d["training"].toBool(), d["eps"].toDouble(), d["stride"].toIntVector(),
                                          d["padding"].toIntVector(), d["dilation"].toIntVector(), activation, mask,
                                          d["shuffle_groups"].toInt(), opt(saved[7]));
    for (int i = 0; i < 5; ++i) result[i] = keep(mask[i], g[i]);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptT& bias, const OptT& bn_weight, const OptT& bn_bias,
    const OptT& mean, const OptT& var, bool training, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view activation, int64_t shuffle_groups) {
  if (!records({&x, &weight, ptr(bias), ptr(bn_weight), ptr(bn_bias), ptr(mean), ptr(var)})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return dw_forward_op().call(x, weight, bias, bn_weight, bn_bias, mean, var, training, eps, stride, padding,
                                dilation, activation, shuffle_groups);
  }
  auto r = DWConvBNActFn::apply(x, weight, bias, bn_weight, bn_bias, mean, var, training, eps, stride, padding,
                                dilation, activation, shuffle_groups);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
    const OptT& bn_weight, const OptT& bn_bias, const OptT& mean, const OptT& var, bool training, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    std::array<bool, 5> mask, int64_t shuffle_groups, const OptT& out) {
  auto r = DWConvBNActBackwardFn::apply(grad_out, x, weight, bias, bn_weight, bn_bias, mean, var, training, eps,
                                        stride, padding, dilation, activation, mask, shuffle_groups, out);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// ---- se_scale -------------------------------------------------------------------------------------

using SEForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptT&,
                                                        const at::Tensor&, const OptT&, c10::string_view,
                                                        c10::string_view);
const c10::TypedOperatorHandle<SEForwardSig>& se_forward_op() {
  static const auto op = handle<SEForwardSig>("fastdw::se_scale");
  return op;
}
using SEBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
    const OptT&, c10::string_view, c10::string_view, std::array<bool, 5>);
const c10::TypedOperatorHandle<SEBackwardSig>& se_backward_op() {
  static const auto op = handle<SEBackwardSig>("fastdw::se_scale_backward");
  return op;
}

class SEScaleFn : public torch::autograd::Function<SEScaleFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fc1_weight,
                               const OptT& fc1_bias, const at::Tensor& fc2_weight, const OptT& fc2_bias,
                               c10::string_view activation, c10::string_view gate) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, pooled] = se_forward_op().call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate);
    ctx->save_for_backward({x, pooled, fc1_weight, or_undefined(fc1_bias), fc2_weight, or_undefined(fc2_bias)});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["gate"] = std::string(gate);
    ctx->mark_non_differentiable({pooled});
    return {out, pooled};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const OptT b1 = opt(saved[3]), b2 = opt(saved[5]);
    Needs need(ctx);
    const bool nx = need(true), nw1 = need(true), nb1 = need(given(b1)), nw2 = need(true);
    const std::array<bool, 5> mask{nx, nw1, nb1, nw2, need(given(b2))};
    variable_list result(7);
    if (!grads[0].defined()) return result;
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::string gate = ctx->saved_data["gate"].toStringRef();
    auto [gx, gw1, gb1, gw2, gb2] =
        se_backward_op().call(grads[0], saved[0], saved[1], saved[2], b1, saved[4], b2, activation, gate, mask);
    const std::array<at::Tensor, 5> g{gx, gw1, gb1, gw2, gb2};
    for (int i = 0; i < 5; ++i) result[i] = keep(mask[i], g[i]);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> se_scale_autograd(const at::Tensor& x, const at::Tensor& fc1_weight,
                                                     const OptT& fc1_bias, const at::Tensor& fc2_weight,
                                                     const OptT& fc2_bias, c10::string_view activation,
                                                     c10::string_view gate) {
  if (!records({&x, &fc1_weight, ptr(fc1_bias), &fc2_weight, ptr(fc2_bias)})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return se_forward_op().call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate);
  }
  auto r = SEScaleFn::apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate);
  return {r[0], r[1]};
}

// ---- channel_shuffle, concat_shuffle --------------------------------------------------------------

using ShuffleSig = at::Tensor(const at::Tensor&, int64_t);
const c10::TypedOperatorHandle<ShuffleSig>& shuffle_op() {
  static const auto op = handle<ShuffleSig>("fastdw::channel_shuffle");
  return op;
}

class ChannelShuffleFn : public torch::autograd::Function<ChannelShuffleFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = shuffle_op().call(x, groups);
    ctx->saved_data["inverse_groups"] = x.sym_size(1) / groups;  // the op checked that groups divides C
    return out;
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    // The inverse permutation is the shuffle with C / groups groups (differentiable in turn).
    const int64_t inverse = ctx->saved_data["inverse_groups"].toSymInt().guard_int(__FILE__, __LINE__);
    return {ChannelShuffleFn::apply(grads[0], inverse), at::Tensor()};
  }
};

at::Tensor channel_shuffle_autograd(const at::Tensor& x, int64_t groups) {
  if (!records({&x})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return shuffle_op().call(x, groups);
  }
  return ChannelShuffleFn::apply(x, groups);
}

using ConcatSig = at::Tensor(const at::Tensor&, const at::Tensor&);
const c10::TypedOperatorHandle<ConcatSig>& concat_op() {
  static const auto op = handle<ConcatSig>("fastdw::concat_shuffle");
  return op;
}
using ConcatBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&);
const c10::TypedOperatorHandle<ConcatBackwardSig>& concat_backward_op() {
  static const auto op = handle<ConcatBackwardSig>("fastdw::concat_shuffle_backward");
  return op;
}

class ConcatShuffleFn : public torch::autograd::Function<ConcatShuffleFn> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& a, const at::Tensor& b) {
    at::AutoDispatchBelowADInplaceOrView below;
    return concat_op().call(a, b);
  }
  static variable_list backward(AutogradContext*, const variable_list& grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    auto [ga, gb] = concat_backward_op().call(grads[0]);
    return {ga, gb};
  }
};

at::Tensor concat_shuffle_autograd(const at::Tensor& a, const at::Tensor& b) {
  if (!records({&a, &b})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return concat_op().call(a, b);
  }
  return ConcatShuffleFn::apply(a, b);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, Autograd, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act_autograd);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward_autograd);
  m.impl("se_scale", &se_scale_autograd);
  m.impl("channel_shuffle", &channel_shuffle_autograd);
  m.impl("concat_shuffle", &concat_shuffle_autograd);
}

}  // namespace fastdw
