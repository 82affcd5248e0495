// Public C++ API of the router op. Header-only: the call goes through the PyTorch dispatcher (CUDA or
// CPU by the scores' device, as torch.ops.moe_kernels.moe_fused_gate) and is compiled into your
// extension against your torch; _C.so itself exports no C++ symbol (it is built on torch's stable
// ABI). `import moe_kernels` (or load _C.so) before the first call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>

namespace moe_kernels {

// -> (topk_weights [T, topk + n_shared] float32, topk_ids [T, topk + n_shared] int32)
inline std::tuple<at::Tensor, at::Tensor> moe_fused_gate(const at::Tensor& scores,
                                                         const std::optional<at::Tensor>& bias,
                                                         int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                                         const std::string& scoring_func = "sigmoid",
                                                         bool renormalize = true, int64_t num_fused_shared_experts = 0,
                                                         double routed_scaling_factor = 1.0,
                                                         bool apply_routed_scaling_factor_on_output = false) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::moe_fused_gate", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(
                               const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                               c10::string_view, bool, int64_t, double, bool)>();
  return handle.call(scores, bias, num_expert_group, topk_group, topk, scoring_func, renormalize,
                     num_fused_shared_experts, routed_scaling_factor, apply_routed_scaling_factor_on_output);
}

}  // namespace moe_kernels
