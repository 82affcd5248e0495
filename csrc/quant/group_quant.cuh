// Dynamic per-group FP8 quantization: each row is cut into groups of group_size columns and every
// group gets its own scale (the 1x128 activation scales of block-scaled FP8 checkpoints).
// per_token_group_quant_fp8 (y = x) and silu_and_mul_quant_fp8 with group_size (y = act(gate,
// up)) share this kernel through the Input policies of fp8_quant.cuh.
//
// A group belongs to `lanes` consecutive lanes of one warp (a power of two, as many as the group
// has vectors, at most 32): with 128-column groups of bf16 (16 vectors of 8 values), one step of
// a warp covers two groups, each lane loading one 16-byte vector. A lane takes group_items such
// steps at once (8 groups a warp for gated 1x128 bf16, 16 for plain): it issues all their loads, then computes, then
// the groups' amaxes go through their shuffle reductions side by side, and the values, still in
// registers, are stored. Groups longer than 32 vectors are walked twice by a whole warp (amax,
// then quantize: the second load is an L1/L2 hit). Groups are numbered across rows, so short
// rows leave no warp idle.
//
// Arithmetic: fp8_math.h (group_scale_from_amax, amax_term), shared with the CPU reference.
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

// Groups of at most `lanes` vectors (every group of 1x128 and shorter): each lane holds one
// vector of kItems groups, the groups g0 + i * groups_per_item (i < kItems), so that a lane's
// loads of all of them are in flight together; their amaxes are reduced side by side. As in the
// per-token kernel, the gated activations' arithmetic takes most registers: fewer items there,
// so that four blocks (16 warps) fit an SM.
template <typename Input>
constexpr int group_items() { return Input::kCheapCompute ? 8 : 2; }

template <typename Input, int kVec, int kItems = group_items<Input>()>
__device__ __forceinline__ void quantize_group_items(const GroupQuantParams<Input>& p, int64_t g0,
                                                     int64_t groups_per_item, int sub) {
  const int64_t groups = p.rows * p.groups_per_row;
  const int64_t vecs_per_row = p.groups_per_row * p.vecs_per_group;
  typename Input::Raw raw[kItems];
  float y[kItems][kVec];
  float amax[kItems];
  // Group g0 + i * groups_per_item lies in row r, column group c: found from g0's by steps (one
  // 64-bit division per call, not one per item).
  struct Pos {
    int64_t r, c;
  };
  const Pos first{g0 / p.groups_per_row, g0 - (g0 / p.groups_per_row) * p.groups_per_row};
  auto next = [&](Pos& q) {
    q.c += groups_per_item;
    while (q.c >= p.groups_per_row) {
      q.c -= p.groups_per_row;
      ++q.r;
    }
  };
  const bool lane_has_vector = sub < p.vecs_per_group;
  Pos at = first;
#pragma unroll
  for (int i = 0; i < kItems; ++i, next(at)) {
    if (lane_has_vector && g0 + i * groups_per_item < groups)
      p.input.fetch(p.input.row(at.r), at.c * p.vecs_per_group + sub, raw[i]);
  }
  at = first;
#pragma unroll
  for (int i = 0; i < kItems; ++i, next(at)) {
    amax[i] = 0.0f;
    if (lane_has_vector && g0 + i * groups_per_item < groups) {
      p.input.compute(p.input.row(at.r), at.c * p.vecs_per_group + sub, raw[i], y[i]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) amax[i] = fmaxf(amax[i], fp8::amax_term(y[i][j]));
    }
  }
  for (int offset = p.lanes / 2; offset > 0; offset /= 2) {  // stays inside the aligned lane group
#pragma unroll
    for (int i = 0; i < kItems; ++i) amax[i] = fmaxf(amax[i], __shfl_xor_sync(0xffffffffu, amax[i], offset));
  }
  at = first;
#pragma unroll
  for (int i = 0; i < kItems; ++i, next(at)) {
    if (g0 + i * groups_per_item >= groups) break;  // so are the later items
    const float scale = fp8::group_scale_from_amax(amax[i]);
    if (sub == 0) p.scales[at.r * p.scale_row_stride + at.c * p.scale_group_stride] = scale;
    if (!lane_has_vector) continue;
    float s[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[j] = fp8::div_rn(y[i][j], scale);
    store_scaled_e4m3<kVec>(p.q + (at.r * vecs_per_row + at.c * p.vecs_per_group + sub) * kVec, s);
  }
}

template <typename Input, int kVec>
__global__ void __launch_bounds__(kQuantThreads, 4) quantize_per_group_kernel(GroupQuantParams<Input> p) {
  const int lane = threadIdx.x % 32;
  const int sub = lane % p.lanes;  // this lane's place in its group
  const int64_t groups = p.rows * p.groups_per_row;
  const int64_t vecs_per_row = p.groups_per_row * p.vecs_per_group;
  const int64_t groups_per_step = 32 / p.lanes;  // groups a warp covers with one vector per lane
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kQuantThreads / 32);
  if (p.vecs_per_group <= p.lanes) {
    // The loop bound is the warp's, not the lane's: every lane takes part in every shuffle.
    const int64_t groups_per_warp = groups_per_step * group_items<Input>();
    for (int64_t base = warp * groups_per_warp; base < groups; base += warps * groups_per_warp)
      quantize_group_items<Input, kVec>(p, base + lane / p.lanes, groups_per_step, sub);
    return;
  }
  // Longer groups (lanes = 32): each lane walks its vectors of the group twice, amax then
  // quantize (the second load is an L1/L2 hit), in one loop so that the activation's code is
  // emitted once.
  for (int64_t g = warp; g < groups; g += warps) {
    const int64_t r = g / p.groups_per_row;
    const int64_t col_group = g - r * p.groups_per_row;
    const int64_t first_vec = col_group * p.vecs_per_group;  // vector index inside row r
    const auto row = p.input.row(r);
    float amax = 0.0f;
    float scale = 0.0f;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t v = sub; v < p.vecs_per_group; v += 32) {
        float y[kVec];
        p.input.load(row, first_vec + v, y);
        if (pass == 0) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, fp8::amax_term(y[j]));
        } else {
          float s[kVec];
#pragma unroll
          for (int j = 0; j < kVec; ++j) s[j] = fp8::div_rn(y[j], scale);
          store_scaled_e4m3<kVec>(p.q + (r * vecs_per_row + first_vec + v) * kVec, s);
        }
      }
      if (pass == 0) {
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
        scale = fp8::group_scale_from_amax(amax);
        if (sub == 0) p.scales[r * p.scale_row_stride + col_group * p.scale_group_stride] = scale;
      }
    }
  }
}

}  // namespace moe_kernels
