// CUDA implementation of fastdw::channel_shuffle, fastdw::concat_shuffle and its backward. Same
// semantics and argument checks (csrc/common/checks.h) as csrc/cpu/channel_shuffle.cpp; the index
// maps are the shared ones of csrc/common/channel_shuffle_math.h.
//
// Pure data movement, so the kernels are instantiated per copy unit (2/4/8/16 bytes, common.cuh),
// not per dtype: a 16-byte load moves 8 fp16 or 4 fp32 values, whatever they are.
//  * NCHW: every output plane is a copy of one input plane (plane_copy_kernel); grid.y walks the
//    planes, grid.x the plane in the widest unit that divides the plane length, the plane offsets
//    and the base addresses (16 bytes for the usual 7x7..112x112 float planes at 4-aligned sizes).
//  * NHWC: per pixel a permutation of the C channels (shuffle_nhwc_kernel): one thread per output
//    element, so the writes are coalesced and the gathered reads stay within the pixel's C values
//    (one or two cache lines); a channel permutation has no contiguous runs to vectorise when
//    C / g is small, which is the ShuffleNet case (C / g = 2..60).
//  * concat_shuffle writes interleaved: NHWC, one thread per (pixel, k) reads a[k] and b[k] and
//    stores them as one pair (out[2k], out[2k + 1]) of twice the element width; NCHW, output
//    plane 2k (2k + 1) is a plane copy of a (b) plane k when that plane is dense, a strided
//    gather otherwise (a channel slice of a channels_last tensor). The backward is the inverse:
//    one pair load split into ga and gb.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/common.cuh"

namespace fastdw::cuda {
namespace {

// dst[dst_off(p) + i] = src[src_off(p) + i] for plane p < planes and i < units (offsets in units).
// Map: a functor (p, src_off, dst_off) -> void run on the device.
template <typename U, typename Map>
__global__ void plane_copy_kernel(const U* __restrict__ src, U* __restrict__ dst, int64_t planes, int64_t units,
                                  Map map) {
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    int64_t so, dof;
    map(p, so, dof);
    const U* s = src + so;
    U* d = dst + dof;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < units; i += int64_t(gridDim.x) * blockDim.x)
      d[i] = s[i];
  }
}

// channel_shuffle, NCHW: output plane (n, j) <- input plane (n, shuffle_src(j)).
struct ShuffleMap {
  int64_t C, g, units;
  __device__ void operator()(int64_t p, int64_t& so, int64_t& dof) const {
    const int64_t n = p / C, j = p - n * C;
    so = (n * C + shuffle_src(j, C, g)) * units;
    dof = p * units;
  }
};

// Plane p = (n, k) of one half of the pair: source offset n * s0 + k * s1, destination planes
// (n, 2k + parity) of a [N][2C] tensor (scatter = false), or the other way round (scatter = true).
struct PairMap {
  int64_t C, s0, s1, units;  // s0, s1, units in copy units
  int parity;
  bool scatter;
  __device__ void operator()(int64_t p, int64_t& so, int64_t& dof) const {
    const int64_t n = p / C, k = p - n * C;
    const int64_t strided = n * s0 + k * s1, packed = (n * 2 * C + 2 * k + parity) * units;
    so = scatter ? packed : strided;
    dof = scatter ? strided : packed;
  }
};

