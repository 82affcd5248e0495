// The gated activations of an MoE expert, y = act(gate, up), on GEMM1's output: one functor per
// activation, shared by the CUDA kernels (fp8_quant.cuh's GatedInput) and the CPU reference
// (gated_act_reference below), so that both compute the same fp32 operations and give the same
// bytes. Compiles as CUDA (host and device) and as plain C++ (the CPU side is compiled with
// -ffp-contract=off, as the rest of quant/'s reference).
//
//   silu:      silu(gate) * up,                       silu(g) = g * sigmoid(g) = g / (1 + e^-g)
//   gelu:      gelu(gate) * up,                       gelu(g) = g/2 * (1 + erf(g / sqrt(2)))  (exact, erf)
//   swigluoai: g = min(gate, limit); u = clamp(up, -limit, limit);
//              (u + 1) * (g * sigmoid(alpha * g))     (gpt-oss; alpha 1.702, limit 7 there)
//
// Layout of a row of 2I values: gate in [0, I) and up in [I, 2I) (concatenated, vLLM's w13), or
// gate at even and up at odd positions (interleaved, gpt-oss's gate_up_proj). A per-expert fp32
// bias [E, 2I] in the same order as the row is added to each value (one fp32 addition) before the
// activation; a row's expert comes from expert_offsets (row_expert).
#pragma once

#include <cstdint>

#include "common/portable_math.h"
#include "common/row_expert.h"
#include "quant/act_math.h"
#include "quant/fp8_math.h"

