// cutlass_moe_w4a8: the expert computation of an MoE layer with signed INT4 weights (one fp32 scale
// per 128 along K) and float8_e4m3fn activations (DeepSeek-R1 W4AFP8): static per-tensor
// activation scales (a1_scale, a2_scale) or dynamic per-token ones. The composition:
// moe/w4_layer.h.
#include "moe/w4_layer.h"

namespace moe_kernels {
namespace {

Tensor cutlass_moe_w4a8(const Tensor& hidden_states, const Tensor& w1, const Tensor& w2, const Tensor& topk_weights,
                        const Tensor& topk_ids, const Tensor& w1_scale, const Tensor& w2_scale,
                        const std::optional<Tensor>& a1_scale, const std::optional<Tensor>& a2_scale,
                        const std::string& activation, bool gate_up_interleaved, double swiglu_alpha,
                        double swiglu_limit, const std::optional<Tensor>& w1_bias,
                        const std::optional<Tensor>& w2_bias, const std::optional<Tensor>& expert_map,
                        int64_t num_local_experts) {
  const w4layer::LayerFormat format{"cutlass_moe_w4a8", w4::WeightFormat::kInt4, 128, kFloat, "float32"};
  return w4layer::run(format, {hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, a1_scale, a2_scale,
                               activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias,
                               /*fp8=*/true, expert_map, num_local_experts});
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) { m.impl("cutlass_moe_w4a8", TORCH_BOX(&cutlass_moe_w4a8)); }
STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) { m.impl("cutlass_moe_w4a8", TORCH_BOX(&cutlass_moe_w4a8)); }

}  // namespace moe_kernels