template <typename Map>
void launch_plane_copy(int unit, const void* src, void* dst, int64_t planes, int64_t units, Map map) {
  if (planes == 0 || units == 0) return;
  const unsigned gx = static_cast<unsigned>(std::min<int64_t>(ceil_div(units, kThreads), 64));
  const unsigned gy = static_cast<unsigned>(std::min<int64_t>(planes, 65535));
  dispatch_unit(unit, [&](auto B) {
    using U = typename Unit<decltype(B)::value>::type;
    plane_copy_kernel<U, Map><<<dim3(gx, gy), kThreads, 0, stream()>>>(static_cast<const U*>(src),
                                                                        static_cast<U*>(dst), planes, units, map);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// channel_shuffle, NHWC: out[q * C + j] = x[q * C + shuffle_src(j, C, g)].
template <typename U>
__global__ void shuffle_nhwc_kernel(const U* __restrict__ x, U* __restrict__ out, int64_t total, int64_t C,
                                    int64_t g) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total; o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = o / C, j = o - q * C;
    out[o] = x[q * C + shuffle_src(j, C, g)];
  }
}

template <typename U>
struct alignas(2 * sizeof(U)) Pair {
  U lo, hi;
};

// concat_shuffle, channels_last output [N][H][W][2C]: one thread per (pixel q, k) writes the pair
// (out[2k], out[2k + 1]) = (a[k], b[k]) with one store; a and b read through their strides.
template <typename U>
__global__ void interleave_nhwc_kernel(const U* __restrict__ a, const U* __restrict__ b, Pair<U>* __restrict__ out,
                                       int64_t total, int64_t C, int64_t H, int64_t W, PairShape s) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total; o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = o / C, k = o - q * C;
    const int64_t n = q / (H * W), h = (q / W) % H, w = q % W;
    out[o] = Pair<U>{a[n * s.sa[0] + k * s.sa[1] + h * s.sa[2] + w * s.sa[3]],
                     b[n * s.sb[0] + k * s.sb[1] + h * s.sb[2] + w * s.sb[3]]};
  }
}

// concat_shuffle, NCHW output [N][2C][H][W] where a plane of a or b is not dense: a strided gather,
// one thread per output element (coalesced writes).
template <typename U>
__global__ void interleave_nchw_strided_kernel(const U* __restrict__ a, const U* __restrict__ b, U* __restrict__ out,
                                               int64_t total, int64_t C, int64_t H, int64_t W, PairShape s) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total; o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = o % W, h = (o / W) % H, j = (o / (H * W)) % (2 * C), n = o / (2 * C * H * W);
    bool from_b;
    const int64_t k = interleave_src(j, from_b);
    const int64_t* st = from_b ? s.sb : s.sa;
    out[o] = (from_b ? b : a)[n * st[0] + k * st[1] + h * st[2] + w * st[3]];
  }
}

// concat_shuffle_backward, channels_last: one pair load of g[q][2k..2k+1] split into ga, gb.
template <typename U>
__global__ void deinterleave_nhwc_kernel(const Pair<U>* __restrict__ g, U* __restrict__ ga, U* __restrict__ gb,
                                         int64_t total) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total; o += int64_t(gridDim.x) * blockDim.x) {
    const Pair<U> v = g[o];
    ga[o] = v.lo;
    gb[o] = v.hi;
  }
}

// Runs f(Unit<element size>) for the element size of t (2, 4 or 8 bytes).
template <typename F>
void dispatch_elem(const at::Tensor& t, F&& f) {
  dispatch_unit(static_cast<int>(t.element_size()), f);
}

