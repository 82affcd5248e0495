// Dynamic per-group FP8 quantization: each row is cut into groups of group_size columns and every
// group gets its own scale (the 1x128 activation scales of block-scaled FP8 checkpoints).
// per_token_group_quant_fp8 (y = x) and silu_and_mul_quant_fp8 with group_size (y = act(gate,
// up)) share this kernel through the Input policies of fp8_quant.cuh.
//
// A group belongs to `lanes` consecutive lanes of one warp (a power of two, as many as the group
// has vectors, at most 32): with 128-column groups of bf16 (16 vectors of 8 values), a warp
// quantizes two groups per step, each lane loads one 16-byte vector, the group's amax is a 4-step
// shuffle reduction among its 16 lanes, and the values stay in registers until they are stored.
// Groups longer than 32 vectors are walked twice by their 32 lanes (amax, then quantize: the
// second load is an L1/L2 hit). Groups are numbered across rows, so short rows leave no warp idle.
//
// Arithmetic: fp8_math.h (group_scale_from_amax, amax_term), shared with the CPU reference; the
// division by the group's scale through divide_by_scale (the same quotient as the reference's
// IEEE division, fp8_math.h says where and why).
#pragma once

#include <cstdint>

#include "quant/fp8_quant.cuh"

namespace moe_kernels {

template <typename Input>
struct GroupQuantParams {
  Input input;
  int64_t rows;
  int64_t groups_per_row;      // cols / group_size
  int64_t vecs_per_group;      // group_size / kVec
  int lanes;                   // lanes per group: a power of two in [1, 32]
  uint8_t* q;                  // [rows, cols], e4m3 bytes
  float* scales;               // scale of (row r, group g) at r * scale_row_stride + g * scale_group_stride
  int64_t scale_row_stride;    // groups_per_row (row-major scales) or 1 (column-major)
  int64_t scale_group_stride;  // 1 (row-major) or rows (column-major)
};

template <typename Input, int kVec>
__global__ void __launch_bounds__(kQuantThreads) quantize_per_group_kernel(GroupQuantParams<Input> p) {
  const int lane = threadIdx.x % 32;
  const int sub = lane % p.lanes;  // this lane's place in its group
  const int64_t groups = p.rows * p.groups_per_row;
  const int64_t vecs_per_row = p.groups_per_row * p.vecs_per_group;
  const int64_t groups_per_warp = 32 / p.lanes;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x) / 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * (kQuantThreads / 32) * groups_per_warp;
  // The loop bound is the warp's, not the lane's: every lane takes part in every shuffle.
  for (int64_t base = warp * groups_per_warp; base < groups; base += warp_stride) {
    const int64_t g = base + lane / p.lanes;
    const bool valid = g < groups;
    const int64_t r = valid ? g / p.groups_per_row : 0;
    const int64_t col_group = g - r * p.groups_per_row;
    const int64_t first_vec = col_group * p.vecs_per_group;  // vector index inside row r
    const auto row = p.input.row(r);
    float y[kVec];
    float amax = 0.0f;
    for (int64_t v = sub; valid && v < p.vecs_per_group; v += p.lanes) {
      p.input.load(row, first_vec + v, y);
#pragma unroll
      for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, fp8::amax_term(y[j]));
    }
    for (int offset = p.lanes / 2; offset > 0; offset /= 2)  // stays inside the aligned lane group
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (!valid) continue;
    const float scale = fp8::group_scale_from_amax(amax);
    if (sub == 0) p.scales[r * p.scale_row_stride + col_group * p.scale_group_stride] = scale;
    // With at most one vector per lane, y still holds it; otherwise each vector is loaded again.
    const bool reload = p.vecs_per_group > p.lanes;
    const float inv_scale = fp8::inverse_scale(scale);
    for (int64_t v = sub; v < p.vecs_per_group; v += p.lanes) {
      if (reload) p.input.load(row, first_vec + v, y);
      float s[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) s[j] = fp8::divide_by_scale(y[j], scale, inv_scale);
      store_scaled_e4m3<kVec>(p.q + (r * vecs_per_row + first_vec + v) * kVec, s);
    }
  }
}

}  // namespace moe_kernels
