// CUDA implementation of fastdw::se_scale and its backward. Same semantics and argument checks
// (csrc/common/checks.h) as csrc/cpu/se_scale.cpp; the activation, gate and their derivatives are
// the shared functions of csrc/common/se_scale_math.h, which the CPU kernels run too.
//
// Forward: three launches, two passes over x (the minimum):
//   pool_*_kernel    per-(n, c) sums of x                          reads x once
//   excite_kernel    one block per sample: pooled means, h = W1 p + b1, a = act(h),
//                    z = W2 a + b2, g = gate(z)                    [N][C] / [N][S] vectors only
//   scale_kernel     out = x * g[n, c]                             reads x, writes out
// Backward: dg = sum_hw go * x (the pool kernels with a product), then excite_kernel<backward>
// recomputes h, a, z from the saved pooled means and gives dz = dg gate'(z), dh = (dz W2) act'(h),
// dp = dh W1; outer_kernel reduces the four FC gradients over the batch; scale_kernel writes
// dx = go * g + dp / HW. Everything accumulates in float (double for float64 inputs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/common.cuh"

namespace fastdw::cuda {
namespace {

constexpr int kWarp = 32;

template <typename A>
__device__ inline A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Dot product of a contiguous weight row with a vector in shared memory, by one warp (lane-strided,
// coalesced reads); lane 0 gets the sum.
template <typename T, typename A>
__device__ inline A row_dot(const T* w, const A* v, int64_t n, int lane) {
  A acc = 0;
  for (int64_t i = lane; i < n; i += kWarp) acc += A(w[i]) * v[i];
  return warp_sum(acc);
}

// ---- pool: per-(n, c) sums of x (or of x * y) ----------------------------------------------------

// NCHW: one warp per (n, c) plane (its HW values are contiguous: coalesced lane-strided reads),
// lane partials reduced by shuffles. part[n * C + c] (one split).
template <typename T, typename A, bool Prod>
__global__ void pool_nchw_kernel(const T* __restrict__ x, const T* __restrict__ y, A* __restrict__ part,
                                 int64_t planes, int64_t HW) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t p = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp; p < planes; p += warps) {
    const T* xp = x + p * HW;
    const T* yp = Prod ? y + p * HW : nullptr;
    A acc = 0;
    for (int64_t i = lane; i < HW; i += kWarp) acc += Prod ? A(xp[i]) * A(yp[i]) : A(xp[i]);
    acc = warp_sum(acc);
    if (lane == 0) part[p] = acc;
  }
}

// NHWC: a block is 32 channels x 8 pixel rows of one sample and one split of the pixels (grid:
// x = sample x channel block, y = split); thread (tx, ty) walks pixels ty, ty + 8, ... of its split
// for channel c (coalesced across tx), then the 8 rows are reduced in shared memory. part[(split * N + n) * C + c]: the splits keep batch 1 and
// large HW parallel and are summed, in a fixed order, by excite_kernel.
template <typename T, typename A, bool Prod>
__global__ void pool_nhwc_kernel(const T* __restrict__ x, const T* __restrict__ y, A* __restrict__ part, int64_t N,
                                 int64_t C, int64_t HW, int64_t per_split) {
  __shared__ A red[8][kWarp + 1];
  const int64_t cblocks = (C + kWarp - 1) / kWarp, n = blockIdx.x / cblocks, split = blockIdx.y;
  const int64_t c = (blockIdx.x - n * cblocks) * kWarp + threadIdx.x;
  const int64_t px0 = split * per_split, px1 = hd_min(HW, px0 + per_split);
  A acc = 0;
  if (c < C) {
    const int64_t base = n * HW * C + c;
    for (int64_t px = px0 + threadIdx.y; px < px1; px += blockDim.y) {
      const int64_t i = base + px * C;
      acc += Prod ? A(x[i]) * A(y[i]) : A(x[i]);
    }
  }
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    A s = 0;
    for (int r = 0; r < 8; ++r) s += red[r][threadIdx.x];
    part[(split * N + n) * C + c] = s;
  }
}

