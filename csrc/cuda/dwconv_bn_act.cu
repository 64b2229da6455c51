// CUDA implementation of fastdw::dwconv_bn_act and its backward. Same semantics and argument
// checks (csrc/common/checks.h) as csrc/cpu/dwconv_bn_act.cpp; the activations, their
// derivatives, the BatchNorm fold and backward coefficients and the statistics merge are the
// shared functions of csrc/common/dwconv_bn_act_math.h, which the CPU kernels run too.
//
// Tiling (dw_tile_kernel, one kernel for the forward and the two backward passes that read x):
//  * NCHW: a block is one (n, c) plane tile of TH x TW outputs (16 x 32 by default, 256 threads,
//    up to 4 outputs a thread). The input tile plus halo, ((TH-1)*SH + (KH-1)*DH + 1) x
//    ((TW-1)*SW + (KW-1)*DW + 1), and the channel's taps are loaded once into shared memory
//    (zeros outside the image, so the tap loop has no bounds checks); every tap then reads
//    shared memory. grid = (N * C planes, tiles of the plane).
//  * NHWC: a block is CB channels (32: one warp reads 32 consecutive channels, coalesced) x a
//    TH x TW pixel tile (4 x 8) of one sample; the shared tile is [pixel][CB] so both the load and
//    the per-tap reads are contiguous across the warp. grid = (N * tiles, C / CB).
//  Tiles shrink (NHWC: then CB) until the shared tile fits 48 KiB (large dilations, float64).
// Forward, eval: BN is folded into the weights and bias by prep_kernel (w' = w * scale,
//   b' = (b - mean) * scale + beta); the activation is applied to the accumulator before the one
//   store.
// Forward, training: the conv pass stores z = conv(x) + b and reduces per-block (count, mean, M2)
//   of its outputs in the epilogue (two-pass within the block, values kept in registers);
//   stats_kernel merges the blocks of each channel in a fixed order (Chan, double) into the batch
//   mean and biased variance; bn_act_kernel then normalises and activates in place. It re-reads
//   z rather than recomputing the conv: one read and one write of the (smaller) output against
//   a second read of the input with halo and K*K FMAs per output.
// Backward (as the CPU op; only x and per-channel vectors are saved): the BWD_ACT pass recomputes
//   z, xhat = (z + a0) * a1, g = grad_out * act'(xhat * gamma + beta) and reduces sum(g),
//   sum(g * xhat) per block (training: a first pass for the sums, sums_kernel turns them into
//   the BN terms, a second pass writes gz = k1 g + k2 xhat + k3 to a float workspace; eval: one
//   pass does both). Weight gradient: the BWD_WEIGHT pass loads the x tile once into shared
//   memory and its gz values once into registers, forms every tap's partial sum from them and
//   writes per-block partials (no tap re-reads x or gz from global memory); wgrad_kernel sums the
//   blocks in a fixed order (double): deterministic, no atomics. Input gradient: bwd_input_kernel,
//   the transposed conv as a gather with the same tiling (gz tile plus halo in shared memory).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/common.cuh"

