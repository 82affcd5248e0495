// Launchers of the quant/ kernels. Plain C++ (pointers, sizes, a stream): no torch types, so that
// the .cu files compile without torch headers. Each returns the launch's cudaError_t.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "quant/gated_act.h"

namespace moe_kernels {

enum class QuantScaleMode {
  kStaticPerTensor,   // the caller's scale [1]; copied to `scale`
  kDynamicPerTensor,  // scale [1] = max(amax(|y|) / 448, kMinScale), computed on the device
  kDynamicPerToken,   // scale [rows] = the same per row
  kDynamicPerGroup,   // scale [rows, cols / group_size] = max(amax, 1e-10) / 448 per group of columns
};

struct Fp8QuantArgs {
  const void* x;              // [rows, cols] (scaled_fp8_quant) or [rows, 2*cols] (silu_and_mul)
  DType dtype;                // float32, float16 or bfloat16
  int64_t rows;
  int64_t cols;               // columns of q
  QuantScaleMode mode;
  const float* static_scale;  // [1] for kStaticPerTensor, else nullptr
  float* scale;               // out: [1] for the per-tensor modes, [rows] per token, [rows, groups] per group
  uint8_t* q;                 // out: [rows, cols] float8_e4m3fn
  int64_t group_size;         // kDynamicPerGroup: columns per group (divides cols), else unused
  bool scales_column_major;   // kDynamicPerGroup: scale of (r, g) at g * rows + r instead of r * groups + g
  GatedActSpec act;           // silu_and_mul_quant_fp8: activation, layout, bias (unused by scaled_fp8_quant)
};

// q = e4m3(saturate(x * (1 / scale))); per group: e4m3(saturate(x / scale))
cudaError_t launch_scaled_fp8_quant(const Fp8QuantArgs& args, cudaStream_t stream);

// q = e4m3(saturate(act(gate + bias, up + bias) * (1 / scale))), act, layout and bias from args.act
// (gated_act.h); the default spec is silu on concatenated halves, no bias.
cudaError_t launch_silu_and_mul_quant_fp8(const Fp8QuantArgs& args, cudaStream_t stream);

}  // namespace moe_kernels
