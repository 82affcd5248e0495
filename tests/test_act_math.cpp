// Host check of the activations' elementary functions (csrc/quant/act_math.h) and of the per-group
// quantization's division (fp8::divide_by_scale, fp8_math.h), which the CUDA kernels run and the
// CPU references do not all share:
// - divide_by_scale(y, s, 1/s) equals the IEEE quotient y / s (what the CPU reference of the
//   per-group quantization computes) wherever |y / s| >= 2^-12, on random pairs of the per-group
//   range (s = max(amax, 1e-10) / 448, |y| <= amax), an e4m3 zero of the same sign below, and
//   at +-0, +-inf and NaN;
// - exp_clamped within 2 ulp of exp, reciprocal_from_one within 0.5006 ulp of 1/d, on random
//   arguments of their ranges; silu and sigmoid at their special values.
// Built with -ffp-contract=off (as the CPU references) and run by tests/test_act_math.py.
// Prints "<n> mismatches" and exits non-zero on any.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>

#include "quant/act_math.h"
#include "quant/fp8_math.h"

namespace act = moe_kernels::act;
namespace fp8 = moe_kernels::fp8;

namespace {

long failures = 0;

void expect(bool ok, const char* what, double a, double b) {
  if (ok) return;
  if (failures < 10) std::printf("FAIL %s: %a %a\n", what, a, b);
  ++failures;
}

double ulps(float got, double want) {
  const float w = static_cast<float>(want);
  return std::fabs(static_cast<double>(got) - want) / (std::nextafter(w, INFINITY) - w);
}

}  // namespace

int main() {
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-40, 40);

  for (int i = 0; i < 20000000; ++i) {
    const float amax = std::ldexp(1.0f + unit(rng), exponent(rng));
    const float scale = fp8::group_scale_from_amax(amax);
    float y = amax * unit(rng);
    if (i % 7 == 0) y = amax;
    if (i % 2) y = -y;
    if (i % 11 == 0) y = std::ldexp(y, -100);  // tiny quotients
    const float want = y / scale;
    const float got = fp8::divide_by_scale(y, scale, fp8::inverse_scale(scale));
    if (std::fabs(want) >= 0x1p-12f) {
      expect(got == want, "divide_by_scale", got, want);
    } else {  // an e4m3 zero of the same sign either way
      expect(std::fabs(got) < 0x1p-11f && std::signbit(got) == std::signbit(want), "divide_by_scale tiny", got, want);
    }
  }
  for (float z : {0.0f, -0.0f}) {  // the sign of a zero quotient, as the division gives it
    const float sc = fp8::group_scale_from_amax(2.0f);
    const float got = fp8::divide_by_scale(z, sc, fp8::inverse_scale(sc));
    expect(got == 0.0f && std::signbit(got) == std::signbit(z), "divide_by_scale(+-0)", got, z);
  }
  const float s = fp8::group_scale_from_amax(3.0f);
  expect(fp8::divide_by_scale(INFINITY, s, fp8::inverse_scale(s)) == INFINITY, "divide_by_scale(+inf)", 0, 0);
  expect(fp8::divide_by_scale(-INFINITY, s, fp8::inverse_scale(s)) == -INFINITY, "divide_by_scale(-inf)", 0, 0);
  expect(std::isnan(fp8::divide_by_scale(NAN, s, fp8::inverse_scale(s))), "divide_by_scale(nan)", 0, 0);

  std::uniform_real_distribution<float> arg(-80.0f, 80.0f);
  double worst_exp = 0.0;
  double worst_rcp = 0.0;
  for (int i = 0; i < 4000000; ++i) {
    const float x = i % 2 ? arg(rng) : arg(rng) / 40.0f;
    worst_exp = std::fmax(worst_exp, ulps(act::exp_clamped(x), std::exp(static_cast<double>(x))));
    const float d = i % 2 ? 1.0f + unit(rng) : std::exp(unit(rng) * 80.0f);
    worst_rcp = std::fmax(worst_rcp, ulps(act::reciprocal_from_one(d), 1.0 / d));
  }
  expect(worst_exp <= 2.0, "exp_clamped ulps", worst_exp, 2.0);
  expect(worst_rcp <= 0.5006, "reciprocal_from_one ulps", worst_rcp, 0.5006);
  std::printf("exp_clamped within %.3f ulp, reciprocal_from_one within %.4f ulp\n", worst_exp, worst_rcp);

  expect(act::exp_clamped(-1000.0f) == act::exp_clamped(-80.0f), "exp clamps below", 0, 0);
  expect(act::exp_clamped(1000.0f) == act::exp_clamped(80.0f), "exp clamps above", 0, 0);
  const float minus_inf = act::silu(-INFINITY);
  expect(minus_inf == 0.0f && std::signbit(minus_inf), "silu(-inf) = -0", minus_inf, 0);
  expect(act::silu(-81.0f) == 0.0f, "silu(-81) = -0", act::silu(-81.0f), 0);
  expect(act::silu(INFINITY) == INFINITY, "silu(+inf)", act::silu(INFINITY), INFINITY);
  expect(std::isnan(act::silu(NAN)), "silu(nan)", act::silu(NAN), NAN);
  expect(act::silu(100.0f) == 100.0f, "silu(100)", act::silu(100.0f), 100);
  expect(act::sigmoid(0.0f) == 0.5f, "sigmoid(0)", act::sigmoid(0.0f), 0.5);
  for (float g : {-20.0f, -3.5f, -0.25f, 0.0f, 0.7f, 4.0f, 30.0f}) {
    const double want = g / (1.0 + std::exp(-static_cast<double>(g)));
    expect(ulps(act::silu(g), want) <= 4.0, "silu within 4 ulp", act::silu(g), want);
  }
  std::printf("%ld mismatches\n", failures);
  return failures == 0 ? 0 : 1;
}