namespace fastdw::cuda {
namespace {

constexpr int kMaxPerThread = 4;  // outputs per thread in a tile
constexpr size_t kSmemLimit = 48 * 1024;

enum Mode : int { kFwdEval = 0, kFwdTrain = 1, kBwdAct = 2, kBwdWeight = 3 };

// Geometry and tiling, passed by value to every kernel.
struct Geo {
  int64_t N, C, H, W, Ho, Wo;
  int KH, KW, SH, SW, PH, PW, DH, DW;
  int groups;  // NCHW: input channel of conv channel c is shuffle_src(c, C, groups)
  bool cl;
  int TH, TW, CB;          // tile: TH x TW positions, CB channels (NHWC; 1 for NCHW)
  int in_th, in_tw;        // shared source tile (with halo)
  int64_t tiles_h, tiles_w;
  __host__ __device__ int taps() const { return KH * KW; }
  __host__ __device__ int64_t nblk() const { return N * tiles_h * tiles_w; }  // blocks per channel
};

// Per-channel coefficient rows of the [kCoefRows][C] workspace (accumulation type).
enum Coef : int { kW = 0, kBias, kA1, kA0, kGamma, kBeta, kK1, kK2, kK3, kCoefRows };

template <typename T, typename A>
struct Args {
  const T* x;       // input (NCHW or NHWC)
  T* out;           // forward output
  const T* go;      // grad_out (backward), layout of out
  A* gz;            // conv-output gradient workspace (BWD_ACT writes it, BWD_WEIGHT reads it)
  const A* w;       // [C][taps] (eval: scaled by the BN fold)
  const A* coef;    // [kCoefRows][C] (row kW unused: weights are `w`)
  A* part;          // per-block partials, [C][nblk][width]
  bool want_out, want_sums;
};

template <typename A>
__device__ inline A warp_sum(A v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the threads of this block that work on the same channel (NCHW: the whole block;
// NHWC: the threads with the same threadIdx.x), returned to all of them. Every thread of the
// block must call it; red holds blockDim.x * blockDim.y values.
template <typename A>
__device__ inline A chan_reduce(A v, A* red, bool cl) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  A s = 0;
  if (cl) {
    red[tid] = v;
    __syncthreads();
    for (int r = 0; r < blockDim.y; ++r) s += red[r * blockDim.x + threadIdx.x];
  } else {
    v = warp_sum(v);
    if (tid % 32 == 0) red[tid / 32] = v;
    __syncthreads();
    const int nw = (blockDim.x * blockDim.y) / 32;
    for (int r = 0; r < nw; ++r) s += red[r];
  }
  __syncthreads();
  return s;
}

// The block's place: channel c (or first channel c0 of the channel block), sample n, tile origin.
struct BlockPos {
  int64_t n, c;  // c: this thread's channel (may be >= C in the last NHWC channel block)
  int64_t oh0, ow0;
  int64_t blk;   // block index among the nblk blocks of this channel
  int lane_c;    // channel within the block (NHWC), 0 for NCHW
  int t0, tstep; // this thread's first position in the tile and the step between its positions
};

__device__ inline BlockPos block_pos(const Geo& g, int64_t tiles_h, int64_t tiles_w) {
  BlockPos b;
  int64_t tile;
  if (g.cl) {
    const int64_t per_n = tiles_h * tiles_w;
    b.n = blockIdx.x / per_n;
    tile = blockIdx.x - b.n * per_n;
    b.lane_c = threadIdx.x;
    b.c = int64_t(blockIdx.y) * g.CB + threadIdx.x;
    b.t0 = threadIdx.y;
    b.tstep = blockDim.y;
    b.blk = blockIdx.x;
  } else {
    b.n = blockIdx.x / g.C;
    b.c = blockIdx.x - b.n * g.C;
    tile = blockIdx.y;
    b.lane_c = 0;
    b.t0 = threadIdx.x;
    b.tstep = blockDim.x;
    b.blk = b.n * tiles_h * tiles_w + tile;
  }
  b.oh0 = (tile / tiles_w) * g.TH;
  b.ow0 = (tile % tiles_w) * g.TW;
  return b;
}

// Loads the source tile rows [r0, r0 + th) x cols [q0, q0 + tw) of plane/sample `src` into
// shared memory as [row][col][CB] (zeros outside [0, rows) x [0, cols) and past C).
template <typename S, typename A>
__device__ inline void load_tile(const Geo& g, const S* src, int64_t rows, int64_t cols, int64_t r0, int64_t q0,
                                 int th, int tw, int64_t c0, A* tile) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
  if (g.cl) {
    // src = sample base [rows][cols][C]; thread (x = channel, y) walks the positions.
    const int64_t c = c0 + threadIdx.x;
    for (int p = threadIdx.y; p < th * tw; p += blockDim.y) {
      const int64_t r = r0 + p / tw, q = q0 + p % tw;
      A v = 0;
      if (r >= 0 && r < rows && q >= 0 && q < cols && c < g.C) v = A(src[(r * cols + q) * g.C + c]);
      tile[p * g.CB + threadIdx.x] = v;
    }
  } else {
    for (int p = tid; p < th * tw; p += nthreads) {
      const int64_t r = r0 + p / tw, q = q0 + p % tw;
      tile[p] = (r >= 0 && r < rows && q >= 0 && q < cols) ? A(src[r * cols + q]) : A(0);
    }
  }
}

// The conv and its epilogues (forward eval / train, backward recompute + activation, weight
// gradient partials). See the file comment for the design.
template <typename T, typename A, int ACT, int MODE>
__global__ void __launch_bounds__(256) dw_tile_kernel(Geo g, Args<T, A> args) {
  extern __shared__ unsigned char smem_raw[];
  A* xs = reinterpret_cast<A*>(smem_raw);          // [in_th * in_tw][CB]
  A* ws = xs + g.in_th * g.in_tw * g.CB;            // [taps][CB]
  A* red = ws + g.taps() * g.CB;                    // [blockDim]
  const BlockPos b = block_pos(g, g.tiles_h, g.tiles_w);
  const int taps = g.taps();
  const bool valid_c = b.c < g.C;
  const int64_t c0 = b.c - b.lane_c;
  const int64_t hi0 = b.oh0 * g.SH - g.PH, wi0 = b.ow0 * g.SW - g.PW;

  // Source tile and weights, loaded once.
  if (g.cl) {
    load_tile(g, args.x + b.n * g.H * g.W * g.C, g.H, g.W, hi0, wi0, g.in_th, g.in_tw, c0, xs);
    for (int t = threadIdx.y; t < taps; t += blockDim.y)
      ws[t * g.CB + threadIdx.x] = valid_c ? args.w[b.c * taps + t] : A(0);
  } else {
    const int64_t plane = b.n * g.C + (g.groups > 1 ? shuffle_src(b.c, g.C, g.groups) : b.c);
    load_tile(g, args.x + plane * g.H * g.W, g.H, g.W, hi0, wi0, g.in_th, g.in_tw, int64_t(0), xs);
    for (int t = threadIdx.x; t < taps; t += blockDim.x) ws[t] = args.w[b.c * taps + t];
  }
  __syncthreads();

  const int CB = g.CB, lc = b.lane_c;
  const int64_t cc = valid_c ? b.c : 0;
  const A* coef = args.coef;
  const int64_t C = g.C;
  // Output element offset of tile position p (in the layout of out / grad_out / gz).
  auto out_index = [&](int p, bool& inside) -> int64_t {
    const int64_t oh = b.oh0 + p / g.TW, ow = b.ow0 + p % g.TW;
    inside = valid_c && p < g.TH * g.TW && oh < g.Ho && ow < g.Wo;
    return g.cl ? ((b.n * g.Ho + oh) * g.Wo + ow) * C + cc : ((b.n * C + cc) * g.Ho + oh) * g.Wo + ow;
  };
  // Shared offset of tap 0 for tile position p.
  auto src_base = [&](int p) { return ((p / g.TW) * g.SH * g.in_tw + (p % g.TW) * g.SW) * CB + lc; };

  if constexpr (MODE == kBwdWeight) {
    // Every tap's partial sum of gz * x over this block's outputs, from shared memory and the
    // thread's gz values in registers; then the per-channel block reduction of each tap.
    A gv[kMaxPerThread];
    int base[kMaxPerThread];
    A gsum = 0;
#pragma unroll
    for (int k = 0; k < kMaxPerThread; ++k) {
      const int p = b.t0 + k * b.tstep;
      bool inside;
      const int64_t o = out_index(p, inside);
      gv[k] = inside ? args.gz[o] : A(0);
      base[k] = inside ? src_base(p) : 0;
      gsum += gv[k];
    }
    A* part = args.part + (cc * g.nblk() + b.blk) * (taps + 1);
    for (int t = 0; t < taps; ++t) {
      const int off = ((t / g.KW) * g.DH * g.in_tw + (t % g.KW) * g.DW) * CB;
      A acc = 0;
#pragma unroll
      for (int k = 0; k < kMaxPerThread; ++k) acc += gv[k] * xs[base[k] + off];
      acc = chan_reduce(acc, red, g.cl);
      if (valid_c && b.t0 == 0) part[t] = acc;
    }
    gsum = chan_reduce(gsum, red, g.cl);
    if (valid_c && b.t0 == 0) part[taps] = gsum;
    return;
  }

  A vals[kMaxPerThread];
  A s1 = 0, s2 = 0, cnt = 0;
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) {
    const int p = b.t0 + k * b.tstep;
    bool inside;
    const int64_t o = out_index(p, inside);
    vals[k] = 0;
    if (!inside) continue;
    const int sb = src_base(p);
    A acc = 0;
    for (int kh = 0; kh < g.KH; ++kh) {
      const A* xr = xs + sb + kh * g.DH * g.in_tw * CB;
      const A* wr = ws + kh * g.KW * CB + lc;
      for (int kw = 0; kw < g.KW; ++kw) acc += wr[kw * CB] * xr[kw * g.DW * CB];
    }
    if constexpr (MODE == kFwdEval) {
      args.out[o] = static_cast<T>(act_fwd<ACT, ScalarOps<A>>(acc + coef[kBias * C + cc]));
    } else if constexpr (MODE == kFwdTrain) {
      const A z = acc + coef[kBias * C + cc];
      const T zt = static_cast<T>(z);
      args.out[o] = zt;
      vals[k] = A(zt);  // the statistics of the stored values, as the CPU op
      s1 += vals[k];
      cnt += 1;
    } else {  // kBwdAct
      const A x_hat = bn_xhat(acc, coef[kA0 * C + cc], coef[kA1 * C + cc]);
      const A y = x_hat * coef[kGamma * C + cc] + coef[kBeta * C + cc];
      const A gr = act_bwd<ACT, ScalarOps<A>>(A(args.go[o]), y);
      if (args.want_out)
        args.gz[o] = coef[kK1 * C + cc] * gr + coef[kK2 * C + cc] * x_hat + coef[kK3 * C + cc];
      s1 += gr;
      s2 += gr * x_hat;
    }
  }
  if constexpr (MODE == kFwdTrain) {
    // (count, mean, M2) of this block's outputs of the channel: two passes over the registers.
    const A n = chan_reduce(cnt, red, g.cl);
    const A sum = chan_reduce(s1, red, g.cl);  // every thread reduces: chan_reduce synchronises
    const A mean = n > 0 ? sum / n : A(0);
#pragma unroll
    for (int k = 0; k < kMaxPerThread; ++k) {
      const int p = b.t0 + k * b.tstep;
      bool inside;
      out_index(p, inside);
      if (inside) s2 += (vals[k] - mean) * (vals[k] - mean);
    }
    const A m2 = chan_reduce(s2, red, g.cl);
    if (valid_c && b.t0 == 0) {
      A* part = args.part + (cc * g.nblk() + b.blk) * 3;
      part[0] = n;
      part[1] = mean;
      part[2] = m2;
    }
  } else if constexpr (MODE == kBwdAct) {
    if (!args.want_sums) return;
    s1 = chan_reduce(s1, red, g.cl);
    s2 = chan_reduce(s2, red, g.cl);
    if (valid_c && b.t0 == 0) {
      A* part = args.part + (cc * g.nblk() + b.blk) * 2;
      part[0] = s1;
      part[1] = s2;
    }
  }
}

// Input gradient: gx = conv_transpose(gz, w) as a gather over an input-space tile (same tiling as
// the forward; the shared tile holds the gz rows/cols the tile's taps can reach, plus halo).
// gx[hi][wi] = sum over taps with (hi + PH - kh*DH) divisible by SH (and the same for columns) of
// w[kh][kw] * gz[(hi + PH - kh*DH) / SH][(wi + PW - kw*DW) / SW]; out-of-range gz rows are zeros.
__host__ __device__ inline int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <typename T, typename A>
__global__ void __launch_bounds__(256) bwd_input_kernel(Geo g, const A* __restrict__ gz, const A* __restrict__ w,
                                                        T* __restrict__ gx) {
  extern __shared__ unsigned char smem_raw[];
  A* gs = reinterpret_cast<A*>(smem_raw);
  A* ws = gs + g.in_th * g.in_tw * g.CB;
  // Here the tile is over input positions (TH x TW of H x W); tiles_h/tiles_w count those.
  const BlockPos b = block_pos(g, g.tiles_h, g.tiles_w);
  const int taps = g.taps(), CB = g.CB, lc = b.lane_c;
  const bool valid_c = b.c < g.C;
  const int64_t c0 = b.c - b.lane_c, C = g.C;
  const int64_t r0 = floor_div(b.oh0 + g.PH - int64_t(g.KH - 1) * g.DH, g.SH);
  const int64_t q0 = floor_div(b.ow0 + g.PW - int64_t(g.KW - 1) * g.DW, g.SW);
  if (g.cl) {
    load_tile(g, gz + b.n * g.Ho * g.Wo * C, g.Ho, g.Wo, r0, q0, g.in_th, g.in_tw, c0, gs);
    for (int t = threadIdx.y; t < taps; t += blockDim.y) ws[t * CB + threadIdx.x] = valid_c ? w[b.c * taps + t] : A(0);
  } else {
    load_tile(g, gz + (b.n * C + b.c) * g.Ho * g.Wo, g.Ho, g.Wo, r0, q0, g.in_th, g.in_tw, int64_t(0), gs);
    for (int t = threadIdx.x; t < taps; t += blockDim.x) ws[t] = w[b.c * taps + t];
  }
  __syncthreads();
  if (!valid_c) return;
  const int64_t gplane = g.cl ? 0 : b.n * C + (g.groups > 1 ? shuffle_src(b.c, C, g.groups) : b.c);
  for (int p = b.t0; p < g.TH * g.TW; p += b.tstep) {
    const int64_t hi = b.oh0 + p / g.TW, wi = b.ow0 + p % g.TW;
    if (hi >= g.H || wi >= g.W) continue;
    A acc = 0;
    for (int kh = 0; kh < g.KH; ++kh) {
      const int64_t num_h = hi + g.PH - int64_t(kh) * g.DH;
      if (num_h - floor_div(num_h, g.SH) * g.SH != 0) continue;
      const int64_t rr = floor_div(num_h, g.SH) - r0;  // in [0, in_th) by construction
      for (int kw = 0; kw < g.KW; ++kw) {
        const int64_t num_w = wi + g.PW - int64_t(kw) * g.DW;
        if (num_w - floor_div(num_w, g.SW) * g.SW != 0) continue;
        const int64_t qq = floor_div(num_w, g.SW) - q0;
        acc += ws[(kh * g.KW + kw) * CB + lc] * gs[(rr * g.in_tw + qq) * CB + lc];
      }
    }
    const int64_t o = g.cl ? ((b.n * g.H + hi) * g.W + wi) * C + b.c : gplane * g.H * g.W + hi * g.W + wi;
    gx[o] = static_cast<T>(acc);
  }
}

// ---- per-channel kernels (C threads; tiny) -------------------------------------------------------

// Per-channel parameters (float64 views, defaults filled by the host) -> the kernels' weights and
// coefficient rows. mode: kFwdEval (BN folded into w and bias when `normalises`), kFwdTrain
// (plain w and conv bias), kBwdAct (plain w; a1, a0, k1, gamma, beta of the backward).
struct PrepArgs {
  const double *w, *b, *gamma, *beta, *mean, *var;
  double eps;
  bool normalises;
  int mode;
};

template <typename A>
__global__ void prep_kernel(PrepArgs p, int64_t C, int taps, A* w, A* coef) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    double scale = 1.0, shift = p.b[c];
    if (p.mode == kFwdEval && p.normalises) {
      scale = bn_scale(p.gamma[c], p.var[c], p.eps);
      shift = bn_shift(p.b[c], p.mean[c], scale, p.beta[c]);
    }
    for (int t = 0; t < taps; ++t) w[c * taps + t] = A(p.w[c * taps + t] * scale);
    coef[kBias * C + c] = A(shift);
    if (p.mode == kBwdAct) {
      const double invstd = p.normalises ? 1.0 / sqrt(p.var[c] + p.eps) : 1.0;
      const double m = p.normalises ? p.mean[c] : 0.0;
      const BnBackward bb = bn_backward(p.b[c], m, invstd, p.gamma[c]);
      coef[kA1 * C + c] = A(bb.a1);
      coef[kA0 * C + c] = A(bb.a0);
      coef[kK1 * C + c] = A(bb.k1);
      coef[kK2 * C + c] = A(0);
      coef[kK3 * C + c] = A(0);
      coef[kGamma * C + c] = A(p.gamma[c]);
      coef[kBeta * C + c] = A(p.beta[c]);
    }
  }
}

