// The local expert of a row of the permuted layout, from expert_offsets [E + 1] (rows of expert e
// are offsets[e] .. offsets[e+1]-1): a binary search, shared by the CUDA kernels that add a
// per-expert bias (the gated activation, the weighted gather) and their CPU references.
// Compiles as CUDA (host and device) and as plain C++.
#pragma once

#include <cstdint>

#include "common/portable_math.h"

namespace moe_kernels {

// The e with offsets[e] <= row < offsets[e+1] (the last such e where empty experts share an
// offset), or -1 when row >= offsets[E] (rows no expert owns: the tail of an expert_map layout).
MOE_HOST_DEVICE int64_t row_expert(const int64_t* offsets, int64_t num_experts, int64_t row) {
  if (num_experts <= 0 || row < offsets[0] || row >= offsets[num_experts]) return -1;
  int64_t lo = 0;            // offsets[lo] <= row
  int64_t hi = num_experts;  // offsets[hi] > row
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace moe_kernels
