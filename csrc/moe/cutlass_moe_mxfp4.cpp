// cutlass_moe_mxfp4: the expert computation of an MoE layer with MXFP4 weights (gpt-oss,
// DeepSeek-V4 checkpoints as stored), W4A16 (bf16 activations) or W4A8 (activations quantized to
// float8_e4m3fn per token). The composition: moe/w4_layer.h (registered for CUDA and CPU).
#include "moe/w4_layer.h"

namespace moe_kernels {
namespace {

Tensor cutlass_moe_mxfp4(const Tensor& hidden_states, const Tensor& w1, const Tensor& w2, const Tensor& topk_weights,
                         const Tensor& topk_ids, const Tensor& w1_scale, const Tensor& w2_scale,
                         const std::string& activation, bool gate_up_interleaved, double swiglu_alpha,
                         double swiglu_limit, const std::optional<Tensor>& w1_bias,
                         const std::optional<Tensor>& w2_bias, std::optional<ScalarType> a_dtype,
                         const std::optional<Tensor>& expert_map, int64_t num_local_experts) {
  const char* op = "cutlass_moe_mxfp4";
  const ScalarType act_dtype = a_dtype.value_or(kBFloat16);
  STD_TORCH_CHECK(act_dtype == kBFloat16 || act_dtype == kFloat8, op,
                  ": a_dtype must be bfloat16 (W4A16) or float8_e4m3fn (W4A8), got ", dtype_name(act_dtype));
  const w4layer::LayerFormat format{op, w4::WeightFormat::kMxfp4, 32, kByte, "uint8 (E8M0 exponents)"};
  const std::optional<Tensor> no_scale;
  return w4layer::run(format, {hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, no_scale, no_scale,
                               activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias,
                               act_dtype == kFloat8, expert_map, num_local_experts});
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) { m.impl("cutlass_moe_mxfp4", TORCH_BOX(&cutlass_moe_mxfp4)); }
STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) { m.impl("cutlass_moe_mxfp4", TORCH_BOX(&cutlass_moe_mxfp4)); }

}  // namespace moe_kernels
