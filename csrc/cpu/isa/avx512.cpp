// Kernels compiled for the avx512 instruction set (flags in setup.py: ISA_FLAGS["avx512"]).
#include "cpu/dwconv_bn_act_impl.h"

FASTDW_DEFINE_KERNEL_TABLE()
