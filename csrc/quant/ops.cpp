// Torch glue of the quant ops: checks, allocation, the launch on the current stream, and the
// registration of the CUDA and CPU implementations. The public C++ API (include/moe_kernels/
// quant.h) calls through the dispatcher.
#include <torch/library.h>

#include "common/torch_glue.h"
#include "moe_kernels/quant.h"
#include "quant/checks.h"
#include "quant/cpu_reference.h"
#include "quant/launchers.h"

namespace moe_kernels {
namespace cuda {
namespace {

using Launcher = cudaError_t (*)(const Fp8QuantArgs&, cudaStream_t);

// Allocates q and the scales of the mode, fills the launcher's arguments and launches.
std::tuple<at::Tensor, at::Tensor> launch(const char* op, Launcher launcher, const at::Tensor& x, const QuantShape& s,
                                          QuantScaleMode mode, const std::optional<at::Tensor>& scale,
                                          int64_t group_size = 0, bool column_major_scales = false,
                                          const GatedActSpec& act = {}) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  auto q = at::empty({s.rows, s.cols}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale_out;
  switch (mode) {
    case QuantScaleMode::kDynamicPerToken: scale_out = at::empty({s.rows, 1}, f32); break;
    case QuantScaleMode::kDynamicPerGroup: {
      const int64_t groups = s.cols / group_size;
      // Column-major: the [groups, rows] buffer seen as [rows, groups] with strides (1, rows).
      scale_out = column_major_scales ? at::empty({groups, s.rows}, f32).t() : at::empty({s.rows, groups}, f32);
      break;
    }
    default: scale_out = at::empty({1}, f32);
  }
  Fp8QuantArgs a{};
  a.x = x.data_ptr();
  a.dtype = to_dtype(x.scalar_type());
  a.rows = s.rows;
  a.cols = s.cols;
  a.mode = mode;
  a.static_scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  a.scale = scale_out.data_ptr<float>();
  a.q = static_cast<uint8_t*>(q.data_ptr());
  a.group_size = group_size;
  a.scales_column_major = column_major_scales;
  a.act = act;
  check_launch(launcher(a, current_stream()), op);
  return {q, scale_out};
}

// A given scale means static per-tensor quantization; per_token only selects the granularity of
// a scale computed here (as vLLM's use_per_token_if_dynamic).
QuantScaleMode tensor_or_token_mode(const std::optional<at::Tensor>& scale, bool per_token) {
  return scale.has_value() ? QuantScaleMode::kStaticPerTensor
         : per_token       ? QuantScaleMode::kDynamicPerToken
                           : QuantScaleMode::kDynamicPerTensor;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> scaled_fp8_quant(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                    bool per_token) {
  const char* op = "scaled_fp8_quant";
  const QuantShape s = check_quant_args(op, x, scale, /*silu_and_mul=*/false);
  return launch(op, launch_scaled_fp8_quant, x, s, tensor_or_token_mode(scale, per_token), scale);
}

std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8(const at::Tensor& x, int64_t group_size,
                                                             bool column_major_scales) {
  const char* op = "per_token_group_quant_fp8";
  const QuantShape s = check_quant_args(op, x, std::nullopt, /*silu_and_mul=*/false);
  check_group_size(op, s, group_size, /*silu_and_mul=*/false);
  return launch(op, launch_scaled_fp8_quant, x, s, QuantScaleMode::kDynamicPerGroup, std::nullopt, group_size,
                column_major_scales);
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x,
                                                          const std::optional<at::Tensor>& scale, bool per_token,
                                                          int64_t group_size, c10::string_view activation,
                                                          bool gate_up_interleaved, double swiglu_alpha,
                                                          double swiglu_limit, const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& expert_offsets) {
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

// Public API: through the dispatcher, so the device of the inputs picks the implementation.
std::tuple<at::Tensor, at::Tensor> scaled_fp8_quant(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                    bool per_token) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::scaled_fp8_quant", "")
                           .typed<decltype(scaled_fp8_quant)>();
  return handle.call(x, scale, per_token);
}

std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8(const at::Tensor& x, int64_t group_size,
                                                             bool column_major_scales) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::per_token_group_quant_fp8", "")
                           .typed<decltype(per_token_group_quant_fp8)>();
  return handle.call(x, group_size, column_major_scales);
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x,
                                                          const std::optional<at::Tensor>& scale, bool per_token,
                                                          int64_t group_size, c10::string_view activation,
                                                          bool gate_up_interleaved, double swiglu_alpha,
                                                          double swiglu_limit, const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& expert_offsets) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::silu_and_mul_quant_fp8", "")
                           .typed<decltype(silu_and_mul_quant_fp8)>();
  return handle.call(x, scale, per_token, group_size, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                     bias, expert_offsets);
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("scaled_fp8_quant", &cuda::scaled_fp8_quant);
  m.impl("per_token_group_quant_fp8", &cuda::per_token_group_quant_fp8);
  m.impl("silu_and_mul_quant_fp8", &cuda::silu_and_mul_quant_fp8);
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("scaled_fp8_quant", &cpu::scaled_fp8_quant);
  m.impl("per_token_group_quant_fp8", &cpu::per_token_group_quant_fp8);
  m.impl("silu_and_mul_quant_fp8", &cpu::silu_and_mul_quant_fp8);
}

}  // namespace moe_kernels
