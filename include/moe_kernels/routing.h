// Public C++ API of the router op (through the dispatcher: CUDA or CPU by the scores' device).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace moe_kernels {

// -> (topk_weights [T, topk + n_shared] float32, topk_ids [T, topk + n_shared] int32)
std::tuple<at::Tensor, at::Tensor> moe_fused_gate(const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                                                  int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                                  const std::string& scoring_func = "sigmoid", bool renormalize = true,
                                                  int64_t num_fused_shared_experts = 0,
                                                  double routed_scaling_factor = 1.0,
                                                  bool apply_routed_scaling_factor_on_output = false);

}  // namespace moe_kernels
