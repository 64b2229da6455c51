// Run-time choice of instruction set. Every op's kernels are compiled once per ISA (one
// translation unit per ISA in csrc/cpu/isa/, flags in setup.py); the op picks its table with
// FASTDW_ISA_SELECT. Only plain pointers and PODs cross from the dispatcher into the kernels.
#pragma once

namespace fastdw::cpu {

enum IsaLevel : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

int isa_level();  // best supported, capped by FASTDW_CPU_CAPABILITY or set_cpu_capability()
const char* cpu_capability();
bool set_cpu_capability(const char* name);  // "default", "avx2", "avx512"; false if unsupported

}  // namespace fastdw::cpu

// FASTDW_ISA_SELECT(Type, name): declares `Type name` defined in each ISA namespace
// (fastdw::cpu::DEFAULT::name, ::AVX2::name, ::AVX512::name) and defines `const Type& name##_for_cpu()`.
#ifdef FASTDW_HAVE_AVX2
#define FASTDW_ISA_DECL_AVX2(Type, name) namespace AVX2 { extern const Type name; }
#define FASTDW_ISA_CASE_AVX2(name) case kAvx2: return AVX2::name;
#else
#define FASTDW_ISA_DECL_AVX2(Type, name)
#define FASTDW_ISA_CASE_AVX2(name)
#endif
#ifdef FASTDW_HAVE_AVX512
#define FASTDW_ISA_DECL_AVX512(Type, name) namespace AVX512 { extern const Type name; }
#define FASTDW_ISA_CASE_AVX512(name) case kAvx512: return AVX512::name;
#else
#define FASTDW_ISA_DECL_AVX512(Type, name)
#define FASTDW_ISA_CASE_AVX512(name)
#endif
#define FASTDW_ISA_SELECT(Type, name)                \
  namespace DEFAULT { extern const Type name; }      \
  FASTDW_ISA_DECL_AVX2(Type, name)                   \
  FASTDW_ISA_DECL_AVX512(Type, name)                 \
  inline const Type& name##_for_cpu() {              \
    switch (isa_level()) {                           \
      FASTDW_ISA_CASE_AVX512(name)                   \
      FASTDW_ISA_CASE_AVX2(name)                     \
      default: return DEFAULT::name;                 \
    }                                                \
  }

// In a csrc/cpu/isa/<isa>.cpp: defines the table `name` of this ISA (CPU_CAPABILITY namespace).
#define FASTDW_STR2(x) #x
#define FASTDW_STR(x) FASTDW_STR2(x)
#define FASTDW_ISA_DEFINE(Type, name, ...)          \
  namespace fastdw::cpu::CPU_CAPABILITY {            \
  extern const Type name;                            \
  const Type name{__VA_ARGS__};                      \
  }
