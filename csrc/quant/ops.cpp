// Torch glue of the quant ops: checks, allocation, the launch on the current stream, and the
// registration of the CUDA and CPU implementations (stable ABI, see common/stable_glue.h).

#include "common/stable_glue.h"
#include "quant/checks.h"
#include "quant/glue.h"
#include "quant/cpu_reference.h"
#include "quant/launchers.h"

namespace moe_kernels {
namespace cuda {
namespace {

using Launcher = cudaError_t (*)(const Fp8QuantArgs&, cudaStream_t);

// Allocates q and the scales of the mode, fills the launcher's arguments and launches.
std::tuple<Tensor, Tensor> launch(const char* op, Launcher launcher, const Tensor& x, const QuantShape& s,
                                          QuantScaleMode mode, const std::optional<Tensor>& scale,
                                          int64_t group_size = 0, bool column_major_scales = false,
                                          const GatedActSpec& act = {}) {
  const CudaDeviceScope scope(x);
  Tensor q = empty_on({s.rows, s.cols}, kFloat8, x);
  Tensor scale_out;
  switch (mode) {
    case QuantScaleMode::kDynamicPerToken: scale_out = empty_on({s.rows, int64_t{1}}, kFloat, x); break;
    case QuantScaleMode::kDynamicPerGroup:
      scale_out = empty_group_scales(s.rows, s.cols / group_size, column_major_scales, x);
      break;
    default: scale_out = empty_on({int64_t{1}}, kFloat, x);
  }
  Fp8QuantArgs a{};
  a.x = x.data_ptr();
  a.dtype = to_dtype(x.scalar_type());
  a.rows = s.rows;
  a.cols = s.cols;
  a.mode = mode;
  a.static_scale = scale.has_value() ? ptr<float>(*scale) : nullptr;
  a.scale = ptr<float>(scale_out);
  a.q = static_cast<uint8_t*>(q.data_ptr());
  a.group_size = group_size;
  a.scales_column_major = column_major_scales;
  a.act = act;
  check_launch(launcher(a, current_stream(x)), op);
  return {q, scale_out};
}

// A given scale means static per-tensor quantization; per_token only selects the granularity of
// a scale computed here (as vLLM's use_per_token_if_dynamic).
QuantScaleMode tensor_or_token_mode(const std::optional<Tensor>& scale, bool per_token) {
  return scale.has_value() ? QuantScaleMode::kStaticPerTensor
         : per_token       ? QuantScaleMode::kDynamicPerToken
                           : QuantScaleMode::kDynamicPerTensor;
}

}  // namespace

std::tuple<Tensor, Tensor> scaled_fp8_quant(const Tensor& x, const std::optional<Tensor>& scale,
                                                    bool per_token) {
  const char* op = "scaled_fp8_quant";
  const QuantShape s = check_quant_args(op, x, scale, /*silu_and_mul=*/false);
  return launch(op, launch_scaled_fp8_quant, x, s, tensor_or_token_mode(scale, per_token), scale);
}

std::tuple<Tensor, Tensor> per_token_group_quant_fp8(const Tensor& x, int64_t group_size,
                                                             bool column_major_scales) {
  const char* op = "per_token_group_quant_fp8";
  const QuantShape s = check_quant_args(op, x, std::nullopt, /*silu_and_mul=*/false);
  check_group_size(op, s, group_size, /*silu_and_mul=*/false);
  return launch(op, launch_scaled_fp8_quant, x, s, QuantScaleMode::kDynamicPerGroup, std::nullopt, group_size,
                column_major_scales);
}

std::tuple<Tensor, Tensor> silu_and_mul_quant_fp8(const Tensor& x, const std::optional<Tensor>& scale, bool per_token,
                                                  int64_t group_size, const std::string& activation,
                                                  bool gate_up_interleaved, double swiglu_alpha, double swiglu_limit,
                                                  const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& expert_offsets) {
  const char* op = "silu_and_mul_quant_fp8";
  const QuantShape s = check_quant_args(op, x, scale, /*silu_and_mul=*/true);
  check_silu_and_mul_mode(scale, per_token, group_size);
  const GatedActSpec act = check_gated_act_args(op, s, x, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                                                bias, expert_offsets);
  if (group_size > 0) {
    check_group_size(op, s, group_size, /*silu_and_mul=*/true);
    return launch(op, launch_silu_and_mul_quant_fp8, x, s, QuantScaleMode::kDynamicPerGroup, std::nullopt,
                  group_size, false, act);
  }
  return launch(op, launch_silu_and_mul_quant_fp8, x, s, tensor_or_token_mode(scale, per_token), scale, 0, false, act);
}

}  // namespace cuda

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("scaled_fp8_quant", TORCH_BOX(&cuda::scaled_fp8_quant));
  m.impl("per_token_group_quant_fp8", TORCH_BOX(&cuda::per_token_group_quant_fp8));
  m.impl("silu_and_mul_quant_fp8", TORCH_BOX(&cuda::silu_and_mul_quant_fp8));
}

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("scaled_fp8_quant", TORCH_BOX(&cpu::scaled_fp8_quant));
  m.impl("per_token_group_quant_fp8", TORCH_BOX(&cpu::per_token_group_quant_fp8));
  m.impl("silu_and_mul_quant_fp8", TORCH_BOX(&cpu::silu_and_mul_quant_fp8));
}

}  // namespace moe_kernels