at::Tensor channel_shuffle_cuda(const at::Tensor& x, int64_t groups) {
  check_channel_shuffle(x, groups);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1), inner = inner_size(x);
  const bool cl = channels_last_layout(x);
  const auto fmt = layout_format(x, cl);
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t total = x.numel();
  if (total == 0) return out;
  const int64_t es = x.element_size();
  if (!cl) {
    const int unit = copy_unit(es, {inner}, {xc.const_data_ptr(), out.const_data_ptr()});
    const int64_t units = inner * es / unit;
    launch_plane_copy(unit, xc.const_data_ptr(), out.mutable_data_ptr(), x.size(0) * C, units,
                      ShuffleMap{C, groups, units});
    return out;
  }
  dispatch_elem(x, [&](auto B) {
    using U = typename Unit<decltype(B)::value>::type;
    shuffle_nhwc_kernel<U><<<grid_for(total), kThreads, 0, stream()>>>(
        static_cast<const U*>(xc.const_data_ptr()), static_cast<U*>(out.mutable_data_ptr()), total, C, groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor concat_shuffle_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_concat_shuffle(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  // Output channels_last if either input has channels_last-like strides (as the CPU op).
  const bool cl = strides_like_channels_last(a) || strides_like_channels_last(b);
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape[1] *= 2;
  at::Tensor out = at::empty(shape, a.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                 : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor a4 = as_4d(a), b4 = as_4d(b);
  PairShape s{a4.size(0), a4.size(1), a4.size(2), a4.size(3), cl, {}, {}};
  for (int d = 0; d < 4; ++d) {
    s.sa[d] = a4.stride(d);
    s.sb[d] = b4.stride(d);
  }
  const int64_t HW = s.H * s.W, es = a.element_size();
  const void* pa = a4.const_data_ptr();
  const void* pb = b4.const_data_ptr();
  if (cl) {
    const int64_t total = s.N * HW * s.C;
    dispatch_elem(a, [&](auto B) {
      using U = typename Unit<decltype(B)::value>::type;
      interleave_nhwc_kernel<U><<<grid_for(total), kThreads, 0, stream()>>>(
          static_cast<const U*>(pa), static_cast<const U*>(pb), static_cast<Pair<U>*>(out.mutable_data_ptr()), total,
          s.C, s.H, s.W, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  const bool dense = s.sa[3] == 1 && s.sa[2] == s.W && s.sb[3] == 1 && s.sb[2] == s.W;
  if (dense) {
    const int unit = copy_unit(es, {HW, s.sa[0], s.sa[1], s.sb[0], s.sb[1]}, {pa, pb, out.const_data_ptr()});
    const int64_t u = unit / es, units = HW / u;
    launch_plane_copy(unit, pa, out.mutable_data_ptr(), s.N * s.C, units,
                      PairMap{s.C, s.sa[0] / u, s.sa[1] / u, units, 0, false});
    launch_plane_copy(unit, pb, out.mutable_data_ptr(), s.N * s.C, units,
                      PairMap{s.C, s.sb[0] / u, s.sb[1] / u, units, 1, false});
    return out;
  }
  const int64_t total = out.numel();
  dispatch_elem(a, [&](auto B) {
    using U = typename Unit<decltype(B)::value>::type;
    interleave_nchw_strided_kernel<U><<<grid_for(total), kThreads, 0, stream()>>>(
        static_cast<const U*>(pa), static_cast<const U*>(pb), static_cast<U*>(out.mutable_data_ptr()), total, s.C,
        s.H, s.W, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> concat_shuffle_backward_cuda(const at::Tensor& grad_out) {
  check_concat_shuffle_backward(grad_out);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const bool cl = grad_out.dim() == 4 && channels_last_layout(grad_out);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor g = grad_out.contiguous(fmt);
  std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
  shape[1] /= 2;
  at::Tensor ga = at::empty(shape, grad_out.options().memory_format(fmt));
  at::Tensor gb = at::empty(shape, grad_out.options().memory_format(fmt));
  if (ga.numel() == 0) return {ga, gb};
  const int64_t C = shape[1], inner = inner_size(grad_out), es = g.element_size();
  if (cl && reinterpret_cast<uintptr_t>(g.const_data_ptr()) % (2 * es) == 0) {
    const int64_t total = ga.numel();
    dispatch_elem(g, [&](auto B) {
      using U = typename Unit<decltype(B)::value>::type;
      deinterleave_nhwc_kernel<U><<<grid_for(total), kThreads, 0, stream()>>>(
          static_cast<const Pair<U>*>(g.const_data_ptr()), static_cast<U*>(ga.mutable_data_ptr()),
          static_cast<U*>(gb.mutable_data_ptr()), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {ga, gb};
  }
  if (cl) {  // a misaligned view: gather through strides (rare)
    ga.copy_(g.slice(1, 0, 2 * C, 2));
    gb.copy_(g.slice(1, 1, 2 * C, 2));
    return {ga, gb};
  }
  // NCHW: plane (n, 2k + parity) of g -> plane (n, k) of ga / gb.
  const int unit = copy_unit(es, {inner}, {g.const_data_ptr(), ga.const_data_ptr(), gb.const_data_ptr()});
  const int64_t units = inner * es / unit;
  launch_plane_copy(unit, g.const_data_ptr(), ga.mutable_data_ptr(), g.size(0) * C, units,
                    PairMap{C, C * units, units, units, 0, true});
  launch_plane_copy(unit, g.const_data_ptr(), gb.mutable_data_ptr(), g.size(0) * C, units,
                    PairMap{C, C * units, units, units, 1, true});
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CUDA, m) {
  m.impl("channel_shuffle", &channel_shuffle_cuda);
  m.impl("concat_shuffle", &concat_shuffle_cuda);
  m.impl("concat_shuffle_backward", &concat_shuffle_backward_cuda);
}

}  // namespace fastdw::cuda
