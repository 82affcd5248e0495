// Host emulation of the decode GEMV kernel (csrc/gemm/grouped_gemv_w4.cuh) against the CPU reference
// (grouped_gemm_w4_reference): the kernel body compiled with g++, each warp's 32 lanes run as 32
// threads that meet at a barrier in every warp-wide operation (ballot, shuffle), the grid walked
// in order. It checks the kernel's indexing (expert slots, weight rows of the gated layouts, scale
// groups, K tails, passes of 4/2/1 rows, the epilogue's lanes) on machines without a GPU; the GPU
// tests (tests/test_mxfp4_w4a8_gemv.py) check the real thing. Outputs start as NaN (0xFFFF) so
// that an unwritten element fails; rows past expert_offsets[E] must stay NaN. Built and run by
// tests/test_mxfp4_w4a8_gemv.py; prints one line per case and "N failures", exits non-zero on any.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

// ---- the device built-ins the kernel uses, for one emulated warp ----
namespace emu {
struct Idx {
  unsigned x, y, z;
};
thread_local Idx thread_idx;
Idx block_idx;  // set while no lane runs
std::barrier<>* warp_barrier;
uint32_t lane_words[32];

inline unsigned lane() { return thread_idx.x % 32; }

inline uint32_t exchange(uint32_t mine, int from) {
  lane_words[lane()] = mine;
  warp_barrier->arrive_and_wait();
  const uint32_t got = lane_words[from];
  warp_barrier->arrive_and_wait();
  return got;
}

inline unsigned ballot(unsigned, bool pred) {
  lane_words[lane()] = pred ? 1u : 0u;
  warp_barrier->arrive_and_wait();
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) mask |= lane_words[l] << l;
  warp_barrier->arrive_and_wait();
  return mask;
}

inline float shfl_xor(unsigned, float v, int d) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  const uint32_t r = exchange(b, static_cast<int>(lane() ^ static_cast<unsigned>(d)));
  float f;
  std::memcpy(&f, &r, 4);
  return f;
}