// The reductions over the blocks of a channel run one block per channel (kRedThreads threads):
// thread-strided partials, then a fixed tree in shared memory, in double. The order depends on
// the shape only: deterministic, no atomics.
constexpr int kRedThreads = 256;

template <typename F>
__device__ inline double block_sum(int64_t n, F f, double* red) {
  double s = 0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) s += f(k);
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();
  return r;
}

// Training forward: merge the per-block (count, mean, M2) of channel blockIdx.x (Chan, double)
// -> batch mean and biased variance (saved, in T) and the normalise terms scale/shift.
template <typename T, typename A>
__global__ void __launch_bounds__(kRedThreads) stats_kernel(const A* __restrict__ part, int64_t C, int64_t nblk,
                                                            PrepArgs p, T* save_mean, T* save_var, A* scale,
                                                            A* shift) {
  __shared__ double rn[kRedThreads], rmean[kRedThreads], rm2[kRedThreads];
  const int64_t c = blockIdx.x;
  double n = 0, mean = 0, m2 = 0;
  for (int64_t k = threadIdx.x; k < nblk; k += blockDim.x) {
    const A* q = part + (c * nblk + k) * 3;
    chan_merge(n, mean, m2, double(q[0]), double(q[1]), double(q[2]));
  }
  rn[threadIdx.x] = n;
  rmean[threadIdx.x] = mean;
  rm2[threadIdx.x] = m2;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      const int o = threadIdx.x + w;
      chan_merge(rn[threadIdx.x], rmean[threadIdx.x], rm2[threadIdx.x], rn[o], rmean[o], rm2[o]);
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const double var = rn[0] > 0 ? rm2[0] / rn[0] : 0.0;
  save_mean[c] = static_cast<T>(rmean[0]);
  save_var[c] = static_cast<T>(var);
  const double sc = bn_scale(p.gamma[c], var, p.eps);
  scale[c] = A(sc);
  shift[c] = A(bn_shift(0.0, rmean[0], sc, p.beta[c]));
}

