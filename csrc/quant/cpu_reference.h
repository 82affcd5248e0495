// CPU implementations of the quant ops: plain loops over the arithmetic of fp8_math.h, written to
// be read as the specification that the CUDA kernels are tested against (byte for byte).
#pragma once

#include "common/stable_glue.h"

#include <optional>
#include <string>
#include <tuple>

namespace moe_kernels::cpu {

std::tuple<Tensor, Tensor> scaled_fp8_quant(const Tensor& x, const std::optional<Tensor>& scale,
                                                    bool per_token);

std::tuple<Tensor, Tensor> per_token_group_quant_fp8(const Tensor& x, int64_t group_size,
                                                             bool column_major_scales);

std::tuple<Tensor, Tensor> silu_and_mul_quant_fp8(const Tensor& x, const std::optional<Tensor>& scale, bool per_token,
                                                  int64_t group_size, const std::string& activation = "silu",
                                                  bool gate_up_interleaved = false, double swiglu_alpha = 1.702,
                                                  double swiglu_limit = 7.0,
                                                  const std::optional<Tensor>& bias = std::nullopt,
                                                  const std::optional<Tensor>& expert_offsets = std::nullopt);

}  // namespace moe_kernels::cpu