inline float as_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t as_uint(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
template <typename T>
T ldg(const T* p) {
  return *p;
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define __ballot_sync(mask, pred) emu::ballot(mask, pred)
#define __shfl_xor_sync(mask, v, d) emu::shfl_xor(mask, v, d)
#define __popc(x) __builtin_popcount(x)
#define __ffs(x) __builtin_ffs(static_cast<int>(x))
#define __uint_as_float(x) emu::as_float(x)
#define __float_as_uint(x) emu::as_uint(x)
#define __ldg(p) emu::ldg(p)
#define __launch_bounds__(...)

#include "gemm/grouped_gemv_w4.cuh"

using namespace moe_kernels;
using namespace moe_kernels::w4;

namespace {

// The grid of launch_typed, walked block by block, warp by warp, with 32 lane threads.
template <WeightFormat kFormat, typename AT>
void run_emulated(const W4GemmArgs& p) {
  const bool gated = p.activation != Activation::kNone;
  const int out_cols = gated ? p.n / 2 : p.n;
  const int cols_per_cta = gemv::kWarps * (gated ? gemv::kWarpRows / 2 : gemv::kWarpRows);
  const int slices = (out_cols + cols_per_cta - 1) / cols_per_cta;
  const int slots = static_cast<int>(std::min<int64_t>(p.num_experts, p.m));
  if (slots == 0) return;
  // Lane l of every warp is one thread: all 32 walk the same (block, warp) sequence, so their
  // barriers line up; block_idx is only written between two warps (behind a barrier).
  std::barrier<> bar(32);
  emu::warp_barrier = &bar;
  std::vector<std::thread> lanes;
  for (int l = 0; l < 32; ++l)
    lanes.emplace_back([&, l] {
      for (int by = 0; by < slots; ++by)
        for (int bx = 0; bx < slices; ++bx)
          for (int w = 0; w < gemv::kWarps; ++w) {
            if (l == 0) emu::block_idx = {static_cast<unsigned>(bx), static_cast<unsigned>(by), 0};
            bar.arrive_and_wait();
            emu::thread_idx = {static_cast<unsigned>(32 * w + l), 0, 0};
            gemv::grouped_gemv_w4_kernel<kFormat, AT>(p);
            bar.arrive_and_wait();
          }
    });
  for (auto& t : lanes) t.join();
}

float bf16_value(uint16_t h) { return bf16_bits_to_float(h); }

int failures = 0;

struct Case {
  const char* name;
  WeightFormat format;
  bool fp8;
  std::vector<int> rows;
  int n, k;
  Activation act;
  bool interleaved;
  bool bias;
  bool per_row_scale;
};

void run_case(const Case& c, std::mt19937& rng) {
  const int E = static_cast<int>(c.rows.size());
  std::vector<int64_t> off(E + 1, 0);
  for (int e = 0; e < E; ++e) off[e + 1] = off[e] + c.rows[e];
  const int64_t M = off[E] + 2;  // two rows past the experts: never written
  const int N = c.n, K = c.k;
  const int group = c.format == WeightFormat::kMxfp4 ? kMxfp4Group : kInt4Group;
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint8_t> w(static_cast<size_t>(E) * N * K / 2);
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  std::vector<uint8_t> s8(static_cast<size_t>(E) * N * (K / group));
  std::vector<float> s32(s8.size());
  for (size_t i = 0; i < s8.size(); ++i) {
    s8[i] = static_cast<uint8_t>(121 + byte(rng) % 4);
    s32[i] = (0.5f + static_cast<float>(byte(rng)) / 255.0f) * 2.0f / std::sqrt(static_cast<float>(K));
  }
  std::vector<uint16_t> a_bf(static_cast<size_t>(M) * K);
  std::vector<uint8_t> a_f8(static_cast<size_t>(M) * K);
  for (size_t i = 0; i < a_bf.size(); ++i) {
    const float x = normal(rng);
    a_bf[i] = static_cast<uint16_t>(bf16_bits_rn(x));
    a_f8[i] = __nv_fp8_e4m3(x * 8.0f).__x;
  }
  std::vector<float> a_scale(M);
  for (auto& v : a_scale) v = 0.1f + static_cast<float>(byte(rng)) / 1024.0f;
  std::vector<float> bias(static_cast<size_t>(E) * N);
  for (auto& v : bias) v = normal(rng);

  const int out_cols = c.act != Activation::kNone ? N / 2 : N;
  std::vector<uint16_t> want(static_cast<size_t>(M) * out_cols, 0xffff), got(want.size(), 0xffff);
  W4GemmArgs p{};
  p.format = c.format;
  p.a = c.fp8 ? static_cast<const void*>(a_f8.data()) : static_cast<const void*>(a_bf.data());
  p.a_dtype = c.fp8 ? DType::kFloat8E4M3 : DType::kBFloat16;
  p.a_scale = c.fp8 ? a_scale.data() : nullptr;
  p.a_scale_per_row = c.per_row_scale;
  p.w = w.data();
  p.w_scale = c.format == WeightFormat::kMxfp4 ? static_cast<const void*>(s8.data()) : static_cast<const void*>(s32.data());
  p.bias = c.bias ? bias.data() : nullptr;
  p.expert_offsets = off.data();
  p.m = M;
  p.num_experts = E;
  p.n = N;
  p.k = K;
  p.activation = c.act;
  p.gate_up_interleaved = c.interleaved;
  p.swiglu_alpha = 1.702f;
  p.swiglu_limit = 7.0f;
  p.out = want.data();
  grouped_gemm_w4_reference(p);
  p.out = got.data();
  if (c.format == WeightFormat::kMxfp4) {
    if (c.fp8) run_emulated<WeightFormat::kMxfp4, __nv_fp8_e4m3>(p);
    else run_emulated<WeightFormat::kMxfp4, __nv_bfloat16>(p);
  } else {
    run_emulated<WeightFormat::kInt4, __nv_fp8_e4m3>(p);
  }

  // Same exact products, another fp32 order: a bf16 rounding flip at most, plus cancellation.
  float max_abs = 0.0f;
  for (int64_t i = 0; i < off[E] * out_cols; ++i) max_abs = std::max(max_abs, std::fabs(bf16_value(want[i])));
  int bad = 0;
  for (int64_t i = 0; i < M * out_cols; ++i) {
    const bool written_row = i / out_cols < off[E];
    if (!written_row) {
      if (got[i] != 0xffff) ++bad;  // rows past the experts stay untouched
      continue;
    }
    const float g = bf16_value(got[i]), r = bf16_value(want[i]);
    if (!(std::fabs(g - r) <= 1e-2f * std::fabs(r) + 1e-3f * max_abs)) {
      if (bad < 3) std::printf("  %s: element %lld got %g want %g\n", c.name, static_cast<long long>(i), g, r);
      ++bad;
    }
  }
  std::printf("%s: %d bad of %lld\n", c.name, bad, static_cast<long long>(M * out_cols));
  if (bad) ++failures;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const auto mx = WeightFormat::kMxfp4;
  const auto i4 = WeightFormat::kInt4;
  // K: 2080 = 65 chunks of 32 (a lane with 3 chunks, the unrolled step's tail), 2176 = 68 (INT4).
  // N: 84 / 168 gated: not a multiple of a CTA's 16 rows or 8 gated columns.
  const std::vector<Case> cases = {
      {"mxfp4 bf16 plain decode", mx, false, {1, 0, 2, 1}, 84, 2080, Activation::kNone, false, true, true},
      {"mxfp4 bf16 silu split", mx, false, {0, 3, 0, 0, 5}, 168, 2080, Activation::kSilu, false, true, true},
      {"mxfp4 e4m3 swigluoai interleaved", mx, true, {2, 0, 7}, 168, 2080, Activation::kSwigluOai, true, true, true},
      {"mxfp4 e4m3 gelu one expert 9 rows, per-tensor", mx, true, {0, 0, 9, 0}, 168, 96, Activation::kGelu, false,
       false, false},
      {"mxfp4 bf16 M=1", mx, false, {0, 1}, 64, 64, Activation::kNone, false, false, true},
      {"int4 e4m3 plain", i4, true, {1, 0, 2, 1}, 84, 2176, Activation::kNone, false, true, true},
      {"int4 e4m3 swigluoai interleaved", i4, true, {3, 0, 0, 4, 1}, 168, 2176, Activation::kSwigluOai, true, true,
       true},
      {"int4 e4m3 silu split, per-tensor", i4, true, {6, 1}, 72, 256, Activation::kSilu, false, false, false},
      {"mxfp4 all experts empty", mx, false, {0, 0, 0}, 64, 64, Activation::kNone, false, true, true},
  };
  for (const Case& c : cases) run_case(c, rng);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
