// Kernels compiled for the default instruction set (flags in setup.py: ISA_FLAGS["default"]).
#include "cpu/dwconv_bn_act_impl.h"

FASTDW_DEFINE_KERNEL_TABLE()
