// Public C++ API of the FP8 grouped GEMM and the CUTLASS MoE layer (through the dispatcher).
// Header-only: every function calls its op through the PyTorch dispatcher and is compiled into your
// extension against your torch; _C.so (built on torch's stable ABI) exports no C++ symbol.
// `import moe_kernels` (or load _C.so) before the first call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <vector>

namespace moe_kernels {

// a [M,K] e4m3 rows grouped by expert, b [E,N,K] e4m3, a_scales [1] or [M] f32, b_scales [E] or
// [E,N] f32, expert_offsets [E+1] int64 -> [M,N] bf16 = a_scale * b_scale[e] * (a[rows of e] @ b[e]^T).
// Block-scaled when b_scales is 3-D: a_scales [M, K/128] (per row per 128 columns) and b_scales
// [E, N/128, K/128] (per 128x128 weight block), applied per 128-wide K block; K, N multiples of 128.
inline at::Tensor cutlass_grouped_gemm_fp8(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scales,
                                    const at::Tensor& b_scales, const at::Tensor& expert_offsets,
                                    std::optional<at::ScalarType> out_dtype = std::nullopt) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::cutlass_grouped_gemm_fp8", "")
                           .typed<decltype(cutlass_grouped_gemm_fp8)>();
  return handle.call(a, b, a_scales, b_scales, expert_offsets, out_dtype);
}

// GEMM1 with the gated activation and static fp8 quantization in its epilogue: b's rows interleave
// gate (even) and up (odd); out_scale [1] f32; bias optional [E, N] f32 -> [M, N/2] e4m3, the bytes of
// silu_and_mul_quant_fp8(cutlass_grouped_gemm_fp8(...), out_scale, interleaved) (docs/ops.md).
inline at::Tensor cutlass_grouped_gemm_fp8_act_quant(const at::Tensor& a, const at::Tensor& b,
                                                     const at::Tensor& a_scales, const at::Tensor& b_scales,
                                                     const at::Tensor& expert_offsets, const at::Tensor& out_scale,
                                                     c10::string_view activation = "silu", double swiglu_alpha = 1.702,
                                                     double swiglu_limit = 7.0,
                                                     const std::optional<at::Tensor>& bias = std::nullopt) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::cutlass_grouped_gemm_fp8_act_quant", "")
                           .typed<decltype(cutlass_grouped_gemm_fp8_act_quant)>();
  return handle.call(a, b, a_scales, b_scales, expert_offsets, out_scale, activation, swiglu_alpha, swiglu_limit,
                     bias);
}

// Names of the compiled tile configurations of cutlass_grouped_gemm_fp8 (the environment variable
// MOE_KERNELS_GEMM_CONFIG=<name> forces one; unset, the rows per expert choose).
inline std::vector<std::string> grouped_gemm_fp8_configs() {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::grouped_gemm_fp8_configs", "")
                           .typed<std::vector<std::string>()>();
  return handle.call();
}

// The whole expert computation: quantize, permute, GEMM1, (+ w1_bias) gated activation + quantize,
// GEMM2, (+ w2_bias) weighted unpermute. activation "silu" | "gelu" | "swigluoai" (docs/ops.md).
inline at::Tensor cutlass_moe_fp8(const at::Tensor& hidden_states, const at::Tensor& w1, const at::Tensor& w2,
                                  const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                  const at::Tensor& w1_scale, const at::Tensor& w2_scale,
                                  const std::optional<at::Tensor>& a1_scale = std::nullopt,
                                  const std::optional<at::Tensor>& a2_scale = std::nullopt, bool per_act_token = false,
                                  bool per_out_ch = false, const std::optional<at::Tensor>& expert_map = std::nullopt,
                                  int64_t num_local_experts = -1, bool apply_router_weight_on_input = false,
                                  c10::string_view activation = "silu", bool gate_up_interleaved = false,
                                  double swiglu_alpha = 1.702, double swiglu_limit = 7.0,
                                  const std::optional<at::Tensor>& w1_bias = std::nullopt,
                                  const std::optional<at::Tensor>& w2_bias = std::nullopt) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::cutlass_moe_fp8", "")
                           .typed<decltype(cutlass_moe_fp8)>();
  return handle.call(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, a1_scale, a2_scale,
                     per_act_token, per_out_ch, expert_map, num_local_experts, apply_router_weight_on_input,
                     activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias);
}

}  // namespace moe_kernels
