// The CUDA implementations of the quant ops as C++ functions (quant/ops.cpp), for composites that
// call them directly (cutlass_moe_fp8). The CPU ones: quant/cpu_reference.h.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include "common/stable_glue.h"

namespace moe_kernels::cuda {

std::tuple<Tensor, Tensor> scaled_fp8_quant(const Tensor& x, const std::optional<Tensor>& scale, bool per_token);

std::tuple<Tensor, Tensor> per_token_group_quant_fp8(const Tensor& x, int64_t group_size, bool column_major_scales);

std::tuple<Tensor, Tensor> silu_and_mul_quant_fp8(const Tensor& x, const std::optional<Tensor>& scale, bool per_token,
                                                  int64_t group_size, const std::string& activation = "silu",
                                                  bool gate_up_interleaved = false, double swiglu_alpha = 1.702,
                                                  double swiglu_limit = 7.0,
                                                  const std::optional<Tensor>& bias = std::nullopt,
                                                  const std::optional<Tensor>& expert_offsets = std::nullopt);

}  // namespace moe_kernels::cuda
