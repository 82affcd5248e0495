// Launcher of the fused router kernel. Plain C++: no torch types.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"

namespace moe_kernels {

// The largest expert count moe_fused_gate supports (scores of a token are staged in shared memory).
constexpr int kMaxGateExperts = 1024;

struct FusedGateArgs {
  const void* scores;            // [T, E], `dtype`
  DType dtype;                   // float32, float16 or bfloat16
  const void* bias;              // [E] or nullptr
  bool bias_fp32;                // bias is float32 (else `dtype`)
  int64_t num_tokens;
  int num_experts;
  int num_groups;
  int topk_group;
  int topk;
  bool softmax;                  // else sigmoid
  bool renormalize;
  int num_shared;                // fused shared-expert slots after the routed ones
  float shared_weight;           // weight of each shared slot
  float output_scale;            // routed weights are multiplied by this (rsf or 1)
  float* topk_weights;           // [T, topk + num_shared]
  int32_t* topk_ids;             // [T, topk + num_shared]
};
cudaError_t launch_fused_gate(const FusedGateArgs& args, cudaStream_t stream);

}  // namespace moe_kernels
