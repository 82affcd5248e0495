// The arithmetic of the FP8 quantization ops, shared by the CUDA kernels and the CPU reference so
// that both give the same bytes. Compiles as CUDA (host and device) and as plain C++.
//
// Every operation is an IEEE round-to-nearest one that both sides implement exactly: on the
// device through the _rn intrinsics (never contracted into an fma, whatever the -fmad setting);
// on the host through plain operators and std::fma (the CPU reference is compiled with
// -ffp-contract=off). The exponential of silu is a polynomial written with those operations
// rather than expf: the device expf and the host std::exp differ in the last bits, which would
// flip roundings to e4m3 and make the CUDA op impossible to compare byte for byte (the
// activations' own functions: act_math.h).
#pragma once

#include <cfloat>

#include "common/portable_math.h"

namespace moe_kernels::fp8 {

using namespace moe_kernels::pmath;  // fp8::mul_rn and friends: the portable IEEE operations


// Largest finite float8_e4m3fn value: quantized values saturate to [-kE4M3Max, kE4M3Max].
constexpr float kE4M3Max = 448.0f;

// Smallest dynamic scale, as vLLM's per-token quantization uses: 1 / (448 * 512). It guards an
// all-zero row (amax = 0 would give scale 0 and 0 * inf = NaN); any row with amax >= 1/512 is
// unaffected. The same floor applies to the dynamic per-tensor scale.
constexpr float kMinScale = 0x1.24924ap-18f;

// The dynamic scale of a row or tensor whose largest magnitude is amax. Monotone in amax, so that
// the per-tensor scale is the maximum of the per-block scales (one atomicMax per block).
MOE_HOST_DEVICE float scale_from_amax(float amax) {
  return max_ignoring_nan(div_rn(amax, kE4M3Max), kMinScale);
}

// Per-group scales (per_token_group_quant_fp8; silu_and_mul_quant_fp8 with group_size): the
// formula of vLLM's and SGLang's per_token_group_quant_fp8 and of the DeepSeek-V3 checkpoints'
// activation quantization, scale = max(amax, 1e-10) / 448, with their floor on amax (an all-zero
// group gets scale 1e-10 / 448 and q = 0, never NaN). Values of a group are quantized by an IEEE
// division, y / scale, as those implementations do (not times a reciprocal).
constexpr float kGroupAmaxFloor = 1e-10f;

MOE_HOST_DEVICE float group_scale_from_amax(float amax) {
  return div_rn(max_ignoring_nan(amax, kGroupAmaxFloor), kE4M3Max);
}

// What a value contributes to a dynamic scale's amax (per tensor, token or group): |y| when
// finite, else 0. NaN and +-inf are
// ignored, so that one non-finite value neither poisons the scale of its row or tensor (inf / 448
// would zero every other value and make inf * 0 = NaN) nor changes it: +-inf then saturates to
// +-448 and NaN stays NaN, the other values keep their resolution.
MOE_HOST_DEVICE float amax_term(float y) {
  const float a = abs_f(y);
  return a <= FLT_MAX ? a : 0.0f;  // false for NaN and inf
}

// y / scale, given inv = inverse_scale(scale): the product y * inv corrected by one fma of its
// residual (Markstein's step). Equal to the IEEE quotient y / scale (the per-group formula above)
// whenever |y / scale| >= 2^-12: compared on 1.4e9 random pairs of the per-group range (scale =
// max(amax, 1e-10) / 448, |y| <= amax), no difference; below 2^-12, where the residual can be
// subnormal and the two may differ in the last bit, both round to an e4m3 zero of y's sign. A
// zero y keeps the product (-0 * inv = -0, where the fma sum would give +0), and so does an
// infinite y (whose residual is NaN), as the division would. Three operations per value instead
// of a division with its slow-path branch.
MOE_HOST_DEVICE float divide_by_scale(float y, float scale, float inv) {
  const float q = mul_rn(y, inv);
  const float corrected = fma_rn(fma_rn(-q, scale, y), inv, q);
  return q == 0.0f || corrected != corrected ? q : corrected;
}

// Values are quantized as y * (1 / scale): one reciprocal per scale, one multiply per element (as
// vLLM does). The product is then saturated to +-448 and rounded to nearest even in e4m3.
MOE_HOST_DEVICE float inverse_scale(float scale) { return div_rn(1.0f, scale); }

}  // namespace moe_kernels::fp8
