// Kernels compiled for the avx2 instruction set (flags in setup.py: ISA_FLAGS["avx2"]).
#include "cpu/dwconv_bn_act_impl.h"

FASTDW_DEFINE_KERNEL_TABLE()
