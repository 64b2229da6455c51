// Index maps of fastdw::channel_shuffle and concat_shuffle, shared by csrc/cpu and csrc/cuda
// (see hd.h) and by dwconv_bn_act's shuffled input read.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace fastdw {

struct ShuffleShape {
  int64_t N, C, inner;  // channels of the output; positions per (n, c)
  int64_t groups;
  bool cl;  // [N][inner][C] (channels last), else [N][C][inner]; input and output dense alike
};

// Two inputs of N x C x H x W with arbitrary strides (elements) and a dense output with 2C channels.
struct PairShape {
  int64_t N, C, H, W;    // C: channels of each input
  bool cl;               // output (and the dense tensors of the backward) [N][H][W][2C], else [N][2C][H][W]
  int64_t sa[4], sb[4];  // strides of a and b over (N, C, H, W)
};

// channel_shuffle(x, g)[:, j] = x[:, shuffle_src(j, C, g)]: output channel j = k * g + i comes from
// input channel i * (C / g) + k. The inverse permutation is shuffle_src(., C, C / g).
FASTDW_HD inline int64_t shuffle_src(int64_t j, int64_t C, int64_t g) { return (j % g) * (C / g) + j / g; }

// concat_shuffle: output channel j comes from channel j / 2 of a (j even) or b (j odd).
FASTDW_HD inline int64_t interleave_src(int64_t j, bool& from_b) {
  from_b = j % 2 != 0;
  return j / 2;
}

}  // namespace fastdw
