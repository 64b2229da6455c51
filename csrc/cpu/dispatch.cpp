// Run-time choice of the instruction set for the CPU kernels (see cpu/isa.h).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu/isa.h"

namespace fastdw::cpu {
namespace {

int hardware_level() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#ifdef FASTDW_HAVE_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
#endif
#ifdef FASTDW_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
#endif
  return kDefault;
}

int parse(const char* name) {
  if (!name) return -1;
  if (!std::strcmp(name, "default")) return kDefault;
  if (!std::strcmp(name, "avx2")) return kAvx2;
  if (!std::strcmp(name, "avx512")) return kAvx512;
  return -1;
}

std::atomic<int>& level() {
  static std::atomic<int> l = [] {
    int hw = hardware_level();
    int cap = parse(std::getenv("FASTDW_CPU_CAPABILITY"));
    return cap >= 0 && cap < hw ? cap : hw;
  }();
  return l;
}

}  // namespace

int isa_level() { return level().load(std::memory_order_relaxed); }

const char* cpu_capability() {
  static const char* names[] = {"default", "avx2", "avx512"};
  return names[isa_level()];
}

bool set_cpu_capability(const char* name) {
  int l = parse(name);
  if (l < 0 || l > hardware_level()) return false;
  level().store(l);
  return true;
}

}  // namespace fastdw::cpu