// Pixel splits of the NHWC pool: ~4 waves of blocks, each split at least 64 pixels, at most 64
// splits; 1 for NCHW.
int64_t pool_splits(const SEShape& s) {
  if (!s.cl || s.HW == 0) return 1;
  const int64_t cblocks = ceil_div(s.C, kWarp);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t waves = 4 * sms / std::max<int64_t>(1, cblocks * s.N);
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>({waves, s.HW / 64, int64_t(64)}));
  return ceil_div(s.HW, ceil_div(s.HW, want));  // no empty split
}

// Sums per (n, c) of x (or x * y) into part [splits][N][C], splits = pool_splits(s).
template <typename T, typename A>
void launch_pool(const SEShape& s, const T* x, const T* y, A* part, int64_t splits) {
  if (!s.cl) {
    const int64_t planes = s.N * s.C;
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(planes, kThreads / kWarp), 65535));
    if (y) pool_nchw_kernel<T, A, true><<<grid, kThreads, 0, stream()>>>(x, y, part, planes, s.HW);
    else pool_nchw_kernel<T, A, false><<<grid, kThreads, 0, stream()>>>(x, y, part, planes, s.HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t cblocks = ceil_div(s.C, kWarp);
  const int64_t per = ceil_div(s.HW, splits);
  const dim3 grid(static_cast<unsigned>(cblocks * s.N), static_cast<unsigned>(splits));
  const dim3 block(kWarp, 8);
  if (y) pool_nhwc_kernel<T, A, true><<<grid, block, 0, stream()>>>(x, y, part, s.N, s.C, s.HW, per);
  else pool_nhwc_kernel<T, A, false><<<grid, block, 0, stream()>>>(x, y, part, s.N, s.C, s.HW, per);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- excite: both FCs and the gate, one block per sample ----------------------------------------

// Pointers of excite_kernel. Forward: pooled (out, T) and gate (out). Backward: pooled (in, T),
// dg = the pool sums of go * x, and the workspaces p, a, dz, dh, gate, shift (all [N][C] or [N][S]).
template <typename T, typename A>
struct ExciteArgs {
  const A* part;  // [splits][N][C]: sums of x (forward) or of go * x (backward)
  int64_t splits;
  T* pooled_out;        // forward
  const T* pooled_in;   // backward
  const T *w1, *b1, *w2, *b2;  // [S][C], [S] or null, [C][S], [C] or null
  A* gate;              // [N][C]
  A *p, *a, *dz, *dh, *shift;  // backward workspaces; shift = dp / HW
};

// The dot products run one warp per output row (lanes stride the row: coalesced weight reads),
// the vectors p, a, h, dz, dh live in shared memory. Backward recomputes the forward from the
// saved pooled means (as the CPU op), so nothing but x and pooled is saved.
template <typename T, typename A, bool Backward>
__global__ void excite_kernel(ExciteArgs<T, A> args, int64_t N, int64_t C, int64_t S, int64_t HW, SEAct act,
                              SEGate gate) {
  extern __shared__ unsigned char smem_raw[];
  A* p = reinterpret_cast<A*>(smem_raw);  // [C]
  A* dz = p + C;                           // [C] (backward)
  A* a = dz + (Backward ? C : 0);          // [S]
  A* h = a + S;                            // [S]
  A* dh = h + S;                           // [S] (backward)
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    if constexpr (Backward) {
      p[c] = A(args.pooled_in[n * C + c]);
      args.p[n * C + c] = p[c];
    } else {
      A sum = 0;
      for (int64_t sp = 0; sp < args.splits; ++sp) sum += args.part[(sp * N + n) * C + c];
      const T pooled = static_cast<T>(sum / A(HW));
      args.pooled_out[n * C + c] = pooled;
      p[c] = A(pooled);  // the rounded value, as the CPU op and the backward see it
    }
  }
  __syncthreads();
  for (int64_t r = warp; r < S; r += nwarps) {
    const A acc = row_dot(args.w1 + r * C, p, C, lane);
    if (lane == 0) {
      const A hv = acc + (args.b1 ? A(args.b1[r]) : A(0));
      h[r] = hv;
      a[r] = se_act(act, hv);
    }
  }
  __syncthreads();
  for (int64_t c = warp; c < C; c += nwarps) {
    const A acc = row_dot(args.w2 + c * S, a, S, lane);
    if (lane == 0) {
      const A z = acc + (args.b2 ? A(args.b2[c]) : A(0));
      args.gate[n * C + c] = se_gate(gate, z);
      if constexpr (Backward) {
        A dg = 0;
        for (int64_t sp = 0; sp < args.splits; ++sp) dg += args.part[(sp * N + n) * C + c];
        dz[c] = dg * se_gate_grad(gate, z);
        args.dz[n * C + c] = dz[c];
      }
    }
  }
  if constexpr (!Backward) return;
  __syncthreads();
  // dh[r] = (sum_c dz[c] W2[c][r]) act'(h[r]): a column of W2 (stride S), one warp per r.
  for (int64_t r = warp; r < S; r += nwarps) {
    A acc = 0;
    for (int64_t c = lane; c < C; c += kWarp) acc += dz[c] * A(args.w2[c * S + r]);
    acc = warp_sum(acc);
    if (lane == 0) {
      dh[r] = acc * se_act_grad(act, h[r]);
      args.dh[n * S + r] = dh[r];
      args.a[n * S + r] = a[r];
    }
  }
  __syncthreads();
  // dp[c] = sum_r dh[r] W1[r][c]: thread per c, rows of W1 read coalesced across threads.
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A acc = 0;
    for (int64_t r = 0; r < S; ++r) acc += dh[r] * A(args.w1[r * C + c]);
    args.shift[n * C + c] = acc / A(HW);
  }
}