// Backward: the sums of g and g * xhat of channel blockIdx.x over its blocks; in training also
// the BN terms k2, k3 of the second pass.
template <typename A>
__global__ void __launch_bounds__(kRedThreads) sums_kernel(const A* __restrict__ part, int64_t C, int64_t nblk,
                                                           double M, bool training, double* sum_g, double* sum_gx,
                                                           A* coef) {
  __shared__ double red[kRedThreads];
  const int64_t c = blockIdx.x;
  const A* q = part + c * nblk * 2;
  const double s1 = block_sum(nblk, [&](int64_t k) { return double(q[2 * k]); }, red);
  const double s2 = block_sum(nblk, [&](int64_t k) { return double(q[2 * k + 1]); }, red);
  if (threadIdx.x != 0) return;
  sum_g[c] = s1;
  sum_gx[c] = s2;
  if (training) {
    BnBackward bb{0, 0, double(coef[kK1 * C + c]), 0, 0};
    bn_train_terms(bb, s1, s2, M);
    coef[kK2 * C + c] = A(bb.k2);
    coef[kK3 * C + c] = A(bb.k3);
  }
}

// Weight and bias gradients: block i = (c, tap or bias) sums its blocks' partials (double).
template <typename A>
__global__ void __launch_bounds__(kRedThreads) wgrad_kernel(const A* __restrict__ part, int taps, int64_t nblk,
                                                            double* gw, double* gb) {
  __shared__ double red[kRedThreads];
  const int64_t c = blockIdx.x / (taps + 1), t = blockIdx.x % (taps + 1);
  const A* q = part + c * nblk * (taps + 1) + t;
  const double s = block_sum(nblk, [&](int64_t k) { return double(q[k * (taps + 1)]); }, red);
  if (threadIdx.x != 0) return;
  if (t < taps) gw[c * taps + t] = s;
  else gb[c] = s;
}

