// Arithmetic shared by the CPU (g++) and CUDA (nvcc) kernels. FASTDW_HD marks functions callable
// from both host and device code; it is empty when the compiler is not nvcc, so the CPU build
// sees plain inline functions. The *_math.h headers of this folder hold each op's per-element
// maths; the CPU kernels run the same functions (scalar paths), so the CPU tests exercise the
// maths that the CUDA kernels use.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTDW_HD __host__ __device__
#else
#define FASTDW_HD
#endif

namespace fastdw {

// Scalar maths on float or double (the accumulation types of every kernel), callable on both sides.
FASTDW_HD inline float hd_exp(float x) { return expf(x); }
FASTDW_HD inline double hd_exp(double x) { return exp(x); }
template <typename T>
FASTDW_HD inline T hd_min(T a, T b) { return b < a ? b : a; }
template <typename T>
FASTDW_HD inline T hd_max(T a, T b) { return a < b ? b : a; }

// Element-wise primitives the shared formulas are written with, for a scalar T. The CPU kernels
// instantiate the same formulas with their own primitives over at::vec::Vectorized<T> (a struct
// with the same members), so the formula is written once and the CPU hot loops stay vectorised.
template <typename T>
struct ScalarOps {
  using V = T;
  FASTDW_HD static T splat(double v) { return T(v); }
  // NaN passes through, as in PyTorch (the comparisons are false for NaN).
  FASTDW_HD static T clamp_min(T y, T lo) { return y < lo ? lo : y; }
  FASTDW_HD static T clamp(T y, T lo, T hi) { return y < lo ? lo : (y > hi ? hi : y); }
  FASTDW_HD static T exp_neg(T y) { return hd_exp(-y); }
  // c ? a : b
  FASTDW_HD static T select(bool c, T a, T b) { return c ? a : b; }
};

}  // namespace fastdw
