// The elementary functions of the gated activations (silu, swigluoai's sigmoid), branch-free and
// portable: the same IEEE round-to-nearest steps on the device and on the host (portable_math.h),
// so that the CUDA kernels and the CPU reference give the same bits.
//
// Why not portable_math.h's exp_portable and div_rn: the activation kernels run one exponential
// and one division per output value, and with them the H200 ran silu_and_mul_quant at about 70
// SASS instructions per value (range branches of the exponential, an F2I, the division's FCHK and
// slow-path call), instruction-bound at 0.3-0.5 of the copy ceiling. Here: a clamp instead of
// the range branches, the 2^n of the range reduction from the bits of the shifted sum instead of
// a rounding and a conversion, a degree-5 polynomial, and a reciprocal by Newton steps from a bit
// estimate instead of the IEEE division: about 20 instructions, no branch, no SFU.
#pragma once

#include <cstdint>

#include "common/portable_math.h"

namespace moe_kernels::act {

using namespace moe_kernels::pmath;

// e^x for x in [-80, 80], within 2 ulp (1.97 measured over 4e6 points); x is clamped to that range
// first (e^80 = 5.5e34 keeps 1 + e^x and its reciprocal normal floats). NaN gives e^-80: callers
// keep NaN through their other operand. x = n ln2 + r, |r| <= ln2/2: n is the integer that the
// fma x log2(e) + 1.5 * 2^23 rounds to (its low bits hold n, so 2^n is an integer add to the
// exponent field of the polynomial), r by Cody-Waite with ln2 in two parts, e^r by a polynomial
// of degree 5 fitted (relative minimax by reweighted least squares, coefficients rounded to fp32)
// on [-ln2/2, ln2/2]: 9.2e-8 relative.
MOE_HOST_DEVICE float exp_clamped(float x) {
  constexpr float kLog2e = 0x1.715476p+0f;
  constexpr float kLn2Hi = 0x1.62e430p-1f;
  constexpr float kLn2Lo = -0x1.05c610p-29f;
  constexpr float kShift = 0x1.8p+23f;  // 1.5 * 2^23: adding it rounds to an integer
  x = min_ignoring_nan(max_ignoring_nan(x, -80.0f), 80.0f);
  const float shifted = fma_rn(x, kLog2e, kShift);
  const float n = add_rn(shifted, -kShift);  // exact
  float r = fma_rn(-n, kLn2Hi, x);
  r = fma_rn(-n, kLn2Lo, r);
  float p = 0x1.0fa77cp-7f;
  p = fma_rn(p, r, 0x1.573b4cp-5f);
  p = fma_rn(p, r, 0x1.555a70p-3f);
  p = fma_rn(p, r, 0x1.fffdc2p-2f);
  p = fma_rn(p, r, 0x1.fffff6p-1f);
  p = fma_rn(p, r, 1.0f);
  // The bits of `shifted` are those of 1.5 * 2^23 (0x4B400000, whose low 9 bits are 0) plus n:
  // shifted left by 23 they are n << 23 modulo 2^32, the exponent increment of 2^n.
  return bits_float(float_bits(p) + (float_bits(shifted) << 23));
}

// 1 / d for d in [1, 2^126], within 0.5006 ulp (measured over 6e6 points, 99.98 % correctly
// rounded): the classic bit estimate 0x7EF311C3 - bits(d) (5 % relative error) and three Newton
// steps y += y (1 - d y), each squaring the error (5e-2, 2.5e-3, 6e-6, then the fp32 rounding).
MOE_HOST_DEVICE float reciprocal_from_one(float d) {
  float y = bits_float(0x7EF311C3u - float_bits(d));
#pragma unroll
  for (int i = 0; i < 3; ++i) y = fma_rn(y, fma_rn(-d, y, 1.0f), y);
  return y;
}

// The logistic function 1 / (1 + e^-x); 1 + e^-x lies in [1, 1 + e^80].
MOE_HOST_DEVICE float sigmoid(float x) { return reciprocal_from_one(add_rn(1.0f, exp_clamped(-x))); }

// silu(g) = g sigmoid(g), and -0 below g = -80 (a select, not a branch): there |silu(g)| < 80
// e^-80 = 1.4e-33, and -0 is also its limit at g = -inf, where the product would give -inf (the
// exponential is clamped) or NaN: an infinite activation saturates downstream instead, and
// silu(-inf) * inf stays NaN as in the formula. NaN stays NaN (the comparison is false for it).
MOE_HOST_DEVICE float silu(float g) {
  const float s = mul_rn(g, sigmoid(g));
  return g < -80.0f ? -0.0f : s;
}

}  // namespace moe_kernels::act
