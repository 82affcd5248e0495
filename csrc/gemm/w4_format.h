// The 4-bit weight formats and the gated activations of the 4-bit grouped GEMMs, shared by the
// CUDA kernel (grouped_gemm_w4.cuh) and its CPU reference (grouped_gemm_w4_cpu.cpp) so that both
// decode the same bytes to the same values. Compiles as CUDA (host and device) and as plain C++.
//
// Weights are [E, N, K/2] bytes, two 4-bit codes a byte, the low nibble the even K element:
// - MXFP4 (OCP microscaling, gpt-oss / DeepSeek-V4 checkpoints): E2M1 codes, one E8M0 scale byte
//   per 32 consecutive K elements ([E, N, K/32]); value = e2m1 * 2^(s - 127).
// - INT4 (DeepSeek-R1 W4AFP8): signed two's-complement codes in [-8, 7], one fp32 scale per 128
//   consecutive K elements ([E, N, K/128]); value = q * scale.
// The GEMMs multiply in bfloat16, so a weight enters as bf16(value): exact for MXFP4 (an E2M1
// value has two significant bits, times a power of two inside bf16's exponent range: every finite
// one is a bf16), rounded once to nearest even for INT4 (q * scale has up to 24 significant bits).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/portable_math.h"

namespace moe_kernels::w4 {

enum class WeightFormat : int { kMxfp4 = 0, kInt4 = 1 };

// Elements sharing one weight scale along K.
constexpr int kMxfp4Group = 32;
constexpr int kInt4Group = 128;

// The gated activation applied to GEMM1's two halves (gate, up) in its epilogue, or none (GEMM2).
enum class Activation : int { kNone = 0, kSilu = 1, kGelu = 2, kSwigluOai = 3 };

// E2M1 code (sign, two exponent bits with bias 1, one mantissa bit) -> fp32, from its bits:
// 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (0b0001 is the subnormal 0.5).
MOE_HOST_DEVICE float e2m1_to_float(uint32_t code) {
  const uint32_t e = (code >> 1) & 3u;
  const uint32_t m = code & 1u;
  uint32_t bits = e != 0 ? ((e + 126u) << 23) | (m << 22) : (m != 0 ? 0x3f000000u : 0u);
  bits |= (code & 8u) << 28;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// 2^(s - 127) from its bits: s in [1, 254] is a normal fp32 exponent field as is; s = 0 is
// 2^-127, the fp32 subnormal 0x00400000; s = 255 is E8M0's NaN.
MOE_HOST_DEVICE float e8m0_to_float(uint32_t s) {
  const uint32_t bits = s == 0 ? 0x00400000u : s == 255 ? 0x7fc00000u : (s << 23);
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// The value of a 4-bit code under its scale (before the bf16 rounding of the GEMM's input):
// MXFP4 takes the E8M0 scale byte, INT4 the fp32 group scale.
MOE_HOST_DEVICE float mxfp4_value(uint32_t code, uint32_t scale_byte) {
  return pmath::mul_rn(e2m1_to_float(code), e8m0_to_float(scale_byte));
}

MOE_HOST_DEVICE float int4_value(uint32_t code, float scale) {
  const int q = static_cast<int>(code ^ 8u) - 8;  // sign-extends the nibble: 0x8..0xF -> -8..-1
  return pmath::mul_rn(static_cast<float>(q), scale);
}

MOE_HOST_DEVICE float erf_f(float x) {
#if defined(__CUDA_ARCH__)
  return erff(x);
#else
  return std::erf(x);
#endif
}

// The gated activations (DESIGN.md, third wave), in fp32:
//   silu:      silu(gate) * up
//   gelu:      gelu(gate) * up, the exact GELU 0.5 * g * (1 + erf(g / sqrt(2)))
//   swigluoai: g = min(gate, limit); u = clamp(up, -limit, limit); (u + 1) * g * sigmoid(alpha * g)
// The clamps are written as comparisons so that a NaN stays NaN (as torch.clamp), where fminf
// would replace it with the limit.
MOE_HOST_DEVICE float gated_activation(Activation act, float gate, float up, float alpha, float limit) {
  switch (act) {
    case Activation::kSilu: return pmath::mul_rn(pmath::silu(gate), up);
    case Activation::kGelu: {
      constexpr float kInvSqrt2 = 0.70710678118654752f;
      const float g = pmath::mul_rn(pmath::mul_rn(0.5f, gate),
                                    pmath::add_rn(1.0f, erf_f(pmath::mul_rn(gate, kInvSqrt2))));
      return pmath::mul_rn(g, up);
    }
    case Activation::kSwigluOai: {
      const float g = gate > limit ? limit : gate;
      const float u = up > limit ? limit : (up < -limit ? -limit : up);
      const float glu = pmath::mul_rn(g, pmath::sigmoid(pmath::mul_rn(alpha, g)));
      return pmath::mul_rn(pmath::add_rn(u, 1.0f), glu);
    }
    default: return gate;
  }
}

}  // namespace moe_kernels::w4
