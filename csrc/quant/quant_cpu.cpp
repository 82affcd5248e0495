// Compiled with -ffp-contract=off (CMakeLists.txt): every operation of fp8_math.h stays one IEEE
// rounding, as on the device.
#include <cmath>
#include <vector>

#include "quant/checks.h"
#include "quant/cpu_reference.h"
#include "quant/fp8_math.h"

namespace moe_kernels::cpu {
namespace {

Float8_e4m3fn saturate_to_e4m3(float v) {
  if (!std::isnan(v)) v = std::fmin(std::fmax(v, -fp8::kE4M3Max), fp8::kE4M3Max);
  return Float8_e4m3fn(v);  // round to nearest even
}

Float8_e4m3fn to_e4m3(float y, float inv_scale) { return saturate_to_e4m3(fp8::mul_rn(y, inv_scale)); }

float amax_of(const float* y, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = fp8::max_ignoring_nan(amax, fp8::amax_term(y[i]));
  return amax;
}

// x [M, C] (float32/float16/bfloat16, contiguous) as float32 values (exact).
std::vector<float> to_float(const Tensor& x) {
  const int64_t n = x.numel();
  std::vector<float> y(n);
  const void* p = x.const_data_ptr();
  const ScalarType t = x.scalar_type();
  for (int64_t i = 0; i < n; ++i) y[i] = read_as_float(p, t, i);
  return y;
}

// y [M, C] fp32 -> (q [M, C] e4m3, scale [1] or [M, 1]); `like` gives the device (CPU).
std::tuple<Tensor, Tensor> quantize(const float* y_p, int64_t M, int64_t C, const std::optional<Tensor>& scale,
                                    bool per_token, const Tensor& like) {
  Tensor q = empty_on({M, C}, kFloat8, like);
  auto* q_p = ptr<Float8_e4m3fn>(q);

  if (per_token && !scale.has_value()) {
    Tensor scales = empty_on({M, int64_t{1}}, kFloat, like);
    float* s_p = ptr<float>(scales);
    for (int64_t r = 0; r < M; ++r) {
      s_p[r] = fp8::scale_from_amax(amax_of(y_p + r * C, C));
      const float inv = fp8::inverse_scale(s_p[r]);
      for (int64_t c = 0; c < C; ++c) q_p[r * C + c] = to_e4m3(y_p[r * C + c], inv);
    }
    return {q, scales};
  }

  // Per tensor: the given scale (static; per_token only selects the granularity of a dynamic
  // scale; returned as a [1] copy), or one computed from the whole tensor.
  Tensor scales = empty_on({int64_t{1}}, kFloat, like);
  float* s_p = ptr<float>(scales);
  s_p[0] = scale.has_value() ? *cptr<float>(*scale) : fp8::scale_from_amax(amax_of(y_p, M * C));
  const float inv = fp8::inverse_scale(s_p[0]);
  for (int64_t i = 0; i < M * C; ++i) q_p[i] = to_e4m3(y_p[i], inv);
  return {q, scales};
}

// y [M, C] fp32 -> (q [M, C] e4m3, scales [M, C / g]): each group of g columns of a row gets
// scale max(amax, 1e-10) / 448 (infinities left out of amax) and q = e4m3(saturate(y / scale)).
// column_major: the scales tensor has strides (1, M).
std::tuple<Tensor, Tensor> quantize_per_group(const float* y_p, int64_t M, int64_t C, int64_t g, bool column_major,
                                              const Tensor& like) {
  const int64_t G = C / g;
  Tensor q = empty_on({M, C}, kFloat8, like);
  auto* q_p = ptr<Float8_e4m3fn>(q);
  Tensor scales = empty_group_scales(M, G, column_major, like);
  float* s_p = ptr<float>(scales);
  const int64_t s0 = column_major ? 1 : G, s1 = column_major ? M : 1;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t j = 0; j < G; ++j) {
      const float* group = y_p + r * C + j * g;
      float amax = 0.0f;
      for (int64_t c = 0; c < g; ++c) amax = fp8::max_ignoring_nan(amax, fp8::amax_term(group[c]));
      const float scale = fp8::group_scale_from_amax(amax);
      s_p[r * s0 + j * s1] = scale;
      for (int64_t c = 0; c < g; ++c) q_p[r * C + j * g + c] = saturate_to_e4m3(fp8::div_rn(group[c], scale));
    }
  }
  return {q, scales};
}

}  // namespace

std::tuple<Tensor, Tensor> scaled_fp8_quant(const Tensor& x, const std::optional<Tensor>& scale, bool per_token) {
  const QuantShape s = check_quant_args("scaled_fp8_quant", x, scale, /*silu_and_mul=*/false);
  const std::vector<float> y = to_float(x);
  return quantize(y.data(), s.rows, s.cols, scale, per_token, x);
}

std::tuple<Tensor, Tensor> per_token_group_quant_fp8(const Tensor& x, int64_t group_size, bool column_major_scales) {
  const char* op = "per_token_group_quant_fp8";
  const QuantShape s = check_quant_args(op, x, std::nullopt, /*silu_and_mul=*/false);
  check_group_size(op, s, group_size, /*silu_and_mul=*/false);
  const std::vector<float> y = to_float(x);
  return quantize_per_group(y.data(), s.rows, s.cols, group_size, column_major_scales, x);
}

std::tuple<Tensor, Tensor> silu_and_mul_quant_fp8(const Tensor& x, const std::optional<Tensor>& scale, bool per_token,
                                                  int64_t group_size, const std::string& activation,
                                                  bool gate_up_interleaved, double swiglu_alpha, double swiglu_limit,
                                                  const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& expert_offsets) {
  const char* op = "silu_and_mul_quant_fp8";
  const QuantShape s = check_quant_args(op, x, scale, /*silu_and_mul=*/true);
  check_silu_and_mul_mode(scale, per_token, group_size);
  const GatedActSpec act = check_gated_act_args(op, s, x, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                                                bias, expert_offsets);
  if (group_size > 0) check_group_size(op, s, group_size, /*silu_and_mul=*/true);
  const std::vector<float> xf = to_float(x);
  std::vector<float> y(s.rows * s.cols);
  float* y_p = y.data();
  gated_act_reference(xf.data(), s.rows, s.cols, act, y_p);
  return group_size > 0 ? quantize_per_group(y_p, s.rows, s.cols, group_size, false, x)
                        : quantize(y_p, s.rows, s.cols, scale, per_token, x);
}

}  // namespace moe_kernels::cpu
