// The 4-bit weight formats of the 4-bit grouped GEMMs and the dispatch to the gated activations of
// quant/gated_act.h, shared by the CUDA kernel (grouped_gemm_w4.cuh) and its CPU reference
// (grouped_gemm_w4_cpu.cpp) so that both decode the same bytes to the same values. Compiles as
// CUDA (host and device) and as plain C++.
//
// Weights are [E, N, K/2] bytes, two 4-bit codes a byte, the low nibble the even K element:
// - MXFP4 (OCP microscaling, gpt-oss / DeepSeek-V4 checkpoints): E2M1 codes, one E8M0 scale byte
//   per 32 consecutive K elements ([E, N, K/32]); value = e2m1 * 2^(s - 127).
// - INT4 (DeepSeek-R1 W4AFP8): signed two's-complement codes in [-8, 7], one fp32 scale per 128
//   consecutive K elements ([E, N, K/128]); value = q * scale.
// The GEMMs multiply in bfloat16, so a weight enters as a bf16:
// - MXFP4: bf16(e2m1 * 2^(s-127)), exact (an E2M1 value has two significant bits, times a power of
//   two inside bf16's exponent range: every finite one is a bf16, subnormals included);
// - INT4: bf16(q * bf16(scale)): the scale is rounded to bf16 first (as SGLang's and TRT-LLM's W4A8
//   kernels keep their scales), then the product (12 significant bits) once more to nearest even.
// The kernel decodes 8 codes (one 32-bit word) at a time with bit operations and bf16x2 arithmetic
// (decode8_mxfp4, decode8_int4 below); tests/test_mxfp4_w4a8_decode.cpp checks them on the host
// against the scalar definitions for every byte and scale.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/portable_math.h"
#include "quant/gated_act.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace moe_kernels::w4 {

enum class WeightFormat : int { kMxfp4 = 0, kInt4 = 1 };

// Elements sharing one weight scale along K.
constexpr int kMxfp4Group = 32;
constexpr int kInt4Group = 128;

// The gated activation applied to GEMM1's two halves (gate, up) in its epilogue, or none (GEMM2).
enum class Activation : int { kNone = 0, kSilu = 1, kGelu = 2, kSwigluOai = 3 };

using pmath::bits_float;  // bit casts between fp32 and its 32 bits (portable_math.h)
using pmath::float_bits;

// E2M1 code (sign, two exponent bits with bias 1, one mantissa bit) -> fp32, from its bits:
// 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (0b0001 is the subnormal 0.5).
MOE_HOST_DEVICE float e2m1_to_float(uint32_t code) {
  const uint32_t e = (code >> 1) & 3u;
  const uint32_t m = code & 1u;
  uint32_t bits = e != 0 ? ((e + 126u) << 23) | (m << 22) : (m != 0 ? 0x3f000000u : 0u);
  bits |= (code & 8u) << 28;
  return bits_float(bits);
}

// 2^(s - 127) from its bits: s in [1, 254] is a normal fp32 exponent field as is; s = 0 is
// 2^-127, the fp32 subnormal 0x00400000; s = 255 is E8M0's NaN.
MOE_HOST_DEVICE float e8m0_to_float(uint32_t s) {
  return bits_float(s == 0 ? 0x00400000u : s == 255 ? 0x7fc00000u : (s << 23));
}

// fp32 -> bf16 bits, round to nearest even (NaN stays a NaN).
MOE_HOST_DEVICE uint32_t bf16_bits_rn(float x) {
  const uint32_t b = float_bits(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return ((b >> 16) | 0x40u) & 0xffffu;
  return ((b + 0x7fffu + ((b >> 16) & 1u)) >> 16) & 0xffffu;
}

MOE_HOST_DEVICE float bf16_bits_to_float(uint32_t h) { return bits_float(h << 16); }

// x rounded to bf16 (round to nearest even), as a float.
MOE_HOST_DEVICE float round_to_bf16(float x) { return bf16_bits_to_float(bf16_bits_rn(x)); }

// The GEMM's bf16 weight of a code under its scale (the definitions above, in scalar form).
MOE_HOST_DEVICE float mxfp4_weight(uint32_t code, uint32_t scale_byte) {
  return round_to_bf16(pmath::mul_rn(e2m1_to_float(code), e8m0_to_float(scale_byte)));  // exact
}

MOE_HOST_DEVICE float int4_weight(uint32_t code, float scale) {
  const int q = static_cast<int>(code ^ 8u) - 8;  // sign-extends the nibble: 0x8..0xF -> -8..-1
  return round_to_bf16(pmath::mul_rn(static_cast<float>(q), round_to_bf16(scale)));
}

// ---- 8 codes at a time: one 32-bit word (element j in bits 4j..4j+3) -> 8 bf16 in 4 words ----

// Two bf16 in one word (low half the first), multiplied lane by lane, rounded to nearest even.
MOE_HOST_DEVICE uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&a);
  __nv_bfloat162 y = *reinterpret_cast<__nv_bfloat162*>(&b);
  __nv_bfloat162 r = __hmul2(x, y);
  return *reinterpret_cast<uint32_t*>(&r);
#else
  // The product of two bf16 is exact in fp32, so one rounding of it is the bf16 multiply.
  const uint32_t lo = bf16_bits_rn(bf16_bits_to_float(a & 0xffffu) * bf16_bits_to_float(b & 0xffffu));
  const uint32_t hi = bf16_bits_rn(bf16_bits_to_float(a >> 16) * bf16_bits_to_float(b >> 16));
  return lo | (hi << 16);
#endif
}

MOE_HOST_DEVICE uint32_t bf16x2_sub(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&a);
  __nv_bfloat162 y = *reinterpret_cast<__nv_bfloat162*>(&b);
  __nv_bfloat162 r = __hsub2(x, y);
  return *reinterpret_cast<uint32_t*>(&r);
