#include "routing/checks.h"

#include <string>

#include "common/limits.h"
#include "routing/launchers.h"

namespace moe_kernels {

GateConfig check_fused_gate_args(const Tensor& scores, const std::optional<Tensor>& bias,
                                 int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                 std::string_view scoring_func, int64_t num_fused_shared_experts,
                                 double routed_scaling_factor, bool apply_routed_scaling_factor_on_output) {
  const char* op = "moe_fused_gate";
  STD_TORCH_CHECK(scores.dim() == 2, op, ": scores must be 2-D [T, E], got shape ", shape_of(scores));
  const auto dt = scores.scalar_type();
  STD_TORCH_CHECK(dt == kFloat || dt == kHalf || dt == kBFloat16, op,
              ": scores must be float32, float16 or bfloat16, got ", dt);
  STD_TORCH_CHECK(scores.is_contiguous(), op, ": scores must be contiguous");
  const int64_t E = scores.size(1);
  STD_TORCH_CHECK(E >= 1 && E <= kMaxGateExperts, op, ": scores must have 1 to ", kMaxGateExperts,
              " experts (columns), got ", E);
  if (bias) {
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E, op, ": bias must have shape [", E, "], got ", shape_of(*bias));
    STD_TORCH_CHECK(bias->scalar_type() == kFloat || bias->scalar_type() == dt, op, ": bias must be float32 or ", dt,
                " (as scores), got ", bias->scalar_type());
    STD_TORCH_CHECK(bias->is_contiguous(), op, ": bias must be contiguous");
    STD_TORCH_CHECK(same_device(*bias, scores), op, ": bias must be on ", device_of(scores), ", got ",
                    device_of(*bias));
  }
  STD_TORCH_CHECK(num_expert_group >= 1 && E % num_expert_group == 0, op, ": num_expert_group must divide the ", E,
              " experts, got ", num_expert_group);
  STD_TORCH_CHECK(topk_group >= 1 && topk_group <= num_expert_group, op, ": topk_group must be in [1, num_expert_group=",
              num_expert_group, "], got ", topk_group);
  STD_TORCH_CHECK(!bias || topk_group == num_expert_group || E / num_expert_group >= 2, op,
              ": with a bias, groups are scored by their top-2 experts, so groups need >= 2 experts, got ",
              E / num_expert_group);
  const int64_t available = topk_group * (E / num_expert_group);
  STD_TORCH_CHECK(topk >= 1 && topk <= available, op, ": topk must be in [1, ", available,
              "] (the experts in topk_group=", topk_group, " kept groups), got ", topk);
  STD_TORCH_CHECK(num_fused_shared_experts >= 0, op, ": num_fused_shared_experts must be >= 0, got ",
              num_fused_shared_experts);
  STD_TORCH_CHECK(topk + num_fused_shared_experts <= kMaxTopK, op, ": topk + num_fused_shared_experts must be <= ",
              kMaxTopK, ", got ", topk + num_fused_shared_experts);
  STD_TORCH_CHECK(scoring_func == "sigmoid" || scoring_func == "softmax", op,
              ": scoring_func must be \"sigmoid\" or \"softmax\", got \"", std::string(scoring_func), "\"");
  STD_TORCH_CHECK(routed_scaling_factor > 0, op, ": routed_scaling_factor must be positive, got ", routed_scaling_factor);
  // The fused layer computes sum_k w_k * routed_k + sum_j w_shared * shared_j. The unfused layer is
  // rsf * sum(routed) + shared: with rsf applied to the routed weights here, the shared slots
  // weigh 1; when the caller multiplies the whole output by rsf, they weigh 1/rsf.
  const float rsf = static_cast<float>(routed_scaling_factor);
  return GateConfig{scoring_func == "softmax", apply_routed_scaling_factor_on_output ? 1.f : 1.f / rsf,
                    apply_routed_scaling_factor_on_output ? rsf : 1.f};
}

}  // namespace moe_kernels
