// Argument checks of the FP8 grouped GEMM, shared by the CUDA and CPU implementations.
#pragma once

#include "common/stable_glue.h"

namespace moe_kernels {

void check_grouped_gemm_fp8_args(const Tensor& a, const Tensor& b, const Tensor& a_scales,
                                 const Tensor& b_scales, const Tensor& expert_offsets,
                                 std::optional<ScalarType> out_dtype,
                                 const char* op = "cutlass_grouped_gemm_fp8");  // the op messages name

}  // namespace moe_kernels