// Training forward, second pass: out = act(out * scale[c] + shift[c]) in place (one thread per
// element, channel from the layout).
template <typename T, typename A, int ACT>
__global__ void bn_act_kernel(T* out, const A* __restrict__ scale, const A* __restrict__ shift, int64_t total,
                              int64_t C, int64_t HW, bool cl) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = cl ? i % C : (i / HW) % C;
    out[i] = static_cast<T>(act_fwd<ACT, ScalarOps<A>>(A(out[i]) * scale[c] + shift[c]));
  }
}

// ---- host side -------------------------------------------------------------------------------------

// Tile sizes: the largest candidate whose shared tile fits (see the file comment).
// `src_extent(t, k, s, d)`: source rows needed by t outputs.
Geo make_geo(const ConvShape& s, int64_t groups, bool transposed, size_t acc_size) {
  Geo g{};
  g.N = s.N; g.C = s.C; g.H = s.H; g.W = s.W; g.Ho = s.Ho; g.Wo = s.Wo;
  g.KH = int(s.KH); g.KW = int(s.KW); g.SH = int(s.SH); g.SW = int(s.SW);
  g.PH = int(s.PH); g.PW = int(s.PW); g.DH = int(s.DH); g.DW = int(s.DW);
  g.groups = int(groups);
  g.cl = s.cl;
  const int64_t rows = transposed ? s.H : s.Ho, cols = transposed ? s.W : s.Wo;
  auto extent = [&](int t, int k, int st, int d) {
    // forward: input rows of t outputs; transposed: gz rows reachable from t input rows
    return transposed ? (t - 1 + (k - 1) * d) / st + 2 : (t - 1) * st + (k - 1) * d + 1;
  };
  struct Cand { int CB, TH, TW; };
  static const Cand nchw[] = {{1, 16, 32}, {1, 8, 32}, {1, 8, 16}, {1, 4, 16}, {1, 4, 8}, {1, 2, 8}, {1, 2, 4},
                              {1, 1, 4}, {1, 1, 2}, {1, 1, 1}};
  static const Cand nhwc[] = {{32, 4, 8}, {32, 2, 8}, {32, 2, 4}, {32, 1, 4}, {32, 1, 2}, {32, 1, 1},
                              {16, 1, 1}, {8, 1, 1}};
  const Cand* cands = s.cl ? nhwc : nchw;
  const int ncand = s.cl ? int(std::size(nhwc)) : int(std::size(nchw));
  for (int i = 0; i < ncand; ++i) {
    Cand cd = cands[i];
    // Small images: no tile larger than needed (rounded to the candidate shapes).
    if (!s.cl) {
      while (cd.TH > 1 && cd.TH / 2 >= rows) cd.TH /= 2;
      while (cd.TW > 4 && cd.TW / 2 >= cols) cd.TW /= 2;
    }
    const int in_th = extent(cd.TH, g.KH, g.SH, g.DH), in_tw = extent(cd.TW, g.KW, g.SW, g.DW);
    const size_t bytes = acc_size * (size_t(in_th) * in_tw * cd.CB + size_t(g.KH) * g.KW * cd.CB + 256);
    if (bytes <= kSmemLimit || i == ncand - 1) {
      TORCH_CHECK_VALUE(bytes <= kSmemLimit, "fastdw::dwconv_bn_act (cuda): kernel ", g.KH, "x", g.KW,
                        " with dilation ", g.DH, "x", g.DW, " needs more shared memory than the kernel has (",
                        bytes, " bytes)");
      g.CB = cd.CB; g.TH = cd.TH; g.TW = cd.TW;
      g.in_th = in_th; g.in_tw = in_tw;
      break;
    }
  }
  g.tiles_h = ceil_div(rows, g.TH);
  g.tiles_w = ceil_div(cols, g.TW);
  return g;
}

