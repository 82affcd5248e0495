// Torch glue of moe_fused_gate: checks, allocation, launch on the current stream, registration
// (stable ABI, see common/stable_glue.h).
#include "common/stable_glue.h"
#include "routing/checks.h"
#include "routing/cpu_reference.h"
#include "routing/launchers.h"

namespace moe_kernels {
namespace cuda {

std::tuple<Tensor, Tensor> moe_fused_gate(const Tensor& scores, const std::optional<Tensor>& bias,
                                          int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                          const std::string& scoring_func, bool renormalize,
                                          int64_t num_fused_shared_experts, double routed_scaling_factor,
                                          bool apply_routed_scaling_factor_on_output) {
  const GateConfig cfg =
      check_fused_gate_args(scores, bias, num_expert_group, topk_group, topk, scoring_func, num_fused_shared_experts,
                            routed_scaling_factor, apply_routed_scaling_factor_on_output);
  const CudaDeviceScope scope(scores);
  const int64_t T = scores.size(0);
  const int64_t width = topk + num_fused_shared_experts;
  Tensor weights = empty_on({T, width}, kFloat, scores);
  Tensor ids = empty_on({T, width}, kInt, scores);
  FusedGateArgs a{scores.const_data_ptr(),
                  to_dtype(scores.scalar_type()),
                  bias ? bias->const_data_ptr() : nullptr,
                  bias ? bias->scalar_type() == kFloat : true,
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
                  weights.mutable_data_ptr<float>(),
                  ids.mutable_data_ptr<int32_t>()};
  check_launch(launch_fused_gate(a, current_stream(scores)), "moe_fused_gate");
  return {weights, ids};
}

}  // namespace cuda

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) { m.impl("moe_fused_gate", TORCH_BOX(&cuda::moe_fused_gate)); }
STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) { m.impl("moe_fused_gate", TORCH_BOX(&cpu::moe_fused_gate)); }

}  // namespace moe_kernels
