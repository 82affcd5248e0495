// Public C++ API of the 4-bit expert ops (MXFP4, INT4 x FP8), through the dispatcher. Header-only:
// every function calls its op through the PyTorch dispatcher and is compiled into your extension
// against your torch; `import moe_kernels` (or load _C.so) before the first call. Shapes, dtypes and
// numerics: python/moe_kernels/ops/fourbit.py and docs/ops.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace moe_kernels {

// a [M,K] bf16 or e4m3 (a_scale [1] / [M] f32 then), w uint8 [E,N,K/2] (E2M1 pairs), w_scale uint8
// [E,N,K/32] (E8M0), expert_offsets [E+1] int64, bias f32 [E,N] -> bf16 [M,N], or [M,N/2] with a
// gated activation ("silu", "gelu", "swigluoai"; "none" for none).
inline at::Tensor grouped_gemm_mxfp4(const at::Tensor& a, const at::Tensor& w, const at::Tensor& w_scale,
                                     const at::Tensor& expert_offsets,
                                     const std::optional<at::Tensor>& a_scale = std::nullopt,
                                     const std::optional<at::Tensor>& bias = std::nullopt,
                                     c10::string_view activation = "none", bool gate_up_interleaved = false,
                                     double swiglu_alpha = 1.702, double swiglu_limit = 7.0) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::grouped_gemm_mxfp4", "")
                           .typed<decltype(grouped_gemm_mxfp4)>();
  return handle.call(a, w, w_scale, expert_offsets, a_scale, bias, activation, gate_up_interleaved, swiglu_alpha,
                     swiglu_limit);
}

// The same with signed INT4 weights, w_scale f32 [E,N,K/128], a e4m3 with a_scale required.
inline at::Tensor grouped_gemm_w4a8(const at::Tensor& a, const at::Tensor& w, const at::Tensor& w_scale,
                                    const at::Tensor& expert_offsets,
                                    const std::optional<at::Tensor>& a_scale = std::nullopt,
                                    const std::optional<at::Tensor>& bias = std::nullopt,
                                    c10::string_view activation = "none", bool gate_up_interleaved = false,
                                    double swiglu_alpha = 1.702, double swiglu_limit = 7.0) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::grouped_gemm_w4a8", "")
                           .typed<decltype(grouped_gemm_w4a8)>();
  return handle.call(a, w, w_scale, expert_offsets, a_scale, bias, activation, gate_up_interleaved, swiglu_alpha,
                     swiglu_limit);
}

// The MXFP4 expert layer; a_dtype bf16 (W4A16, the default) or float8_e4m3fn (W4A8).
inline at::Tensor cutlass_moe_mxfp4(const at::Tensor& hidden_states, const at::Tensor& w1, const at::Tensor& w2,
                                    const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                    const at::Tensor& w1_scale, const at::Tensor& w2_scale,
                                    c10::string_view activation = "silu", bool gate_up_interleaved = false,
                                    double swiglu_alpha = 1.702, double swiglu_limit = 7.0,
                                    const std::optional<at::Tensor>& w1_bias = std::nullopt,
                                    const std::optional<at::Tensor>& w2_bias = std::nullopt,
                                    std::optional<at::ScalarType> a_dtype = std::nullopt,
                                    const std::optional<at::Tensor>& expert_map = std::nullopt,
                                    int64_t num_local_experts = -1) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::cutlass_moe_mxfp4", "")
                           .typed<decltype(cutlass_moe_mxfp4)>();
  return handle.call(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, activation,
                     gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias, a_dtype, expert_map,
                     num_local_experts);
}

// The INT4 x FP8 expert layer; a1_scale / a2_scale [1] f32 static, or nullopt for per-token scales.
inline at::Tensor cutlass_moe_w4a8(const at::Tensor& hidden_states, const at::Tensor& w1, const at::Tensor& w2,
                                   const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                   const at::Tensor& w1_scale, const at::Tensor& w2_scale,
                                   const std::optional<at::Tensor>& a1_scale = std::nullopt,
                                   const std::optional<at::Tensor>& a2_scale = std::nullopt,
                                   c10::string_view activation = "silu", bool gate_up_interleaved = false,
                                   double swiglu_alpha = 1.702, double swiglu_limit = 7.0,
                                   const std::optional<at::Tensor>& w1_bias = std::nullopt,
                                   const std::optional<at::Tensor>& w2_bias = std::nullopt,
                                   const std::optional<at::Tensor>& expert_map = std::nullopt,
                                   int64_t num_local_experts = -1) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::cutlass_moe_w4a8", "")
                           .typed<decltype(cutlass_moe_w4a8)>();
  return handle.call(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, a1_scale, a2_scale,
                     activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias, expert_map,
                     num_local_experts);
}

}  // namespace moe_kernels