size_t smem_bytes(const Geo& g, size_t acc_size) {
  return acc_size * (size_t(g.in_th) * g.in_tw * g.CB + size_t(g.taps()) * g.CB + 256);
}

dim3 tile_grid(const Geo& g) {
  if (g.cl) return dim3(static_cast<unsigned>(g.N * g.tiles_h * g.tiles_w), static_cast<unsigned>(ceil_div(g.C, g.CB)));
  TORCH_CHECK(g.tiles_h * g.tiles_w <= 65535, "fastdw::dwconv_bn_act (cuda): image too large (",
              g.tiles_h * g.tiles_w, " tiles per plane, 65535 supported)");
  return dim3(static_cast<unsigned>(g.N * g.C), static_cast<unsigned>(g.tiles_h * g.tiles_w));
}

dim3 tile_block(const Geo& g) { return g.cl ? dim3(g.CB, 256 / g.CB) : dim3(256); }

template <typename T, typename A, int ACT, int MODE>
void launch_tile(const Geo& g, const Args<T, A>& args) {
  dw_tile_kernel<T, A, ACT, MODE><<<tile_grid(g), tile_block(g), smem_bytes(g, sizeof(A)), stream()>>>(g, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned small_grid(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, 128), 1024)));
}

// Per-channel float64 parameter views (defaults when absent), kept alive by the caller.
struct Params {
  at::Tensor w, b, gamma, beta, mean, var;
  PrepArgs args(double eps, bool normalises, int mode) const {
    return PrepArgs{w.const_data_ptr<double>(), b.const_data_ptr<double>(), gamma.const_data_ptr<double>(),
                    beta.const_data_ptr<double>(), mean.const_data_ptr<double>(), var.const_data_ptr<double>(),
                    eps, normalises, mode};
  }
};

