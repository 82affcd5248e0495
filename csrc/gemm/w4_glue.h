// The 4-bit grouped GEMMs (grouped_gemm_mxfp4, grouped_gemm_w4a8; grouped_gemm_w4_ops.cpp) as C++
// functions, for the layers that call them directly (moe/w4_layer.h).
#pragma once

#include <optional>
#include <string>

#include "common/stable_glue.h"
#include "gemm/w4_format.h"

namespace moe_kernels {

// Checks every argument (messages name `op`), then runs the CUDA kernel (cuda) or the CPU
// reference. The arguments of grouped_gemm_mxfp4 / grouped_gemm_w4a8.
Tensor grouped_gemm_w4(const char* op, w4::WeightFormat format, bool cuda, const Tensor& a, const Tensor& w,
                       const Tensor& w_scale, const Tensor& expert_offsets, const std::optional<Tensor>& a_scale,
                       const std::optional<Tensor>& bias, const std::string& activation, bool interleaved,
                       double alpha, double limit);

// The GPU of t can run the 4-bit GEMMs (compute capability 8.0 or newer), else an error naming op.
void check_w4_gemm_arch(const char* op, const Tensor& t);

}  // namespace moe_kernels
