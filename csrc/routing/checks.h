// Argument checks of moe_fused_gate, shared by the CUDA and CPU implementations.
#pragma once

#include "common/stable_glue.h"

#include <optional>
#include <string_view>

namespace moe_kernels {

struct GateConfig {
  bool softmax;
  float shared_weight;  // weight of each fused shared-expert slot
  float output_scale;   // factor on the routed weights
};

GateConfig check_fused_gate_args(const Tensor& scores, const std::optional<Tensor>& bias,
                                 int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                 std::string_view scoring_func, int64_t num_fused_shared_experts,
                                 double routed_scaling_factor, bool apply_routed_scaling_factor_on_output);

}  // namespace moe_kernels
