#include "quant/checks.h"

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
  STD_TORCH_CHECK(bias.has_value() == expert_offsets.has_value(), op,
                  ": bias and expert_offsets go together (bias [E, 2I] per expert, expert_offsets [E + 1] its rows), "
                  "got ", bias.has_value() ? "bias without expert_offsets" : "expert_offsets without bias");
  if (!bias.has_value()) return spec;
  const Tensor& b = *bias;
  const Tensor& off = *expert_offsets;
  STD_TORCH_CHECK(off.dim() == 1 && off.size(0) >= 1, op, ": expert_offsets must be 1-D [E + 1], got shape ",
                  shape_of(off));
  STD_TORCH_CHECK(off.scalar_type() == kLong, op, ": expert_offsets must be int64, got ", off.scalar_type());
  check_contiguous(op, "expert_offsets", off);
  STD_TORCH_CHECK(same_device(off, x), op, ": expert_offsets must be on ", device_of(x), " (as x), got ",
                  device_of(off));
  const int64_t E = off.size(0) - 1;
  STD_TORCH_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == 2 * s.cols, op, ": bias must be [E, 2I] = [", E,
                  ", ", 2 * s.cols, "] (E from expert_offsets, 2I from x), got shape ", shape_of(b));
  STD_TORCH_CHECK(b.scalar_type() == kFloat, op, ": bias must be float32, got ", b.scalar_type());
  check_contiguous(op, "bias", b);
  STD_TORCH_CHECK(same_device(b, x), op, ": bias must be on ", device_of(x), " (as x), got ", device_of(b));
  spec.bias = cptr<float>(b);
  spec.expert_offsets = cptr<int64_t>(off);
  spec.num_experts = E;
  return spec;
}

}  // namespace moe_kernels
