// Compiled with -ffp-contract=off (CMakeLists.txt): every operation of fp8_math.h stays one IEEE
// rounding, as on the device.
#include <cmath>
#include <vector>

#include "quant/checks.h"
#include "quant/cpu_reference.h"
#include "quant/fp8_math.h"

namespace moe_kernels::cpu {
namespace {

c10::Float8_e4m3fn saturate_to_e4m3(float v) {
  if (!std::isnan(v)) v = std::fmin(std::fmax(v, -fp8::kE4M3Max), fp8::kE4M3Max);
  return c10::Float8_e4m3fn(v);  // round to nearest even
}

c10::Float8_e4m3fn to_e4m3(float y, float inv_scale) { return saturate_to_e4m3(fp8::mul_rn(y, inv_scale)); }

float amax_of(const float* y, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = fp8::max_ignoring_nan(amax, fp8::amax_term(y[i]));
  return amax;
}

// y [M, C] fp32 -> (q [M, C] e4m3, scale [1] or [M, 1]).
std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                                            bool per_token) {
  const int64_t M = y.size(0);
  const int64_t C = y.size(1);
  const float* y_p = y.data_ptr<float>();
  auto q = at::empty({M, C}, y.options().dtype(at::kFloat8_e4m3fn));
  auto* q_p = q.data_ptr<c10::Float8_e4m3fn>();

  if (per_token && !scale.has_value()) {
    auto scales = at::empty({M, 1}, y.options());
    float* s_p = scales.data_ptr<float>();
    for (int64_t r = 0; r < M; ++r) {
      s_p[r] = fp8::scale_from_amax(amax_of(y_p + r * C, C));
      const float inv = fp8::inverse_scale(s_p[r]);
      for (int64_t c = 0; c < C; ++c) q_p[r * C + c] = to_e4m3(y_p[r * C + c], inv);
    }
    return {q, scales};
  }

  // Per tensor: the given scale (static; per_token only selects the granularity of a dynamic
  // scale), or one computed from the whole tensor.
  auto scales = scale.has_value() ? scale->reshape({1}).clone() : at::empty({1}, y.options());
  float* s_p = scales.data_ptr<float>();
  if (!scale.has_value()) s_p[0] = fp8::scale_from_amax(amax_of(y_p, M * C));
  const float inv = fp8::inverse_scale(s_p[0]);
  for (int64_t i = 0; i < M * C; ++i) q_p[i] = to_e4m3(y_p[i], inv);
  return {q, scales};
}

// y [M, C] fp32 -> (q [M, C] e4m3, scales [M, C / g]): each group of g columns of a row gets
// scale max(amax, 1e-10) / 448 (infinities left out of amax) and q = e4m3(saturate(y / scale)).
// column_major: the scales tensor has strides (1, M).
std::tuple<at::Tensor, at::Tensor> quantize_per_group(const at::Tensor& y, int64_t g, bool column_major) {
  const int64_t M = y.size(0);
  const int64_t C = y.size(1);
  const int64_t G = C / g;
  const float* y_p = y.data_ptr<float>();
  auto q = at::empty({M, C}, y.options().dtype(at::kFloat8_e4m3fn));
  auto* q_p = q.data_ptr<c10::Float8_e4m3fn>();
  auto scales = column_major ? at::empty({G, M}, y.options()).t() : at::empty({M, G}, y.options());
  float* s_p = scales.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t j = 0; j < G; ++j) {
      const float* group = y_p + r * C + j * g;
      float amax = 0.0f;
      for (int64_t c = 0; c < g; ++c) amax = fp8::max_ignoring_nan(amax, fp8::amax_term(group[c]));
      const float scale = fp8::group_scale_from_amax(amax);
      s_p[r * scales.stride(0) + j * scales.stride(1)] = scale;
      for (int64_t c = 0; c < g; ++c) q_p[r * C + j * g + c] = saturate_to_e4m3(fp8::div_rn(group[c], scale));
    }
  }
  return {q, scales};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> scaled_fp8_quant(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                    bool per_token) {
  check_quant_args("scaled_fp8_quant", x, scale, /*silu_and_mul=*/false);
  return quantize(x.to(at::kFloat).contiguous(), scale, per_token);
}

std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8(const at::Tensor& x, int64_t group_size,
                                                             bool column_major_scales) {
  const char* op = "per_token_group_quant_fp8";
  const QuantShape s = check_quant_args(op, x, std::nullopt, /*silu_and_mul=*/false);
  check_group_size(op, s, group_size, /*silu_and_mul=*/false);
  return quantize_per_group(x.to(at::kFloat).contiguous(), group_size, column_major_scales);
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x,
                                                          const std::optional<at::Tensor>& scale, bool per_token,
                                                          int64_t group_size, c10::string_view activation,
                                                          bool gate_up_interleaved, double swiglu_alpha,
                                                          double swiglu_limit, const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& expert_offsets) {
  const char* op = "silu_and_mul_quant_fp8";
  const QuantShape s = check_quant_args(op, x, scale, /*silu_and_mul=*/true);
  check_silu_and_mul_mode(scale, per_token, group_size);
  const GatedActSpec act = check_gated_act_args(op, s, x, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                                                bias, expert_offsets);
  if (group_size > 0) check_group_size(op, s, group_size, /*silu_and_mul=*/true);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  auto y = at::empty({s.rows, s.cols}, xf.options());
  gated_act_reference(xf.data_ptr<float>(), s.rows, s.cols, act, y.data_ptr<float>());
  return group_size > 0 ? quantize_per_group(y, group_size, false) : quantize(y, scale, per_token);
}

}  // namespace moe_kernels::cpu
