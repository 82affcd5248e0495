// Argument checks of the FP8 grouped GEMM, shared by the CUDA and CPU implementations.
#pragma once

#include <ATen/ATen.h>

namespace moe_kernels {

void check_grouped_gemm_fp8_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scales,
                                 const at::Tensor& b_scales, const at::Tensor& expert_offsets,
                                 std::optional<at::ScalarType> out_dtype);

}  // namespace moe_kernels
