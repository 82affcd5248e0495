// Limits shared by kernels and their argument checks.
#pragma once

namespace moe_kernels {

// The K choices of one token are staged in shared memory by the permute and gather kernels.
constexpr int kMaxTopK = 64;

// The single-block routing sort keeps per-warp counters for every local expert in shared memory.
constexpr int kMaxSortExperts = 1024;

}  // namespace moe_kernels
