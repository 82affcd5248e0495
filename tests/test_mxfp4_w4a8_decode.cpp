// Host check of the kernels' word-level 4-bit decoders (csrc/gemm/w4_format.h: decode8_mxfp4,
// decode8_int4, their host emulation of the bf16x2 intrinsics) against the scalar definitions
// (mxfp4_weight, int4_weight): every code at every nibble position under every E8M0 scale, and
// random words under scales spanning bf16's range. Built and run by tests/test_mxfp4_w4a8.py.
// Prints the number of mismatching elements and exits non-zero on any.
#include <cstdint>
#include <cstdio>
#include <random>

#include "gemm/w4_format.h"

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
  std::printf("checked %ld elements, %ld mismatches\n", checked, bad);
  return bad == 0 ? 0 : 1;
}
