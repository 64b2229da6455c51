// Every op's CPU kernels compiled for the avx2 instruction set (flags: setup.py ISA_FLAGS["avx2"]).
#include "cpu/dwconv_bn_act_impl.h"

FASTDW_DEFINE_DWCONV_BN_ACT_TABLE()

#include "cpu/se_scale_impl.h"

FASTDW_DEFINE_SE_SCALE_TABLE()

#include "cpu/channel_shuffle_impl.h"

FASTDW_DEFINE_CHANNEL_SHUFFLE_TABLE()