namespace moe_kernels {

// Which activation: the string names of the public API map to these.
enum class GatedActivation { kSilu = 0, kGelu = 1, kSwigluOai = 2 };

// What the gated activation of a row needs besides its values.
struct GatedActSpec {
  GatedActivation activation = GatedActivation::kSilu;
  bool interleaved = false;       // gate/up alternate in a row (else two halves)
  float swiglu_alpha = 1.702f;
  float swiglu_limit = 7.0f;
  const float* bias = nullptr;    // [num_experts, 2 * cols] fp32, the row's order, or nullptr
  const int64_t* expert_offsets = nullptr;  // [num_experts + 1] when bias is given
  int64_t num_experts = 0;
};

namespace act {

using namespace moe_kernels::pmath;

// erf and erfc from IEEE operations only (the device erff and the host std::erf differ in the last
// bits, which would flip e4m3 roundings between the CUDA op and its reference). Least-squares fits
// in float64 against an exact erf, coefficients rounded to fp32:
// - |x| < 1: erf(x) = x * P(x^2), P of degree 6 (measured 1.8e-7 relative);
// - a >= 1: erfc(a) = e^(R(1/a) - a^2) / a, R of degree 9 fitted on [1, 10] to log(a erfc(a) e^(a^2))
//   (smooth in 1/a), so that the small erfc keeps its relative accuracy (3e-7 measured; the
//   rounding of a^2 adds up to 6e-8 * a^2 relative); below e^-80 it is 0 (exp_portable).
MOE_HOST_DEVICE float erf_small(float a) {  // |a| < 1
  const float s = mul_rn(a, a);
  float p = 0x1.4fd5fap-14f;
  p = fma_rn(p, s, -0x1.a63fe2p-11f);
  p = fma_rn(p, s, 0x1.545368p-8f);
  p = fma_rn(p, s, -0x1.b80286p-6f);
  p = fma_rn(p, s, 0x1.ce2d7cp-4f);
  p = fma_rn(p, s, -0x1.812740p-2f);
  p = fma_rn(p, s, 0x1.20dd76p+0f);
  return mul_rn(p, a);
}

MOE_HOST_DEVICE float erfc_large(float a) {  // a >= 1 (+inf gives 0)
  if (a > 10.0f) return 0.0f;  // erfc(10) = 2e-45: below the smallest normal float
  const float s = div_rn(1.0f, a);
  float r = -0x1.ea5594p-6f;
  r = fma_rn(r, s, 0x1.0eb876p-2f);
  r = fma_rn(r, s, -0x1.e30b44p-1f);
  r = fma_rn(r, s, 0x1.d50ed2p+0f);
  r = fma_rn(r, s, -0x1.0dc07ap+1f);
  r = fma_rn(r, s, 0x1.560512p+0f);
  r = fma_rn(r, s, -0x1.2af5bap-3f);
  r = fma_rn(r, s, -0x1.ed7748p-2f);
  r = fma_rn(r, s, -0x1.446a3cp-10f);
  r = fma_rn(r, s, -0x1.25085cp-1f);
  return div_rn(exp_portable(add_rn(r, -mul_rn(a, a))), a);
}

MOE_HOST_DEVICE float erf_portable(float x) {
  if (!(x == x)) return x;  // NaN
  const float a = abs_f(x);
  const float r = a < 1.0f ? erf_small(a) : add_rn(1.0f, -erfc_large(a));
  return x < 0.0f ? -r : r;
}

// 1 + erf(x), without the cancellation of 1 + erf(x) at negative x (where it is erfc(-x), small):
// GELU's factor, accurate relative to itself on both sides.
MOE_HOST_DEVICE float one_plus_erf(float x) {
  if (x >= 0.0f) return add_rn(1.0f, erf_portable(x));
  const float a = -x;
  return a < 1.0f ? add_rn(1.0f, -erf_small(a)) : erfc_large(a);
}

// gelu(g) = g/2 * (1 + erf(g / sqrt(2))), torch.nn.functional.gelu's default (approximate="none").
// At -inf its limit -0 (the formula gives -inf * 0 = NaN), as silu here: an infinite activation
// saturates downstream instead of turning into NaN.
MOE_HOST_DEVICE float gelu(float g) {
  if (g == -INFINITY) return -0.0f;
  if (!(g == g)) return g;
  constexpr float kSqrtHalf = 0x1.6a09e6p-1f;  // 1 / sqrt(2)
  return mul_rn(mul_rn(g, 0.5f), one_plus_erf(mul_rn(g, kSqrtHalf)));
}

struct SiluMul {
  static SiluMul make(const GatedActSpec&) { return {}; }
  MOE_HOST_DEVICE float operator()(float gate, float up) const { return mul_rn(act::silu(gate), up); }
};

struct GeluMul {
  static GeluMul make(const GatedActSpec&) { return {}; }
  MOE_HOST_DEVICE float operator()(float gate, float up) const { return mul_rn(gelu(gate), up); }
};

// gpt-oss's experts (transformers' GptOssExperts._apply_gate), in its order of operations:
// glu = g * sigmoid(g * alpha); out = (u + 1) * glu. The clamps keep NaN (as torch.clamp does):
// comparisons, not fminf/fmaxf, which would replace a NaN by the limit.
struct SwigluOai {
  float alpha;
  float limit;
  static SwigluOai make(const GatedActSpec& s) { return {s.swiglu_alpha, s.swiglu_limit}; }
  MOE_HOST_DEVICE float operator()(float gate, float up) const {
    const float g = gate > limit ? limit : gate;
    const float u = up > limit ? limit : (up < -limit ? -limit : up);
    const float glu = mul_rn(g, act::sigmoid(mul_rn(g, alpha)));
    return mul_rn(add_rn(u, 1.0f), glu);
  }
};

// Calls f(functor) with the functor of `activation` (host side: the CPU reference; the CUDA
// launcher instantiates its kernels per functor).
template <typename F>
inline auto with_activation(const GatedActSpec& s, F&& f) {
  switch (s.activation) {
    case GatedActivation::kGelu: return f(GeluMul::make(s));
    case GatedActivation::kSwigluOai: return f(SwigluOai::make(s));
    default: return f(SiluMul::make(s));
  }
}

}  // namespace act

// Column c of y: the positions of its gate and up values in a row of 2 * cols.
MOE_HOST_DEVICE int64_t gate_pos(bool interleaved, int64_t cols, int64_t c) { return interleaved ? 2 * c : c; }
MOE_HOST_DEVICE int64_t up_pos(bool interleaved, int64_t cols, int64_t c) { return interleaved ? 2 * c + 1 : cols + c; }

// The CPU reference of the activation: x [rows, 2 * cols] fp32 -> y [rows, cols] fp32; plain loops.
template <typename Act>
inline void gated_act_rows(const float* x, int64_t rows, int64_t cols, const GatedActSpec& s, Act act, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * 2 * cols;
    const float* br = nullptr;
    if (s.bias != nullptr) {
      const int64_t e = row_expert(s.expert_offsets, s.num_experts, r);
      if (e >= 0) br = s.bias + e * 2 * cols;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t gi = gate_pos(s.interleaved, cols, c);
      const int64_t ui = up_pos(s.interleaved, cols, c);
      const float g = br ? pmath::add_rn(xr[gi], br[gi]) : xr[gi];
      const float u = br ? pmath::add_rn(xr[ui], br[ui]) : xr[ui];
      y[r * cols + c] = act(g, u);
    }
  }
}

inline void gated_act_reference(const float* x, int64_t rows, int64_t cols, const GatedActSpec& s, float* y) {
  act::with_activation(s, [&](auto fn) { gated_act_rows(x, rows, cols, s, fn, y); });
}

}  // namespace moe_kernels
