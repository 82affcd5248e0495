// CPU implementation of moe_fused_gate: plain loops, the specification of the CUDA kernel.
#pragma once

#include "common/stable_glue.h"

#include <optional>
#include <string>
#include <tuple>

namespace moe_kernels::cpu {

std::tuple<Tensor, Tensor> moe_fused_gate(const Tensor& scores, const std::optional<Tensor>& bias,
                                          int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                          const std::string& scoring_func, bool renormalize,
                                          int64_t num_fused_shared_experts, double routed_scaling_factor,
                                          bool apply_routed_scaling_factor_on_output);

}  // namespace moe_kernels::cpu
