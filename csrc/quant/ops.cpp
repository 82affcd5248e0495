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

std::tuple<at::Tensor, at::Tensor> quantize(const char* op, Launcher launch, bool silu_and_mul, const at::Tensor& x,
                                            const std::optional<at::Tensor>& scale, bool per_token) {
  const QuantShape s = check_quant_args(op, x, scale, silu_and_mul);
  const c10::cuda::CUDAGuard guard(x.device());
  // A given scale means static per-tensor quantization; per_token only selects the granularity
  // of a scale computed here (as vLLM's use_per_token_if_dynamic).
  const QuantScaleMode mode = scale.has_value() ? QuantScaleMode::kStaticPerTensor
                              : per_token       ? QuantScaleMode::kDynamicPerToken
                                                : QuantScaleMode::kDynamicPerTensor;
  auto q = at::empty({s.rows, s.cols}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scale_out = mode == QuantScaleMode::kDynamicPerToken ? at::empty({s.rows, 1}, x.options().dtype(at::kFloat))
                                                            : at::empty({1}, x.options().dtype(at::kFloat));
  Fp8QuantArgs a{};
  a.x = x.data_ptr();
  a.dtype = to_dtype(x.scalar_type());
  a.rows = s.rows;
  a.cols = s.cols;
  a.mode = mode;
  a.static_scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  a.scale = scale_out.data_ptr<float>();
  a.q = static_cast<uint8_t*>(q.data_ptr());
  check_launch(launch(a, current_stream()), op);
  return {q, scale_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> scaled_fp8_quant(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                    bool per_token) {
  return quantize("scaled_fp8_quant", launch_scaled_fp8_quant, false, x, scale, per_token);
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x,
                                                          const std::optional<at::Tensor>& scale, bool per_token) {
  return quantize("silu_and_mul_quant_fp8", launch_silu_and_mul_quant_fp8, true, x, scale, per_token);
}

}  // namespace cuda

// Public API: through the dispatcher, so the device of the inputs picks the implementation.
std::tuple<at::Tensor, at::Tensor> scaled_fp8_quant(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                    bool per_token) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::scaled_fp8_quant", "")
                           .typed<decltype(scaled_fp8_quant)>();
  return handle.call(x, scale, per_token);
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x,
                                                          const std::optional<at::Tensor>& scale, bool per_token) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::silu_and_mul_quant_fp8", "")
                           .typed<decltype(silu_and_mul_quant_fp8)>();
  return handle.call(x, scale, per_token);
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("scaled_fp8_quant", &cuda::scaled_fp8_quant);
  m.impl("silu_and_mul_quant_fp8", &cuda::silu_and_mul_quant_fp8);
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("scaled_fp8_quant", &cpu::scaled_fp8_quant);
  m.impl("silu_and_mul_quant_fp8", &cpu::silu_and_mul_quant_fp8);
}

}  // namespace moe_kernels
