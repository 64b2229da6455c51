// CPU implementation of fastdw::channel_shuffle, fastdw::concat_shuffle and its backward: argument
// checks and layout handling, then the kernels of csrc/cpu/channel_shuffle_impl.h for the best
// instruction set of this CPU.
//
// channel_shuffle(x, g)[:, k * g + i] = x[:, i * (C / g) + k]; its backward is
// channel_shuffle(grad, C / g) (the inverse permutation), so it needs no op of its own.
// concat_shuffle(a, b) = channel_shuffle(cat([a, b], 1), 2): out[:, 2k] = a[:, k],
// out[:, 2k + 1] = b[:, k], read through a's and b's strides (no copy of a channel-sliced input);
// its backward splits the even and odd channels of the gradient (concat_shuffle_backward).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/channel_shuffle_kernel.h"

namespace fastdw::cpu {
namespace {

template <typename T>
const ShuffleKernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return shuffle_table_for_cpu().f32;
  else return shuffle_table_for_cpu().f64;
}

at::Tensor channel_shuffle_cpu(const at::Tensor& x, int64_t groups) {
  check_channel_shuffle(x, groups);
  const int64_t C = x.size(1);
  const bool cl = channels_last_layout(x);
  const auto fmt = layout_format(x, cl);
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const ShuffleShape s{x.size(0), C, inner_size(x), groups, cl};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_shuffle_cpu", [&] {
    kernels<scalar_t>().shuffle(s, xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor concat_shuffle_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_concat_shuffle(a, b);
  // Output channels_last if either input has channels_last-like strides (4-D only): in
  // ShuffleNetV2 one input is a channel slice of a bigger tensor, dense in neither format.
  const bool cl = strides_like_channels_last(a) || strides_like_channels_last(b);
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape[1] *= 2;
  at::Tensor out = at::empty(shape, a.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                 : at::MemoryFormat::Contiguous));
  const at::Tensor a4 = as_4d(a), b4 = as_4d(b);
  PairShape s{a4.size(0), a4.size(1), a4.size(2), a4.size(3), cl, {}, {}};
  for (int d = 0; d < 4; ++d) {
    s.sa[d] = a4.stride(d);
    s.sb[d] = b4.stride(d);
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "concat_shuffle_cpu", [&] {
    kernels<scalar_t>().interleave(s, a4.const_data_ptr<scalar_t>(), b4.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> concat_shuffle_backward_cpu(const at::Tensor& grad_out) {
  check_concat_shuffle_backward(grad_out);
  const bool cl = grad_out.dim() == 4 && channels_last_layout(grad_out);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor g = grad_out.contiguous(fmt);
  std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
  shape[1] /= 2;
  at::Tensor ga = at::empty(shape, grad_out.options().memory_format(fmt));
  at::Tensor gb = at::empty(shape, grad_out.options().memory_format(fmt));
  const int64_t inner = inner_size(grad_out);
  PairShape s{grad_out.size(0), shape[1], 1, inner, cl, {}, {}};
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "concat_shuffle_backward_cpu", [&] {
    kernels<scalar_t>().deinterleave(s, g.const_data_ptr<scalar_t>(), ga.mutable_data_ptr<scalar_t>(),
                                     gb.mutable_data_ptr<scalar_t>());
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CPU, m) {
  m.impl("channel_shuffle", &channel_shuffle_cpu);
  m.impl("concat_shuffle", &concat_shuffle_cpu);
  m.impl("concat_shuffle_backward", &concat_shuffle_backward_cpu);
}

}  // namespace fastdw::cpu