// ---- FC weight gradients: sums over the batch ----------------------------------------------------

// out[r][k] = sum_n coef[n][r] v[n][k] (out may be null), bias[r] = sum_n coef[n][r] (may be null).
// One thread per output element, n summed in order: deterministic, no atomics (N is small).
template <typename T, typename A>
__global__ void outer_kernel(const A* __restrict__ coef, const A* __restrict__ v, T* __restrict__ out,
                             T* __restrict__ bias, int64_t N, int64_t R, int64_t K) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < R * K; o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = o / K, k = o - r * K;
    if (out) {
      A acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += coef[n * R + r] * v[n * K + k];
      out[o] = static_cast<T>(acc);
    }
    if (bias && k == 0) {
      A acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += coef[n * R + r];
      bias[r] = static_cast<T>(acc);
    }
  }
}

// ---- scale: out = x * a[n, c] (+ b[n, c]) --------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// V consecutive elements per thread with one vector load and store (V > 1 only when the element
// count and the pointers allow it); (n, c) of each element from the layout.
template <typename T, typename A, int V, bool Shift>
__global__ void scale_kernel(const T* __restrict__ x, const A* __restrict__ a, const A* __restrict__ b,
                             T* __restrict__ out, int64_t total, int64_t C, int64_t HW, bool cl) {
  const int64_t nvec = total / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nvec; i += int64_t(gridDim.x) * blockDim.x) {
    Vec<T, V> v = reinterpret_cast<const Vec<T, V>*>(x)[i];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t e = i * V + j;
      const int64_t nc = cl ? (e / (HW * C)) * C + e % C : e / HW;
      const A r = A(v.v[j]) * a[nc] + (Shift ? b[nc] : A(0));
      v.v[j] = static_cast<T>(r);
    }
    reinterpret_cast<Vec<T, V>*>(out)[i] = v;
  }
}

