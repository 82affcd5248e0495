// The FP8 grouped GEMM's implementations as C++ functions, for the composite cutlass_moe_fp8 (which
// calls them directly: no boxed dispatcher call, errors keep their text under every torch).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "common/stable_glue.h"

namespace moe_kernels {

// Raises (naming op, the device and its compute capability) unless t's GPU runs the sm_90a GEMMs.
void check_gemm_arch(const char* op, const Tensor& t);

std::vector<std::string> grouped_gemm_fp8_configs();

// The SM count of a device (cached): CUTLASS's persistent tile schedulers size their grids by it.
int grouped_gemm_sm_count(int device);

namespace cuda {
Tensor cutlass_grouped_gemm_fp8(const Tensor& a, const Tensor& b, const Tensor& a_scales, const Tensor& b_scales,
                                const Tensor& expert_offsets, std::optional<ScalarType> out_dtype);
// GEMM1 with the gated activation and the static fp8 quantization of its output in the epilogue
// (b's rows interleave gate and up): [M, N/2] e4m3.
Tensor cutlass_grouped_gemm_fp8_act_quant(const Tensor& a, const Tensor& b, const Tensor& a_scales,
                                          const Tensor& b_scales, const Tensor& expert_offsets, const Tensor& out_scale,
                                          const std::string& activation, double swiglu_alpha, double swiglu_limit,
                                          const std::optional<Tensor>& bias);
}  // namespace cuda
namespace cpu {
Tensor cutlass_grouped_gemm_fp8(const Tensor& a, const Tensor& b, const Tensor& a_scales, const Tensor& b_scales,
                                const Tensor& expert_offsets, std::optional<ScalarType> out_dtype);
Tensor cutlass_grouped_gemm_fp8_act_quant(const Tensor& a, const Tensor& b, const Tensor& a_scales,
                                          const Tensor& b_scales, const Tensor& expert_offsets, const Tensor& out_scale,
                                          const std::string& activation, double swiglu_alpha, double swiglu_limit,
                                          const std::optional<Tensor>& bias);
}  // namespace cpu

}  // namespace moe_kernels