at::Tensor as_double(const std::optional<at::Tensor>& t, int64_t C, double fill, const at::Tensor& x) {
  if (!defined(t)) return at::full({C}, fill, x.options().dtype(at::kDouble));
  return t->detach().to(at::kDouble).contiguous();
}

Params params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
              const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, int64_t C) {
  Params p;
  p.w = weight.detach().to(at::kDouble).contiguous();
  p.b = as_double(bias, C, 0.0, x);
  p.gamma = as_double(bn_weight, C, 1.0, x);
  p.beta = as_double(bn_bias, C, 0.0, x);
  const bool has = defined(mean) && mean->numel() > 0;
  p.mean = has ? as_double(mean, C, 0.0, x) : at::zeros({C}, x.options().dtype(at::kDouble));
  p.var = has ? as_double(var, C, 1.0, x) : at::ones({C}, x.options().dtype(at::kDouble));
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, bool training, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    int64_t shuffle_groups) {
  auto [s, act] = check_dwconv(x, weight, bias, bn_weight, bn_bias, mean, var, stride, padding, dilation,
                               activation, shuffle_groups);
  check_dwconv_forward(s, mean, var, training);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool normalises = training || defined(mean);
  const auto fmt = s.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(fmt));
  at::Tensor save_mean = at::empty({training ? s.C : 0}, x.options());
  at::Tensor save_var = at::empty({training ? s.C : 0}, x.options());
  if (s.N == 0 || s.C == 0) {
    save_mean.zero_();
    save_var.zero_();
    return {out, save_mean, save_var};
  }
  const bool shuffle_copy = shuffle_groups > 1 && s.cl;
  at::Tensor xc = shuffle_copy ? shuffled(x, shuffle_groups, fmt) : x.contiguous(fmt);
  const Params prm = params(x, weight, bias, bn_weight, bn_bias, mean, var, s.C);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const Geo g = make_geo(s, shuffle_copy ? 1 : shuffle_groups, false, sizeof(A));
    const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    at::Tensor wk = at::empty({s.C * s.taps()}, aopt);
    at::Tensor coef = at::empty({kCoefRows * s.C}, aopt);
    prep_kernel<A><<<small_grid(s.C), 128, 0, stream()>>>(prm.args(eps, normalises, training ? kFwdTrain : kFwdEval),
                                                          s.C, int(s.taps()), wk.mutable_data_ptr<A>(),
                                                          coef.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Args<T, A> args{};
    args.x = xc.const_data_ptr<T>();
    args.out = out.mutable_data_ptr<T>();
    args.w = wk.const_data_ptr<A>();
    args.coef = coef.const_data_ptr<A>();
    if (!training) {
      dispatch_act(act, [&](auto ACT) { launch_tile<T, A, decltype(ACT)::value, kFwdEval>(g, args); });
      return;
    }
    at::Tensor part = at::empty({s.C * g.nblk() * 3}, aopt);
    args.part = part.mutable_data_ptr<A>();
    launch_tile<T, A, int(Act::None), kFwdTrain>(g, args);
    A* scale = coef.mutable_data_ptr<A>() + kA1 * s.C;  // free rows in the forward
    A* shift = coef.mutable_data_ptr<A>() + kA0 * s.C;
    stats_kernel<T, A><<<static_cast<unsigned>(s.C), kRedThreads, 0, stream()>>>(
        part.const_data_ptr<A>(), s.C, g.nblk(), prm.args(eps, true, kFwdTrain), save_mean.mutable_data_ptr<T>(),
        save_var.mutable_data_ptr<T>(), scale, shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = out.numel();
    dispatch_act(act, [&](auto ACT) {
      bn_act_kernel<T, A, decltype(ACT)::value><<<grid_for(total), kThreads, 0, stream()>>>(
          out.mutable_data_ptr<T>(), scale, shift, total, s.C, s.Ho * s.Wo, s.cl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, save_mean, save_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, bool training, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    std::array<bool, 5> mask, int64_t shuffle_groups, const std::optional<at::Tensor>& out) {
  auto [s, act] = check_dwconv(x, weight, bias, bn_weight, bn_bias, mean, var, stride, padding, dilation,
                               activation, shuffle_groups);
  check_dwconv_backward(s, x, grad_out, mean, training, out);  // out is checked, not used: z is recomputed
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_stats = defined(mean) && mean->numel() > 0;
  const bool normalises = training || has_stats;
  const auto fmt = s.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool shuffle_copy = shuffle_groups > 1 && s.cl;
  auto none = [&] { return at::empty({0}, x.options()); };
  const auto dopt = x.options().dtype(at::kDouble);
  at::Tensor sum_g = at::zeros({s.C}, dopt), sum_gx = at::zeros({s.C}, dopt);
  at::Tensor dw = at::zeros({s.C * s.taps()}, dopt), db = at::zeros({s.C}, dopt);
  at::Tensor gx = mask[0] ? at::zeros(x.sizes(), x.options().memory_format(fmt)) : none();

  if (s.N > 0 && s.C > 0) {
    at::Tensor xc = shuffle_copy ? shuffled(x, shuffle_groups, fmt) : x.contiguous(fmt);
    at::Tensor go = grad_out.to(x.scalar_type()).contiguous(fmt);
    const Params prm = params(x, weight, bias, bn_weight, bn_bias, mean, var, s.C);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_backward_cuda", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      const int64_t groups = shuffle_copy ? 1 : shuffle_groups;
      const Geo g = make_geo(s, groups, false, sizeof(A));
      const auto aopt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
      at::Tensor wk = at::empty({s.C * s.taps()}, aopt);
      at::Tensor coef = at::empty({kCoefRows * s.C}, aopt);
      prep_kernel<A><<<small_grid(s.C), 128, 0, stream()>>>(prm.args(eps, normalises, kBwdAct), s.C, int(s.taps()),
                                                            wk.mutable_data_ptr<A>(), coef.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const bool need_gz = mask[0] || mask[1] || mask[2];
      at::Tensor gz = need_gz ? at::empty({s.N * s.C * s.Ho * s.Wo}, aopt) : at::Tensor();
      at::Tensor part = at::empty({s.C * g.nblk() * 2}, aopt);
      Args<T, A> args{};
      args.x = xc.const_data_ptr<T>();
      args.go = go.const_data_ptr<T>();
      args.gz = need_gz ? gz.mutable_data_ptr<A>() : nullptr;
      args.w = wk.const_data_ptr<A>();
      args.coef = coef.mutable_data_ptr<A>();
      args.part = part.mutable_data_ptr<A>();
      auto sums = [&] {
        sums_kernel<A><<<static_cast<unsigned>(s.C), kRedThreads, 0, stream()>>>(
            part.const_data_ptr<A>(), s.C, g.nblk(), double(s.N * s.Ho * s.Wo), training,
            sum_g.mutable_data_ptr<double>(), sum_gx.mutable_data_ptr<double>(), coef.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      dispatch_act(act, [&](auto ACT) {
        constexpr int AC = decltype(ACT)::value;
        if (!training) {  // one pass: the BN parameter sums and gz = k1 * g together
          args.want_out = need_gz;
          args.want_sums = true;
          launch_tile<T, A, AC, kBwdAct>(g, args);
          sums();
        } else {  // pass 1: the sums; pass 2: gz with the BN terms of the sums
          args.want_out = false;
          args.want_sums = true;
          launch_tile<T, A, AC, kBwdAct>(g, args);
          sums();
          if (need_gz) {
            args.want_out = true;
            args.want_sums = false;
            launch_tile<T, A, AC, kBwdAct>(g, args);
          }
        }
      });
      if (mask[1] || mask[2]) {
        at::Tensor wpart = at::empty({s.C * g.nblk() * (s.taps() + 1)}, aopt);
        args.part = wpart.mutable_data_ptr<A>();
        launch_tile<T, A, int(Act::None), kBwdWeight>(g, args);
        wgrad_kernel<A><<<static_cast<unsigned>(s.C * (s.taps() + 1)), kRedThreads, 0, stream()>>>(
            wpart.const_data_ptr<A>(), int(s.taps()), g.nblk(), dw.mutable_data_ptr<double>(),
            db.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (mask[0]) {
        const Geo gi = make_geo(s, groups, true, sizeof(A));
        bwd_input_kernel<T, A><<<tile_grid(gi), tile_block(gi), smem_bytes(gi, sizeof(A)), stream()>>>(
            gi, gz.const_data_ptr<A>(), wk.const_data_ptr<A>(), gx.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    if (mask[0] && shuffle_copy) gx = shuffled(gx, s.C / shuffle_groups, fmt);  // un-shuffle (inverse)
  }
  at::Tensor gw = mask[1] ? dw.view(weight.sizes()).to(weight.scalar_type()) : none();
  at::Tensor gb = mask[2] && defined(bias) ? db.to(bias->scalar_type()) : none();
  at::Tensor gbw = mask[3] && defined(bn_weight) ? sum_gx.to(bn_weight->scalar_type()) : none();
  at::Tensor gbb = mask[4] && defined(bn_bias) ? sum_g.to(bn_bias->scalar_type()) : none();
  return {gx, gw, gb, gbw, gbb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CUDA, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act_cuda);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward_cuda);
}

}  // namespace fastdw::cuda
