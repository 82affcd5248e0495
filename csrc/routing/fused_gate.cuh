// DeepSeek-style grouped top-k routing, one warp per token.
//
// s = sigmoid(scores) or softmax(scores); choice = s + bias (or s). Each group of E/G experts is
// scored by the sum of its two best choices (with a bias, DeepSeek-V3) or by its best choice
// (without, DeepSeek-V2); the topk_group best groups are kept and the topk best choices among
// their experts are taken. The weights are s (not choice) of those experts, optionally
// renormalized, times output_scale; num_shared fused shared-expert slots follow.
//
// The token's s and choice values live in shared memory (E <= kMaxGateExperts); every selection is
// an argmax over (value, index) with the lower index winning ties. All arithmetic goes through
// common/portable_math.h (IEEE steps, a portable exp) and the softmax sum follows a fixed lane
// order that the CPU reference reproduces, so ids and weights equal the reference bit for bit.
#pragma once

#include <cstdint>
#include <math_constants.h>

#include "common/float_convert.cuh"
#include "common/portable_math.h"

namespace moe_kernels {

constexpr int kGateWarps = 4;  // tokens per block

template <typename T, typename B>
struct FusedGateParams {
  const T* scores;
  const B* bias;  // nullptr: no bias
  int64_t num_tokens;
  int num_experts;
  int num_groups;
  int topk_group;
  int topk;
  bool softmax;
  bool renormalize;
  int num_shared;
  float shared_weight;
  float output_scale;
  float* topk_weights;
  int32_t* topk_ids;
};

// An unsigned key whose order is the order of the float values: two single-instruction warp
// reductions (redux.sync, sm_80+) then find the argmax. NaN ranks below everything (it never
// wins a comparison in the CPU reference either); -0 is made +0 so that equal values tie.
__device__ __forceinline__ unsigned order_key(float v) {
  if (v != v) return 0u;
  const unsigned b = __float_as_uint(__fadd_rn(v, 0.0f));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The index holding the largest value across the warp, the lower index winning ties.
__device__ __forceinline__ int warp_argmax_index(float value, int index) {
  const unsigned key = order_key(value);
  const unsigned best = __reduce_max_sync(0xffffffffu, key);
  return static_cast<int>(__reduce_min_sync(0xffffffffu, key == best ? static_cast<unsigned>(index) : 0xffffffffu));
}

// Butterfly sum: every lane ends with the same bits (each step adds the same two values, and
// IEEE addition commutes). The CPU reference replays this order.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = pmath::add_rn(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <typename T, typename B>
__global__ void __launch_bounds__(kGateWarps * 32) fused_gate_kernel(FusedGateParams<T, B> p) {
  extern __shared__ float gate_smem[];  // per warp: s[E], choice[E], group_score[G]
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int E = p.num_experts;
  const int G = p.num_groups;
  const int group_size = E / G;
  float* s = gate_smem + warp * (2 * E + G);
  float* choice = s + E;
  float* group_score = choice + E;
  const float kNegInf = -CUDART_INF_F;

  const int64_t t = static_cast<int64_t>(blockIdx.x) * kGateWarps + warp;
  if (t >= p.num_tokens) return;  // warp-uniform: no block-wide barriers below
  const T* row = p.scores + t * E;

  // Scores -> s. Softmax uses the max for range; the sum is a fixed butterfly (deterministic).
  float row_max = kNegInf;
  for (int e = lane; e < E; e += 32) {
    const float x = to_float(row[e]);
    s[e] = x;
    row_max = fmaxf(row_max, x);
  }
  if (p.softmax) {
    row_max = warp_max(row_max);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) {
      const float x = pmath::exp_portable(pmath::add_rn(s[e], -row_max));
      s[e] = x;
      sum = pmath::add_rn(sum, x);
    }
    const float inv_sum = pmath::div_rn(1.f, warp_sum(sum));
    for (int e = lane; e < E; e += 32) s[e] = pmath::mul_rn(s[e], inv_sum);
  } else {
    for (int e = lane; e < E; e += 32) s[e] = pmath::sigmoid(s[e]);
  }
  for (int e = lane; e < E; e += 32) choice[e] = p.bias ? pmath::add_rn(s[e], to_float(p.bias[e])) : s[e];
  __syncwarp();

  // Group selection (skipped when every group is kept): each lane scores whole groups.
  if (p.topk_group < G) {
    for (int g = lane; g < G; g += 32) {
      float best = kNegInf, second = kNegInf;
      for (int j = 0; j < group_size; ++j) {
        const float c = choice[g * group_size + j];
        if (c > best) {
          second = best;
          best = c;
        } else if (c > second) {
          second = c;
        }
      }
      group_score[g] = p.bias ? pmath::add_rn(best, second) : best;
    }
    __syncwarp();
    // Take the topk_group best groups; a kept group's score becomes NaN (a NaN never wins again).
    for (int round = 0; round < p.topk_group; ++round) {
      float v = kNegInf;
      int g_best = G;
      for (int g = lane; g < G; g += 32) {  // ascending g, strictly greater: lower index wins ties
        const float x = group_score[g];
        if (x > v) {
          v = x;
          g_best = g;
        }
      }
      g_best = warp_argmax_index(v, g_best);
      __syncwarp();
      if (lane == 0 && g_best < G) group_score[g_best] = CUDART_NAN_F;
      __syncwarp();
    }
    for (int e = lane; e < E; e += 32) {
      if (!isnan(group_score[e / group_size])) choice[e] = kNegInf;  // expert of a dropped group
    }
    __syncwarp();
  }

  // Top-k experts by choice; weights from s.
  const int width = p.topk + p.num_shared;
  float* out_w = p.topk_weights + t * width;
  int32_t* out_id = p.topk_ids + t * width;
  // Each lane caches the best of its own experts (e = lane, lane + 32, ...): a round is two warp
  // reductions over the caches, and only the lane that owns the pick rescans (it alone reads and
  // writes its experts' choice values from here on).
  auto lane_best = [&](float& v, int& i) {
    v = kNegInf;
    i = E;
    for (int e = lane; e < E; e += 32) {  // ascending e, strictly greater: lower index wins ties
      const float x = choice[e];
      if (x > v) {
        v = x;
        i = e;
      }
    }
  };
  float my_value;
  int my_expert;
  lane_best(my_value, my_expert);
  float weight_sum = 0.f;
  for (int k = 0; k < p.topk; ++k) {
    int e_best = warp_argmax_index(my_value, my_expert);
    // e_best < E always: the checks guarantee topk <= experts in the kept groups (only NaN scores
    // could leave no candidate).
    if (e_best >= E) e_best = 0;
    const float w = s[e_best];
    weight_sum = pmath::add_rn(weight_sum, w);
    if (lane == 0) {
      out_id[k] = e_best;
      out_w[k] = w;  // rescaled below
    }
    if (lane == e_best % 32) {
      choice[e_best] = kNegInf;
      lane_best(my_value, my_expert);
    }
  }
  __syncwarp();  // lane 0's weights are visible to the lanes that rescale them
  const float scale = pmath::mul_rn(p.renormalize ? pmath::div_rn(1.f, weight_sum) : 1.f, p.output_scale);
  for (int k = lane; k < p.topk; k += 32) out_w[k] = pmath::mul_rn(out_w[k], scale);
  for (int j = lane; j < p.num_shared; j += 32) {
    out_id[p.topk + j] = E + j;
    out_w[p.topk + j] = p.shared_weight;
  }
}

}  // namespace moe_kernels