#else
  const uint32_t lo = bf16_bits_rn(bf16_bits_to_float(a & 0xffffu) - bf16_bits_to_float(b & 0xffffu));
  const uint32_t hi = bf16_bits_rn(bf16_bits_to_float(a >> 16) - bf16_bits_to_float(b >> 16));
  return lo | (hi << 16);
#endif
}

// (x_lo, y_lo) and (x_hi, y_hi): the 16-bit halves of two words regrouped.
MOE_HOST_DEVICE uint32_t pack_lows(uint32_t x, uint32_t y) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, 0x5410);
#else
  return (x & 0xffffu) | (y << 16);
#endif
}

MOE_HOST_DEVICE uint32_t pack_highs(uint32_t x, uint32_t y) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, 0x7632);
#else
  return (x >> 16) | (y & 0xffff0000u);
#endif
}

// Lane t of a word shifted right by 4t holds elements t (low half) and t + 4 (high half). Returns
// out[i] = (element 2i, element 2i + 1) from the four pairs (t, t + 4), t = 0..3.
MOE_HOST_DEVICE void interleave_pairs(const uint32_t x[4], uint32_t out[4]) {
  out[0] = pack_lows(x[0], x[1]);
  out[1] = pack_lows(x[2], x[3]);
  out[2] = pack_highs(x[0], x[1]);
  out[3] = pack_highs(x[2], x[3]);
}

// The bf16x2 factors that take an E2M1 code placed as below to its value under E8M0 scale s:
// 2^(s-1) in one step where it is a bf16 (s <= 128), else 2^127 then 2^(s-128) (NaN for s = 255).
struct Mxfp4Factors {
  uint32_t first;
  uint32_t second;  // 0: no second step
};

MOE_HOST_DEVICE Mxfp4Factors mxfp4_factors(uint32_t s) {
  if (s <= 128) {
    const uint32_t f = (s + 126u) << 7;  // bf16 bits of 2^(s - 1)
    return {f | (f << 16), 0u};
  }
  const uint32_t f2 = s == 255 ? 0x7fc0u : (s - 1u) << 7;  // 2^(s - 128)
  return {0x7f007f00u, f2 | (f2 << 16)};                   // 2^127
}

// E2M1 codes (s e1 e0 m) -> bf16 bits: the magnitude bits at 8..6 (exponent bits 1..0, mantissa
// bit 6) make e2m1 * 2^-126 exactly (0b001 the subnormal 2^-127), the sign at 15; the factors
// then scale by 2^(s-1): powers of two, so the bf16 products are exact (or overflow to inf, as
// the fp32 definition does).
// The _split forms stop before interleave_pairs: x[t] holds elements t (low half) and t + 4 (high
// half). The GEMV (grouped_gemv_w4.cuh) converts to fp32 anyway and indexes them where they are.
MOE_HOST_DEVICE void decode8_mxfp4_split(uint32_t codes, const Mxfp4Factors& f, uint32_t x[4]) {
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const uint32_t y = codes >> (4 * t);
    uint32_t v = ((y << 6) & 0x01c001c0u) | ((y << 12) & 0x80008000u);
    v = bf16x2_mul(v, f.first);
    if (f.second != 0) v = bf16x2_mul(v, f.second);
    x[t] = v;
  }
}

MOE_HOST_DEVICE void decode8_mxfp4(uint32_t codes, const Mxfp4Factors& f, uint32_t out[4]) {
  uint32_t x[4];
  decode8_mxfp4_split(codes, f, x);
  interleave_pairs(x, out);
}

// Signed INT4 -> bf16: 0x4300 | (code ^ 8) is the bf16 136 + q (q + 8 in 0..15 fits the 7-bit
// mantissa of 128), minus 136 is q exactly; times the bf16 scale, rounded once.
MOE_HOST_DEVICE uint32_t int4_scale_bf16x2(float scale) {
  const uint32_t h = bf16_bits_rn(scale);
  return h | (h << 16);
}

MOE_HOST_DEVICE void decode8_int4_split(uint32_t codes, uint32_t scale_bf16x2, uint32_t x[4]) {
  constexpr uint32_t k136 = 0x43084308u;  // bf16 136.0 in both halves
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const uint32_t y = codes >> (4 * t);
    const uint32_t v = ((y & 0x000f000fu) ^ 0x00080008u) | 0x43004300u;
    x[t] = bf16x2_mul(bf16x2_sub(v, k136), scale_bf16x2);
  }
}

MOE_HOST_DEVICE void decode8_int4(uint32_t codes, uint32_t scale_bf16x2, uint32_t out[4]) {
  uint32_t x[4];
  decode8_int4_split(codes, scale_bf16x2, x);
  interleave_pairs(x, out);
}

// GEMM1's gated activation in fp32 (DESIGN.md, third wave): the functors of quant/gated_act.h,
// the ones the FP8 layer's silu_and_mul_quant_fp8 and its CPU reference use, so that an
// activation gives the same bits in the FP8 and the 4-bit layers and on the CPU and the GPU (GELU
// through gated_act.h's erf from IEEE operations, not erff / std::erf, which differ in the last
// bits). The activation is chosen at run time here (one kernel serves all of them).
MOE_HOST_DEVICE float gated_activation(Activation activation, float gate, float up, float alpha, float limit) {
  switch (activation) {
    case Activation::kSilu: return moe_kernels::act::SiluMul{}(gate, up);
    case Activation::kGelu: return moe_kernels::act::GeluMul{}(gate, up);
    case Activation::kSwigluOai: return moe_kernels::act::SwigluOai{alpha, limit}(gate, up);
    default: return gate;
  }
}

}  // namespace moe_kernels::w4
