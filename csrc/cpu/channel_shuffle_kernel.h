// Interface between the dispatcher (channel_shuffle.cpp, compiled once with baseline flags) and the
// kernels (channel_shuffle_impl.h, compiled once per instruction set in csrc/cpu/isa/<isa>.cpp).
// Only plain pointers and PODs cross this line.
#pragma once
#include <cstdint>

#include "common/channel_shuffle_math.h"
#include "cpu/isa.h"

namespace fastdw::cpu {

// ShuffleShape, PairShape: csrc/common/channel_shuffle_math.h (shared with the CUDA kernels).

template <typename T>
struct ShuffleKernels {
  // out[n, k * g + i] = x[n, i * (C / g) + k]: torch.nn.functional.channel_shuffle(x, g).
  void (*shuffle)(const ShuffleShape&, const T* x, T* out);
  // out[n, 2k] = a[n, k], out[n, 2k + 1] = b[n, k]: channel_shuffle(cat([a, b], 1), 2).
  void (*interleave)(const PairShape&, const T* a, const T* b, T* out);
  // The inverse: ga[n, k] = g[n, 2k], gb[n, k] = g[n, 2k + 1]; g, ga, gb dense (sa, sb unused).
  void (*deinterleave)(const PairShape&, const T* g, T* ga, T* gb);
};

struct ShuffleKernelTable {
  const char* isa;
  ShuffleKernels<float> f32;
  ShuffleKernels<double> f64;
};

FASTDW_ISA_SELECT(ShuffleKernelTable, shuffle_table)

}  // namespace fastdw::cpu
