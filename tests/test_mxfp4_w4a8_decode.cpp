// Host check of the kernels' word-level 4-bit decoders (csrc/gemm/w4_format.h: decode8_mxfp4,
// decode8_int4, their host emulation of the bf16x2 intrinsics) against the scalar definitions
// (mxfp4_weight, int4_weight): every code at every nibble position under every E8M0 scale, and
// random words under scales spanning bf16's range; and that the 4-bit epilogue's activations are the
// shared functors of quant/gated_act.h bit for bit (the FP8 layer's, so GELU agrees between the two
// layers). Built and run by tests/test_mxfp4_w4a8.py.
// Prints the number of mismatching elements and exits non-zero on any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

#include "gemm/w4_format.h"
#include "quant/gated_act.h"

using namespace moe_kernels::w4;

namespace {

uint32_t bits_of(float x) { return bf16_bits_rn(x); }

bool same(uint32_t got, uint32_t want) {
  const bool got_nan = (got & 0x7fffu) > 0x7f80u;
  const bool want_nan = (want & 0x7fffu) > 0x7f80u;
  return got_nan || want_nan ? got_nan == want_nan : got == want;
}

uint32_t element(const uint32_t out[4], int j) { return (out[j / 2] >> (16 * (j % 2))) & 0xffffu; }

}  // namespace

int main() {
  std::mt19937 rng(1234);
  long bad = 0, checked = 0;
  auto check_word = [&](uint32_t w, auto decode, auto weight) {
    uint32_t out[4];
    decode(w, out);
    for (int j = 0; j < 8; ++j) {
      const uint32_t code = (w >> (4 * j)) & 0xfu;
      ++checked;
      if (!same(element(out, j), bits_of(weight(code)))) {
        if (bad < 10) std::printf("word %08x element %d: got %04x want %04x\n", w, j, element(out, j), bits_of(weight(code)));
        ++bad;
      }
    }
  };
  for (uint32_t s = 0; s < 256; ++s) {
    const Mxfp4Factors f = mxfp4_factors(s);
    auto decode = [&](uint32_t w, uint32_t out[4]) { decode8_mxfp4(w, f, out); };
    auto weight = [&](uint32_t code) { return mxfp4_weight(code, s); };
    for (uint32_t code = 0; code < 16; ++code)
      for (int pos = 0; pos < 8; ++pos) check_word((rng() & ~(0xfu << (4 * pos))) | (code << (4 * pos)), decode, weight);
    for (int i = 0; i < 64; ++i) check_word(rng(), decode, weight);
  }
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> expo(-140, 120);
  for (int i = 0; i < 4000; ++i) {
    float scale = std::ldexp(mant(rng), expo(rng));
    if (i % 2) scale = -scale;
    const uint32_t sb = int4_scale_bf16x2(scale);
    auto decode = [&](uint32_t w, uint32_t out[4]) { decode8_int4(w, sb, out); };
    auto weight = [&](uint32_t code) { return int4_weight(code, scale); };
    for (int k = 0; k < 8; ++k) check_word(rng(), decode, weight);
  }
  // The activations: random values across the clamp and the erf branches, and the edges.
  namespace act = moe_kernels::act;
  auto bits32 = [](float x) { uint32_t b; std::memcpy(&b, &x, sizeof(b)); return b; };
  auto check_act = [&](float g, float u) {
    const float want[3] = {act::SiluMul{}(g, u), act::GeluMul{}(g, u), act::SwigluOai{1.702f, 7.0f}(g, u)};
    const Activation acts[3] = {Activation::kSilu, Activation::kGelu, Activation::kSwigluOai};
    for (int i = 0; i < 3; ++i) {
      const float got = gated_activation(acts[i], g, u, 1.702f, 7.0f);
      ++checked;
      const bool ok = std::isnan(got) || std::isnan(want[i]) ? std::isnan(got) == std::isnan(want[i])
                                                             : bits32(got) == bits32(want[i]);
      if (!ok) {
        if (bad < 10) std::printf("activation %d at (%g, %g): got %a want %a\n", i, g, u, got, want[i]);
        ++bad;
      }
    }
  };
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int i = 0; i < 100000; ++i) check_act(normal(rng), normal(rng));
  const float edges[] = {0.0f, -0.0f, 1.0f, -1.0f, 7.0f, -7.0f, 12.0f, -12.0f, INFINITY, -INFINITY, NAN};
  for (float g : edges)
    for (float u : edges) check_act(g, u);
  std::printf("checked %ld elements, %ld mismatches\n", checked, bad);
  return bad == 0 ? 0 : 1;
}
