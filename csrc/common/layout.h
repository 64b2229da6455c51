// Memory-format rules shared by every op and device (dispatcher side, host code).
#pragma once
#include <ATen/ATen.h>

namespace fastdw {

// Channels-last data ([N, *spatial, C] in memory): 4-D channels_last or 5-D channels_last_3d that is
// not also plain contiguous. The same rule as dwconv_bn_act for 4-D tensors; must agree with
// _is_channels_last() in fastdw/ops/se_scale.py and fastdw/ops/channel_shuffle.py, because the
// fake kernels' strides are compared with the real ones by opcheck.
inline bool channels_last_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// 4-D strides ordered like channels_last (C fastest, then W, H, N), gaps allowed: true for a
// channel slice of a channels_last tensor, which channels_last_layout() rejects as not dense.
// c10's is_channels_last_strides_2d rule; must agree with _strides_like_channels_last() in
// fastdw/ops/channel_shuffle.py.
inline bool strides_like_channels_last(const at::Tensor& x) {
  if (x.dim() != 4 || x.stride(1) == 0) return false;
  int64_t min = 0;
  for (int d : {1, 3, 2, 0}) {
    if (x.size(d) == 0 || x.stride(d) < min) return false;
    if (d == 0 && min == x.stride(1)) return false;
    min = x.stride(d);
    if (x.size(d) > 1) min *= x.size(d);
  }
  return true;
}

inline at::MemoryFormat layout_format(const at::Tensor& x, bool cl) {
  if (!cl) return at::MemoryFormat::Contiguous;
  return x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// Positions per (n, c): the product of the sizes after the channel dimension.
inline int64_t inner_size(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 2; d < x.dim(); ++d) n *= x.size(d);
  return n;
}

// channel_shuffle(x, g) of a 4-D tensor as a dense copy in format fmt (dwconv_bn_act shuffles
// channels_last inputs up front; the inverse is shuffled(y, C / g, fmt)).
inline at::Tensor shuffled(const at::Tensor& x, int64_t g, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  return x.view({N, g, C / g, H, W}).transpose(1, 2).reshape({N, C, H, W}).contiguous(fmt);
}

// 4-D inputs as they are (read through their strides); others made contiguous, seen as [N, C, 1, L].
inline at::Tensor as_4d(const at::Tensor& t) {
  if (t.dim() == 4) return t;
  return t.contiguous().view({t.size(0), t.size(1), 1, inner_size(t)});
}

}  // namespace fastdw
