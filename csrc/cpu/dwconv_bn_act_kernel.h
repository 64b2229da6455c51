// Interface between the dispatcher (dwconv_bn_act.cpp, compiled once with baseline flags) and the
// kernels (dwconv_bn_act_impl.h, compiled once per instruction set in csrc/cpu/isa/<isa>.cpp).
// Only plain pointers and PODs cross this line, so no ATen type is compiled with AVX-512 flags
// and then called from baseline code.
#pragma once
#include <cstdint>

#include "common/dwconv_bn_act_math.h"
#include "cpu/isa.h"

namespace fastdw::cpu {

// Act and ConvShape: csrc/common/dwconv_bn_act_math.h (shared with the CUDA kernels).

// Per-channel vectors of the backward pass (length C each).
template <typename T>
struct BwdParams {
  const T *a1, *a0, *gamma, *beta, *k1, *k2, *k3;
};

template <typename T>
struct DWKernels {
  // out = act(conv(x, w) + b). With mean/var non-null (act must be None): also the per-channel
  // mean and biased variance of out, in double (NHWC: shifted sums per row, merged per task;
  // NCHW: two-pass per plane; Chan's merge across them).
  void (*forward)(const ConvShape&, Act, const T* x, const T* w, const T* b, T* out, double* mean,
                  double* var);
  // out = act(out * scale[c] + shift[c]), in place.
  void (*scale_shift_act)(const ConvShape&, Act, T* out, const T* scale, const T* shift);
  // NHWC, the whole backward: z = conv(x, w) recomputed, xhat = (z + a0) * a1, y = xhat * gamma +
  // beta, g = grad_out * act'(y); sum_gy / sum_gy_xhat (nullable): per-channel sums of g and
  // g * xhat (the BN parameter gradients); the conv-output gradient gz = k1 * g + k2 * xhat + k3,
  // never stored, feeds gx (nullable; a gather, so threads never write the same element) and
  // gw[c][tap] / gb[c] (nullable; double sums, deterministic order). Training: call with the
  // sums only, then with the gradients and k2 / k3 derived from them.
  void (*backward_rows)(const ConvShape&, Act, const T* x, const T* w, const BwdParams<T>& p, const T* grad_out,
                        T* gx, double* gw, double* gb, double* sum_gy, double* sum_gy_xhat);
  // NCHW, the whole backward: gz recomputed per plane and, without going to memory, gx
  // (nullable) and gw / gb (nullable, as backward_rows); sum_gy / sum_gy_xhat as backward_rows
  // (nullable in eval; in training required, and k2 / k3 of p are ignored: the kernel derives
  // them per channel from the sums, as bn_train_terms).
  void (*backward_planes)(const ConvShape&, Act, const T* x, const T* w, const BwdParams<T>& p, const T* grad_out,
                          T* gx, double* gw, double* gb, double* sum_gy, double* sum_gy_xhat, bool training);
  // dst[n][j][i] = src[n][i][j] for n < N, i < R, j < Cols: NCHW <-> NHWC of dense tensors
  // (R = C, Cols = H*W one way; R = H*W, Cols = C the other).
  void (*transpose)(const T* src, T* dst, int64_t N, int64_t R, int64_t Cols);
  // Forward of NCHW x / out with small planes on the NHWC row kernel: per (image, 64-channel
  // block) the planes are transposed into an L1/L2-resident slab, convolved, and transposed back.
  // w in the NHWC layout [taps][C]. mean / var as forward (training; act None).
  void (*forward_small_nchw)(const ConvShape&, Act, const T* x, const T* w, const T* b, T* out, double* mean,
                             double* var);
  // The backward of NCHW tensors with small planes on such slabs: arguments as backward_planes,
  // but w in the NHWC layout [taps][C].
  void (*backward_small_nchw)(const ConvShape&, Act, const T* x, const T* w, const BwdParams<T>& p,
                              const T* grad_out, T* gx, double* gw, double* gb, double* sum_gy, double* sum_gy_xhat,
                              bool training);
  // Training, NHWC, ReLU / ReLU6 only: the BN sums of the backward from the forward's output out
  // (no conv): sum_gy[c] = sum of g = grad_out * act'(out), sum_gob[c] = sum of g * (out - beta)
  // (= gamma * sum of g * xhat where g != 0).
  void (*output_sums)(const ConvShape&, Act, const T* out, const T* grad_out, const T* beta, double* sum_gy,
                      double* sum_gob);
};

struct DWKernelTable {
  const char* isa;
  DWKernels<float> f32;
  DWKernels<double> f64;
};

FASTDW_ISA_SELECT(DWKernelTable, dw_table)

}  // namespace fastdw::cpu
