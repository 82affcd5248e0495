// Torch glue of moe_fused_gate: checks, allocation, launch on the current stream, registration.
#include <torch/library.h>

#include "common/torch_glue.h"
#include "moe_kernels/routing.h"
#include "routing/checks.h"
#include "routing/cpu_reference.h"
#include "routing/launchers.h"

namespace moe_kernels {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> moe_fused_gate(const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                                                  int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                                  c10::string_view scoring_func, bool renormalize,
                                                  int64_t num_fused_shared_experts, double routed_scaling_factor,
                                                  bool apply_routed_scaling_factor_on_output) {
  const GateConfig cfg =
      check_fused_gate_args(scores, bias, num_expert_group, topk_group, topk, scoring_func, num_fused_shared_experts,
                            routed_scaling_factor, apply_routed_scaling_factor_on_output);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t T = scores.size(0);
  const int64_t width = topk + num_fused_shared_experts;
  auto weights = at::empty({T, width}, scores.options().dtype(at::kFloat));
  auto ids = at::empty({T, width}, scores.options().dtype(at::kInt));
  FusedGateArgs a{scores.data_ptr(),
                  to_dtype(scores.scalar_type()),
                  bias ? bias->data_ptr() : nullptr,
                  bias ? bias->scalar_type() == at::kFloat : true,
                  T,
                  static_cast<int>(scores.size(1)),
                  static_cast<int>(num_expert_group),
                  static_cast<int>(topk_group),
                  static_cast<int>(topk),
                  cfg.softmax,
                  renormalize,
                  static_cast<int>(num_fused_shared_experts),
                  cfg.shared_weight,
                  cfg.output_scale,
                  weights.data_ptr<float>(),
                  ids.data_ptr<int32_t>()};
  check_launch(launch_fused_gate(a, current_stream()), "moe_fused_gate");
  return {weights, ids};
}

}  // namespace cuda

std::tuple<at::Tensor, at::Tensor> moe_fused_gate(const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                                                  int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                                  const std::string& scoring_func, bool renormalize,
                                                  int64_t num_fused_shared_experts, double routed_scaling_factor,
                                                  bool apply_routed_scaling_factor_on_output) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::moe_fused_gate", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(
                               const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                               c10::string_view, bool, int64_t, double, bool)>();
  return handle.call(scores, bias, num_expert_group, topk_group, topk, scoring_func, renormalize,
                     num_fused_shared_experts, routed_scaling_factor, apply_routed_scaling_factor_on_output);
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) { m.impl("moe_fused_gate", &cuda::moe_fused_gate); }
TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) { m.impl("moe_fused_gate", &cpu::moe_fused_gate); }

}  // namespace moe_kernels
