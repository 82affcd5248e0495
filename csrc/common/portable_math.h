// Float arithmetic that gives the same bits on the device and on the host: every operation is
// one IEEE round-to-nearest step, through the _rn intrinsics on the device (never contracted into
// an fma) and plain operators / std::fma on the host (CPU files using it are compiled with
// -ffp-contract=off). Kernels and their CPU references share these functions where results must
// compare exactly (fp8 bytes, routing ids and weights). Compiles as CUDA and as plain C++.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOE_HOST_DEVICE inline
#endif

namespace moe_kernels::pmath {

MOE_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MOE_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MOE_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

MOE_HOST_DEVICE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

MOE_HOST_DEVICE float max_ignoring_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return std::fmax(a, b);
#endif
}

MOE_HOST_DEVICE float min_ignoring_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return std::fmin(a, b);
#endif
}

// Bit casts between fp32 and its 32 bits (the intrinsics on the device, memcpy on the host).
MOE_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

MOE_HOST_DEVICE float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

MOE_HOST_DEVICE float abs_f(float a) {
#if defined(__CUDA_ARCH__)
  return fabsf(a);
#else
  return std::fabs(a);
#endif
}

MOE_HOST_DEVICE float round_half_even(float a) {
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return std::nearbyint(a);  // the default rounding mode: to nearest, ties to even
#endif
}

// 2^n for n in [-126, 127], built from its bits (exact).
MOE_HOST_DEVICE float exp2_int(int n) { return bits_float(static_cast<uint32_t>(n + 127) << 23); }

// e^x within about 2 ulp: x = n*ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial of degree
// 7 (truncation error below 1e-8 relative), times 2^n. Below -80 it returns 0 and above 88 +inf:
// its users (the routers' softmax and sigmoid, gelu's erfc) add it to 1 (where e^-80 is far below
// an ulp) or divide by it, and staying away from subnormals keeps the result independent of
// flush-to-zero settings.
MOE_HOST_DEVICE float exp_portable(float x) {
  if (x < -80.0f) return 0.0f;
  if (x > 88.0f) return INFINITY;
  if (!(x == x)) return x;  // NaN
  constexpr float kLog2e = 0x1.715476p+0f;
  constexpr float kLn2Hi = 0x1.62e430p-1f;
  constexpr float kLn2Lo = -0x1.05c610p-29f;
  const float n = round_half_even(mul_rn(x, kLog2e));
  float r = fma_rn(-n, kLn2Hi, x);
  r = fma_rn(-n, kLn2Lo, r);
  float p = 0x1.a01a02p-13f;       // 1/7!
  p = fma_rn(p, r, 0x1.6c16c2p-10f);  // 1/6!
  p = fma_rn(p, r, 0x1.111112p-7f);   // 1/5!
  p = fma_rn(p, r, 0x1.555556p-5f);   // 1/4!
  p = fma_rn(p, r, 0x1.555556p-3f);   // 1/3!
  p = fma_rn(p, r, 0.5f);
  p = fma_rn(p, r, 1.0f);
  p = fma_rn(p, r, 1.0f);
  return mul_rn(p, exp2_int(static_cast<int>(n)));
}

// The logistic function 1 / (1 + e^-x), from the same operations (the routers' scores; the
// activations use quant/act_math.h's branch-free one).
MOE_HOST_DEVICE float sigmoid(float x) { return div_rn(1.0f, add_rn(1.0f, exp_portable(-x))); }

// The value by which routers rank a score: NaN ranks as -inf, below every number, so that a NaN
// expert is chosen only after every expert with a number, and then by lowest index as any tie.
// A total order, so that "best" is defined and GPU and CPU pick the same ids on any input.
MOE_HOST_DEVICE float selection_rank(float v) { return v == v ? v : -INFINITY; }

// Number of lanes of the warp-level sums that kernels and references both follow.
constexpr int kWarpLanes = 32;

}  // namespace moe_kernels::pmath
