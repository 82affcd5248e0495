// Public C++ API of the FP8 quantization ops. Each call goes through the PyTorch dispatcher, so it
// runs the CUDA or CPU implementation by the inputs' device, exactly as torch.ops.moe_kernels.<op>
// does. Contracts (shapes, dtypes, meaning): docs/ops.md and the Python docstrings.
// Header-only: every function calls its op through the PyTorch dispatcher and is compiled into your
// extension against your torch; _C.so (built on torch's stable ABI) exports no C++ symbol.
// `import moe_kernels` (or load _C.so) before the first call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace moe_kernels {

// x [M,K] bf16/fp16/fp32 -> (q [M,K] float8_e4m3fn, scale f32). scale given ([1]): static
// per-tensor, returned (copied) as is; else dynamic: [1] per tensor, or [M,1] with per_token.
// Dynamic scales are max(amax / 448, 1 / (448 * 512)); q = e4m3(saturate(x * (1 / scale))).
inline std::tuple<at::Tensor, at::Tensor> scaled_fp8_quant(const at::Tensor& x,
                                                    const std::optional<at::Tensor>& scale = std::nullopt,
                                                    bool per_token = false) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::scaled_fp8_quant", "")
                           .typed<decltype(scaled_fp8_quant)>();
  return handle.call(x, scale, per_token);
}

// x [T,K] bf16/fp16/fp32, K % group_size == 0 -> (q [T,K] float8_e4m3fn, scales [T,K/group_size]
// f32): one dynamic scale per token per group of columns, max(amax, 1e-10) / 448 (infinities left
// out of amax), q = e4m3(saturate(x / scale)). column_major_scales: the same values in a tensor
// with strides (1, T) (the layout of MN-major scale operands), else row-major.
inline std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8(const at::Tensor& x, int64_t group_size = 128,
                                                             bool column_major_scales = false) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::per_token_group_quant_fp8", "")
                           .typed<decltype(per_token_group_quant_fp8)>();
  return handle.call(x, group_size, column_major_scales);
}

// x [M,2I] (gate | up, or interleaved) -> (q [M,I] float8_e4m3fn, scale f32): y = act(gate +
// bias, up + bias) in fp32 (activation "silu": silu(g) * u; "gelu": exact-erf gelu(g) * u;
// "swigluoai": (clamp(u, -limit, limit) + 1) * min(g, limit) * sigmoid(alpha * min(g, limit))),
// then quantized as scaled_fp8_quant does, or with group_size > 0 (scale None, per_token false) as
// per_token_group_quant_fp8 does: scales [M, I/group_size] row-major. bias: [E, 2I] float32 in
// x's column order, row r taking the bias of the expert e with expert_offsets[e] <= r <
// expert_offsets[e+1] (expert_offsets [E + 1] int64, given with bias).
inline std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(
    const at::Tensor& x, const std::optional<at::Tensor>& scale = std::nullopt, bool per_token = false,
    int64_t group_size = 0, c10::string_view activation = "silu", bool gate_up_interleaved = false,
    double swiglu_alpha = 1.702, double swiglu_limit = 7.0, const std::optional<at::Tensor>& bias = std::nullopt,
    const std::optional<at::Tensor>& expert_offsets = std::nullopt) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::silu_and_mul_quant_fp8", "")
                           .typed<decltype(silu_and_mul_quant_fp8)>();
  return handle.call(x, scale, per_token, group_size, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                     bias, expert_offsets);
}

}  // namespace moe_kernels
