// Launch helpers shared by the CUDA kernels of fastdw (csrc/cuda/<op>.cu): grid sizes, the
// copy units of the data-movement kernels, and the accumulation type. Every launch runs on the
// current stream of the input's device (the caller holds a CUDAGuard) and is checked with
// C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace fastdw::cuda {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n items: enough to fill the GPU several times over, no more.
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, threads), sms * 32)));
}

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// fp16/bf16 are loaded, computed in float (at::opmath_type) and rounded once at the store.
template <typename T>
using acc_t = at::opmath_type<T>;

// A copy moves bytes, not numbers: the data-movement kernels are instantiated per copy unit (2,
// 4, 8 or 16 bytes), not per dtype, so one 16-byte load moves 8 half or 4 float elements.
template <int Bytes> struct Unit;
template <> struct Unit<2> { using type = uint16_t; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<8> { using type = uint2; };
template <> struct Unit<16> { using type = uint4; };

// The widest unit (<= 16 bytes, >= one element of esize bytes) that divides every element count
// in `counts` (run lengths, offsets and strides in elements) and every address in `ptrs`.
inline int copy_unit(int64_t esize, std::initializer_list<int64_t> counts, std::initializer_list<const void*> ptrs) {
  for (int u = 16; u > esize; u /= 2) {
    bool ok = true;
    for (int64_t n : counts) ok = ok && (n * esize) % u == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % u == 0;
    if (ok) return u;
  }
  return static_cast<int>(esize);
}

// f(std::integral_constant<int, Bytes>{}) for a unit of 2, 4, 8 or 16 bytes.
template <typename F>
inline void dispatch_unit(int bytes, F&& f) {
  switch (bytes) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 16>{}); break;
  }
}

}  // namespace fastdw::cuda
