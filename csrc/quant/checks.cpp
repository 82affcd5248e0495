#include "quant/checks.h"

#include "common/expert_bias_checks.h"

namespace moe_kernels {

QuantShape check_quant_args(const char* op, const Tensor& x, const std::optional<Tensor>& scale,
                            bool silu_and_mul) {
  STD_TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D ", silu_and_mul ? "[M, 2I]" : "[M, K]", ", got shape ", shape_of(x));
  const auto dt = x.scalar_type();
  STD_TORCH_CHECK(dt == kBFloat16 || dt == kHalf || dt == kFloat, op,
              ": x must be bfloat16, float16 or float32, got ", dt);
  STD_TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  if (silu_and_mul) {
    STD_TORCH_CHECK(x.size(1) % 2 == 0, op, ": x must have an even number of columns (gate and up halves, [M, 2I]), got ",
                x.size(1));
  }
  if (scale.has_value()) {
    const Tensor& s = *scale;
    STD_TORCH_CHECK(s.scalar_type() == kFloat, op, ": scale must be float32, got ", s.scalar_type());
    STD_TORCH_CHECK(s.numel() == 1 && s.dim() <= 1, op,
                ": scale must have shape [1] (a static per-tensor scale), got shape ", shape_of(s));
    STD_TORCH_CHECK(same_device(s, x), op, ": scale must be on ", device_of(x), " (as x), got ", device_of(s));
  }
  return QuantShape{x.size(0), silu_and_mul ? x.size(1) / 2 : x.size(1)};
}

int64_t check_group_size(const char* op, const QuantShape& s, int64_t group_size, bool silu_and_mul) {
  STD_TORCH_CHECK(group_size > 0, op, ": group_size must be positive, got ", group_size);
  STD_TORCH_CHECK(s.cols % group_size == 0, op, ": x's ",
              silu_and_mul ? "I (half its columns, the columns of q)" : "K (its columns)", " must be a multiple of ",
              "group_size=", group_size, ", got ", silu_and_mul ? "I=" : "K=", s.cols);
  return s.cols / group_size;
}

void check_silu_and_mul_mode(const std::optional<Tensor>& scale, bool per_token, int64_t group_size) {
  const char* op = "silu_and_mul_quant_fp8";
  STD_TORCH_CHECK(group_size >= 0, op, ": group_size must be >= 0 (0: no groups), got ", group_size);
  if (group_size == 0) return;
  STD_TORCH_CHECK(!scale.has_value(), op,
              ": scale must be None with group_size > 0 (per-group scales are computed here), got a tensor");
  STD_TORCH_CHECK(!per_token, op, ": per_token must be False with group_size > 0 (one scale per group of ",
              group_size, " columns), got True");
}

GatedActivation parse_activation(const char* op, std::string_view name) {
  if (name == "silu") return GatedActivation::kSilu;
  if (name == "gelu") return GatedActivation::kGelu;
  if (name == "swigluoai") return GatedActivation::kSwigluOai;
  STD_TORCH_CHECK(false, op, ": activation must be \"silu\", \"gelu\" or \"swigluoai\", got \"", name, "\"");
  return GatedActivation::kSilu;  // not reached
}

GatedActSpec check_gated_act_args(const char* op, const QuantShape& s, const Tensor& x, std::string_view activation,
                                  bool gate_up_interleaved, double swiglu_alpha, double swiglu_limit,
                                  const std::optional<Tensor>& bias, const std::optional<Tensor>& expert_offsets) {
  GatedActSpec spec;
  spec.activation = parse_activation(op, activation);
  spec.interleaved = gate_up_interleaved;
  spec.swiglu_alpha = static_cast<float>(swiglu_alpha);
  spec.swiglu_limit = static_cast<float>(swiglu_limit);
  spec.num_experts = check_expert_bias(op, bias, expert_offsets, x, "x", 2 * s.cols, "[E, 2I]", "2I from x");
  if (!bias.has_value()) return spec;
  spec.bias = cptr<float>(*bias);
  spec.expert_offsets = cptr<int64_t>(*expert_offsets);
  return spec;
}

}  // namespace moe_kernels
