// Vector helpers shared by every op's kernels (compiled per ISA: see csrc/cpu/isa.h).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace fastdw::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;
template <typename T>
using V = Vectorized<T>;

// Loads / stores of n <= VL elements; partial loads zero the lanes past n.
template <typename T>
inline V<T> load(const T* p, int64_t n) {
  return n == V<T>::size() ? V<T>::loadu(p) : V<T>::loadu(p, n);
}
template <typename T>
inline void store(const V<T>& v, T* p, int64_t n) {
  if (n == V<T>::size()) v.store(p); else v.store(p, n);
}

}  // namespace fastdw::cpu::CPU_CAPABILITY
