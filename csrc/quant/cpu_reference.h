// CPU implementations of the quant ops: plain loops over the arithmetic of fp8_math.h, written to
// be read as the specification that the CUDA kernels are tested against (byte for byte).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace moe_kernels::cpu {

std::tuple<at::Tensor, at::Tensor> scaled_fp8_quant(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                    bool per_token);

std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8(const at::Tensor& x, int64_t group_size,
                                                             bool column_major_scales);

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x,
                                                          const std::optional<at::Tensor>& scale, bool per_token,
                                                          int64_t group_size, c10::string_view activation,
                                                          bool gate_up_interleaved, double swiglu_alpha,
                                                          double swiglu_limit, const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& expert_offsets);

}  // namespace moe_kernels::cpu
