// Per-element maths of fastdw::se_scale, shared by csrc/cpu and csrc/cuda (see hd.h): the inner
// activation, the gate and their derivatives on the pooled [N][S] and [N][C] vectors. The CPU
// kernels run exactly these functions, so the CPU tests exercise the maths of the CUDA kernels.
#pragma once

#include <cstdint>

#include "common/dwconv_bn_act_math.h"
#include "common/hd.h"

namespace fastdw {

enum class SEAct : int { ReLU = 0, SiLU = 1 };
enum class SEGate : int { HardSigmoid = 0, Sigmoid = 1 };

struct SEShape {
  int64_t N, C, S, HW;  // batch, channels, squeeze channels, spatial positions per plane
  bool cl;              // x is [N][HW][C] (channels last), else [N][C][HW]
};

// The inner activation: the dwconv activations of the same name (one formula each).
template <typename T>
FASTDW_HD inline T se_act(SEAct a, T h) {
  return a == SEAct::ReLU ? act_fwd<int(Act::ReLU), ScalarOps<T>>(h) : act_fwd<int(Act::SiLU), ScalarOps<T>>(h);
}
// PyTorch's conventions: relu' = 1 for h > 0 else 0; silu' = s (1 + h (1 - s)).
template <typename T>
FASTDW_HD inline T se_act_grad(SEAct a, T h) {
  return a == SEAct::ReLU ? act_bwd<int(Act::ReLU), ScalarOps<T>>(T(1), h)
                          : act_bwd<int(Act::SiLU), ScalarOps<T>>(T(1), h);
}
// hardsigmoid(z) = relu6(z + 3) / 6 (PyTorch's definition); sigmoid(z) = 1 / (1 + e^-z).
template <typename T>
FASTDW_HD inline T se_gate(SEGate g, T z) {
  if (g == SEGate::HardSigmoid) return ScalarOps<T>::clamp(z + T(3), T(0), T(6)) / T(6);
  return T(1) / (T(1) + hd_exp(-z));
}
// hardsigmoid' = 1/6 strictly inside (-3, 3), 0 outside, also at +-3 (as PyTorch);
// sigmoid' = s (1 - s).
template <typename T>
FASTDW_HD inline T se_gate_grad(SEGate g, T z) {
  if (g == SEGate::HardSigmoid) return (z > T(-3) && z < T(3)) ? T(1) / T(6) : T(0);
  const T s = T(1) / (T(1) + hd_exp(-z));
  return s * (T(1) - s);
}

}  // namespace fastdw