template <typename T, typename A>
void launch_scale(const SEShape& s, const T* x, const A* a, const A* b, T* out) {
  const int64_t total = s.N * s.C * s.HW;
  constexpr int VW = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
  const bool vec = total % VW == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  auto go = [&](auto Vc) {
    constexpr int V = decltype(Vc)::value;
    const int64_t nvec = total / V;
    if (b) scale_kernel<T, A, V, true><<<grid_for(nvec), kThreads, 0, stream()>>>(x, a, b, out, total, s.C, s.HW, s.cl);
    else scale_kernel<T, A, V, false><<<grid_for(nvec), kThreads, 0, stream()>>>(x, a, b, out, total, s.C, s.HW, s.cl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec) go(std::integral_constant<int, VW>{});
  else go(std::integral_constant<int, 1>{});
}

// ---- the ops -------------------------------------------------------------------------------------

template <typename T, typename A>
size_t excite_smem(const SEShape& s, bool backward) {
  return sizeof(A) * ((backward ? 2 : 1) * s.C + 3 * s.S);
}

void check_smem(size_t bytes) {
  TORCH_CHECK_VALUE(bytes <= 48 * 1024, "fastdw::se_scale (cuda): channels too large for the fused excite kernel (",
                    bytes, " bytes of shared memory, 48 KiB available)");
}

std::tuple<at::Tensor, at::Tensor> se_scale_cuda(const at::Tensor& x, const at::Tensor& fc1_weight,
                                                 const std::optional<at::Tensor>& fc1_bias,
                                                 const at::Tensor& fc2_weight,
                                                 const std::optional<at::Tensor>& fc2_bias,
                                                 c10::string_view activation, c10::string_view gate) {
  const SEShape s = make_se_shape(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  const SEAct act = parse_se_act(activation);
  const SEGate gt = parse_se_gate(gate);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_format(x, s.cl);
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor pooled = at::empty({s.N, s.C}, x.options());
  if (s.N == 0 || s.C == 0) return {out, pooled};
  const at::Tensor w1 = fc1_weight.reshape({s.S, s.C}).contiguous();
  const at::Tensor w2 = fc2_weight.reshape({s.C, s.S}).contiguous();
  const at::Tensor b1 = defined(fc1_bias) ? fc1_bias->contiguous() : at::Tensor();
  const at::Tensor b2 = defined(fc2_bias) ? fc2_bias->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_scale_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    ExciteArgs<T, A> args{};
    args.splits = pool_splits(s);
    at::Tensor part = at::empty({args.splits * s.N * s.C}, aopt);
    at::Tensor g = at::empty({s.N, s.C}, aopt);
    const T* xp = xc.const_data_ptr<T>();
    if (s.HW > 0) launch_pool<T, A>(s, xp, nullptr, part.mutable_data_ptr<A>(), args.splits);
    else part.zero_();  // mean over no positions: 0 / 0 = NaN, as the CPU op
    args.part = part.const_data_ptr<A>();
    args.pooled_out = pooled.mutable_data_ptr<T>();
    args.w1 = w1.const_data_ptr<T>();
    args.w2 = w2.const_data_ptr<T>();
    args.b1 = static_cast<const T*>(b1.defined() ? b1.const_data_ptr() : nullptr);
    args.b2 = static_cast<const T*>(b2.defined() ? b2.const_data_ptr() : nullptr);
    args.gate = g.mutable_data_ptr<A>();
    const size_t smem = excite_smem<T, A>(s, false);
    check_smem(smem);
    excite_kernel<T, A, false><<<static_cast<unsigned>(s.N), kThreads, smem, stream()>>>(args, s.N, s.C, s.S, s.HW,
                                                                                         act, gt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (s.HW > 0) launch_scale<T, A>(s, xp, g.const_data_ptr<A>(), nullptr, out.mutable_data_ptr<T>());
  });
  return {out, pooled};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_scale_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pooled, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, c10::string_view activation, c10::string_view gate,
    std::array<bool, 5> mask) {
  const SEShape s = make_se_shape(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  const SEAct act = parse_se_act(activation);
  const SEGate gt = parse_se_gate(gate);
  check_se_backward(s, grad_out, x, pooled);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_format(x, s.cl);
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor pc = pooled.contiguous();
  const at::Tensor w1 = fc1_weight.reshape({s.S, s.C}).contiguous();
  const at::Tensor w2 = fc2_weight.reshape({s.C, s.S}).contiguous();
  const bool has_b1 = defined(fc1_bias), has_b2 = defined(fc2_bias);
  const at::Tensor b1 = has_b1 ? fc1_bias->contiguous() : at::Tensor();
  const at::Tensor b2 = has_b2 ? fc2_bias->contiguous() : at::Tensor();
  auto [gx, gw1, gb1, gw2, gb2] = se_backward_outputs(s, x, fc1_weight, fc2_weight, has_b1, has_b2, mask, fmt);
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return {gx, gw1, gb1, gw2, gb2};
  if (s.N == 0 || s.C == 0) {  // sums over no samples
    for (at::Tensor* t : {&gw1, &gb1, &gw2, &gb2}) t->zero_();
    return {gx, gw1, gb1, gw2, gb2};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_scale_backward_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    const int64_t NC = s.N * s.C, NS = s.N * s.S;
    ExciteArgs<T, A> args{};
    args.splits = pool_splits(s);
    at::Tensor part = at::empty({args.splits * NC}, aopt);
    // p, gate, dz, shift: [N][C]; a, dh: [N][S]
    at::Tensor ws = at::empty({4 * NC + 2 * NS}, aopt);
    A* w = ws.mutable_data_ptr<A>();
    if (s.HW > 0) launch_pool<T, A>(s, go.const_data_ptr<T>(), xc.const_data_ptr<T>(), part.mutable_data_ptr<A>(),
                                    args.splits);
    else part.zero_();
    args.part = part.const_data_ptr<A>();
    args.pooled_in = pc.const_data_ptr<T>();
    args.w1 = w1.const_data_ptr<T>();
    args.w2 = w2.const_data_ptr<T>();
    args.b1 = static_cast<const T*>(has_b1 ? b1.const_data_ptr() : nullptr);
    args.b2 = static_cast<const T*>(has_b2 ? b2.const_data_ptr() : nullptr);
    args.p = w;
    args.gate = w + NC;
    args.dz = w + 2 * NC;
    args.shift = w + 3 * NC;
    args.a = w + 4 * NC;
    args.dh = w + 4 * NC + NS;
    const size_t smem = excite_smem<T, A>(s, true);
    check_smem(smem);
    excite_kernel<T, A, true><<<static_cast<unsigned>(s.N), kThreads, smem, stream()>>>(args, s.N, s.C, s.S, s.HW,
                                                                                        act, gt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto ptr = [](at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<T>() : nullptr; };
    // dW2 [C][S] = dz^T a, db2 = sum_n dz; dW1 [S][C] = dh^T p, db1 = sum_n dh.
    if (gw2.numel() || gb2.numel()) {
      outer_kernel<T, A><<<grid_for(s.C * s.S), kThreads, 0, stream()>>>(args.dz, args.a, ptr(gw2), ptr(gb2), s.N,
                                                                          s.C, s.S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (gw1.numel() || gb1.numel()) {
      outer_kernel<T, A><<<grid_for(s.S * s.C), kThreads, 0, stream()>>>(args.dh, args.p, ptr(gw1), ptr(gb1), s.N,
                                                                          s.S, s.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (mask[0] && s.HW > 0)
      launch_scale<T, A>(s, go.const_data_ptr<T>(), args.gate, args.shift, gx.mutable_data_ptr<T>());
  });
  return {gx, gw1, gb1, gw2, gb2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CUDA, m) {
  m.impl("se_scale", &se_scale_cuda);
  m.impl("se_scale_backward", &se_scale_backward_cuda);
}

}  // namespace fastdw::cuda
