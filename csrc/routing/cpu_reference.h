// CPU implementation of moe_fused_gate: plain loops, the specification of the CUDA kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace moe_kernels::cpu {

std::tuple<at::Tensor, at::Tensor> moe_fused_gate(const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                                                  int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                                  c10::string_view scoring_func, bool renormalize,
                                                  int64_t num_fused_shared_experts, double routed_scaling_factor,
                                                  bool apply_routed_scaling_factor_on_output);

}  // namespace moe_kernels::cpu
