// The CPU reference of the 4-bit grouped GEMMs: the specification of w4_launchers.h as plain
// loops over decoded weights. Pointer-based (no torch types); the glue allocates and calls it.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm/w4_launchers.h"

namespace moe_kernels::w4 {
namespace {

uint16_t bf16_bits(float x) { return static_cast<uint16_t>(bf16_bits_rn(x)); }

// float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111 NaN.
float e4m3_to_float(uint8_t v) {
  const int sign = v >> 7;
  const int exp = (v >> 3) & 0xf;
  const int man = v & 7;
  float mag;
  if (exp == 0xf && man == 7) return NAN;
  if (exp == 0) {
    mag = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  } else {
    mag = std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
  }
  return sign ? -mag : mag;
}

}  // namespace

void grouped_gemm_w4_reference(const W4GemmArgs& p) {
  const int64_t N = p.n;
  const int64_t K = p.k;
  const bool gated = p.activation != Activation::kNone;
  const int64_t out_cols = gated ? N / 2 : N;
  const int group = p.format == WeightFormat::kMxfp4 ? kMxfp4Group : kInt4Group;
  const int64_t groups = K / group;
  auto* out = static_cast<uint16_t*>(p.out);

  std::vector<float> a_row(K);
  std::vector<float> w_dec(N * K);
  std::vector<float> y(N);
  for (int e = 0; e < p.num_experts; ++e) {
    const int64_t begin = p.expert_offsets[e];
    const int64_t end = p.expert_offsets[e + 1];
    if (end <= begin) continue;
    // The expert's weight as the GEMM multiplies it (w4_format.h): a bf16 per code.
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* codes = p.w + (e * N + n) * (K / 2);
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t code = (k % 2 == 0) ? (codes[k / 2] & 0xfu) : (codes[k / 2] >> 4);
        const int64_t s = (e * N + n) * groups + k / group;
        w_dec[n * K + k] = p.format == WeightFormat::kMxfp4
                               ? mxfp4_weight(code, static_cast<const uint8_t*>(p.w_scale)[s])
                               : int4_weight(code, static_cast<const float*>(p.w_scale)[s]);
      }
    }
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        a_row[k] = p.a_dtype == DType::kFloat8E4M3 ? e4m3_to_float(static_cast<const uint8_t*>(p.a)[r * K + k])
                                                   : bf16_bits_to_float(static_cast<const uint16_t*>(p.a)[r * K + k]);
      }
      const float a_scale = p.a_scale ? p.a_scale[p.a_scale_per_row ? r : 0] : 1.0f;
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.0f;
        const float* w = w_dec.data() + n * K;
        for (int64_t k = 0; k < K; ++k) acc += a_row[k] * w[k];
        float v = acc;
        if (p.a_scale) v = v * a_scale;
        if (p.bias) v = v + p.bias[e * N + n];
        y[n] = v;
      }
      for (int64_t j = 0; j < out_cols; ++j) {
        float v;
        if (!gated) {
          v = y[j];
        } else {
          const int64_t g = p.gate_up_interleaved ? 2 * j : j;
          const int64_t u = p.gate_up_interleaved ? 2 * j + 1 : out_cols + j;
          v = gated_activation(p.activation, y[g], y[u], p.swiglu_alpha, p.swiglu_limit);
        }
        out[r * out_cols + j] = bf16_bits(v);
      }
    }
  }
}

}  // namespace moe_kernels::w4
