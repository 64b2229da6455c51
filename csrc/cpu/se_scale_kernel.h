// Interface between the dispatcher (se_scale.cpp, compiled once with baseline flags) and the
// kernels (se_scale_impl.h, compiled once per instruction set in csrc/cpu/isa/<isa>.cpp).
// Only plain pointers and PODs cross this line.
#pragma once
#include <cstdint>

#include "common/se_scale_math.h"
#include "cpu/isa.h"

namespace fastdw::cpu {

// SEAct, SEGate, SEShape: csrc/common/se_scale_math.h (shared with the CUDA kernels).

template <typename T>
struct SEKernels {
  // sums[n * C + c] = sum over hw of x[n, c, hw] * y[n, c, hw] (y == nullptr: of x alone), in
  // double, reduced in an order fixed by the shape (not by the thread count).
  void (*channel_sums)(const SEShape&, const T* x, const T* y, double* sums);
  // For every sample: h = W1 p + b1, z = W2 act(h) + b2, g = gate(z). p, z, g: [N][C]; h: [N][S];
  // w1: [S][C], w2: [C][S]; biases never null (zeros when the module has none).
  void (*excite)(const SEShape&, SEAct, SEGate, const T* p, const T* w1, const T* b1, const T* w2, const T* b2,
                 T* h, T* z, T* g);
  // Backward of excite, given dg = dL/dg [N][C] and the saved p, h, z: dz = dg * gate'(z),
  // db2 = sum_n dz, dW2 = dz^T act(h), dh = (dz W2) * act'(h), db1 = sum_n dh, dW1 = dh^T p,
  // dp = dh W1. Outputs dp [N][C], dw1 [S][C], db1 [S], dw2 [C][S], db2 [C]; null ones are skipped.
  void (*excite_backward)(const SEShape&, SEAct, SEGate, const T* p, const T* w1, const T* w2, const T* h,
                          const T* z, const T* dg, T* dp, T* dw1, T* db1, T* dw2, T* db2);
  // out = x * a[n, c] + b[n, c] (b == nullptr: x * a[n, c]); out may alias x.
  void (*scale)(const SEShape&, const T* x, const T* a, const T* b, T* out);
};

struct SEKernelTable {
  const char* isa;
  SEKernels<float> f32;
  SEKernels<double> f64;
};

FASTDW_ISA_SELECT(SEKernelTable, se_table)

}  // namespace fastdw::cpu
