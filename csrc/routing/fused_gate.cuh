// DeepSeek-style grouped top-k routing, one warp per token.
//
// s = sigmoid(scores) or softmax(scores); choice = s + bias (or s). Each group of E/G experts is
// scored by the sum of its two best choices (with a bias, DeepSeek-V3) or by its best choice
// (without, DeepSeek-V2); the topk_group best groups are kept and the topk best choices among
// their experts are taken. The weights are s (not choice) of those experts, optionally
// renormalized, times output_scale; num_shared fused shared-expert slots follow.
//
// The token's s and choice values live in registers (E <= kMaxGateExperts); every selection is an
// argmax over (value, index) with the lower index winning ties. All arithmetic goes through
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
// reductions (redux.sync, sm_80+) then find the argmax. NaN ranks as -inf (pmath::selection_rank,
// as in the CPU reference); -0 is made +0 so that equal values tie.
__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned b = __float_as_uint(__fadd_rn(pmath::selection_rank(v), 0.0f));
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

// Lane l holds experts [l * per, (l + 1) * per) in registers (per = ceil(E / 32) <= kPer): a
// blocked layout, so that with groups of a multiple of `per` experts a group is a run of lanes
// and its score is a short butterfly. Shared memory (E + G floats per warp) is used only by the
// general group path.
template <typename T, typename B, int kPer>
__global__ void __launch_bounds__(kGateWarps * 32) fused_gate_kernel(FusedGateParams<T, B> p) {
  extern __shared__ float gate_smem[];  // per warp: choice[E], group_score[G] (general group path)
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int E = p.num_experts;
  const int G = p.num_groups;
  const int group_size = E / G;
  const int per = (E + 31) / 32;
  const int e0 = lane * per;
  const float kNegInf = -CUDART_INF_F;

  const int64_t t = static_cast<int64_t>(blockIdx.x) * kGateWarps + warp;
  if (t >= p.num_tokens) return;  // warp-uniform: no block-wide barriers below
  const T* row = p.scores + t * E;

  float sv[kPer];  // s of this lane's experts
  float cv[kPer];  // choice (s + bias)
  // Bit j: expert e0 + j may still be picked (exists, not picked yet, its group kept). Kept apart
  // from the values, so that an expert whose choice is -inf or NaN is still picked (last, by
  // index) when fewer than topk experts have finite choices: ids stay distinct and in [0, E).
  uint32_t open = 0;
  float row_max = kNegInf;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int e = e0 + j;
    const bool valid = j < per && e < E;
    sv[j] = valid ? to_float(row[e]) : kNegInf;
    row_max = fmaxf(row_max, sv[j]);
  }
  // Scores -> s; the softmax sum runs per lane in expert order, then a butterfly (the CPU
  // reference replays both).
  if (p.softmax) {
    row_max = warp_max(row_max);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (j < per && e0 + j < E) {
        sv[j] = pmath::exp_portable(pmath::add_rn(sv[j], -row_max));
        sum = pmath::add_rn(sum, sv[j]);
      }
    }
    const float inv_sum = pmath::div_rn(1.f, warp_sum(sum));
#pragma unroll
    for (int j = 0; j < kPer; ++j) sv[j] = pmath::mul_rn(sv[j], inv_sum);
  } else {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (j < per) sv[j] = pmath::sigmoid(sv[j]);  // slots past E stay -inf (never picked)
    }
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int e = e0 + j;
    const bool valid = j < per && e < E;
    cv[j] = !valid ? kNegInf : p.bias ? pmath::add_rn(sv[j], to_float(p.bias[e])) : sv[j];
    if (valid) open |= 1u << j;
  }

  // Group selection (skipped when every group is kept).
  if (p.topk_group < G) {
    const int lanes_per_group = group_size / per;
    const bool runs_of_lanes = group_size % per == 0 && (lanes_per_group & (lanes_per_group - 1)) == 0;
    bool kept = false;  // whether this lane's group is kept (all of a lane's experts share a group)
    if (runs_of_lanes) {
      // Top-2 of the lane, then merged across the lanes of the group: selections only, no
      // arithmetic, so the group score is the same sum as in the reference.
      float best = kNegInf, second = kNegInf;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        if (cv[j] > best) {
          second = best;
          best = cv[j];
        } else if (cv[j] > second) {
          second = cv[j];
        }
      }
      for (int offset = 1; offset < lanes_per_group; offset *= 2) {
        const float b = __shfl_xor_sync(0xffffffffu, best, offset);
        const float c = __shfl_xor_sync(0xffffffffu, second, offset);
        second = fmaxf(fminf(best, b), fmaxf(second, c));
        best = fmaxf(best, b);
      }
      const int my_group = e0 < E ? e0 / group_size : G;
      const float score = pmath::selection_rank(p.bias ? pmath::add_rn(best, second) : best);
      // One candidate per group, its first lane; others (and kept groups) offer (-inf, G), which
      // loses to every real group, -inf scored ones included.
      bool candidate = my_group < G && lane % lanes_per_group == 0;
      for (int round = 0; round < p.topk_group; ++round) {
        const int g_best = warp_argmax_index(candidate ? score : kNegInf, candidate ? my_group : G);
        kept = kept || g_best == my_group;
        if (g_best == my_group) candidate = false;
      }
    } else {
      // General grouping: choices through shared memory, each lane scores whole groups.
      float* choice = gate_smem + warp * (E + G);
      float* group_score = choice + E;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        if (j < per && e0 + j < E) choice[e0 + j] = cv[j];
      }
      __syncwarp();
      for (int g = lane; g < G; g += 32) {
        float best = kNegInf, second = kNegInf;
        for (int i = 0; i < group_size; ++i) {
          const float c = choice[g * group_size + i];
          if (c > best) {
            second = best;
            best = c;
          } else if (c > second) {
            second = c;
          }
        }
        // NaN (from inf - inf with an infinite bias) ranks as -inf: NaN below marks kept groups.
        group_score[g] = pmath::selection_rank(p.bias ? pmath::add_rn(best, second) : best);
      }
      __syncwarp();
      for (int round = 0; round < p.topk_group; ++round) {
        float v = kNegInf;
        int g_best = G;
        for (int g = lane; g < G; g += 32) {  // ascending g, strictly greater: lower index wins ties
          const float score = group_score[g];
          if (!isnan(score) && (g_best == G || score > v)) {  // -inf groups are candidates too
            v = score;
            g_best = g;
          }
        }
        g_best = warp_argmax_index(v, g_best);
        __syncwarp();
        if (lane == 0 && g_best < G) group_score[g_best] = CUDART_NAN_F;  // NaN: kept, never wins again
        __syncwarp();
      }
      // A lane's experts may span groups here: mark each expert by its own group.
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int e = e0 + j;
        if (j < per && e < E && !isnan(group_score[e / group_size])) open &= ~(1u << j);
      }
      kept = true;  // already applied per expert
    }
    if (!kept) {
      open = 0;  // the lane's group was dropped
    }
  }

  // Top-k experts by choice; weights from s. Each lane keeps the best of its own experts; a round
  // is two warp reductions, and only the lane owning the pick rescans its registers.
  const int width = p.topk + p.num_shared;
  float* out_w = p.topk_weights + t * width;
  int32_t* out_id = p.topk_ids + t * width;
  // A lane with nothing open offers (-inf, E), which loses to any open expert.
  auto lane_best = [&](float& v, int& i) {
    v = kNegInf;
    i = E;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {  // ascending expert, strictly greater: lower index wins ties
      const float c = pmath::selection_rank(cv[j]);
      if (((open >> j) & 1u) && (i == E || c > v)) {
        v = c;
        i = e0 + j;
      }
    }
  };
  float my_value;
  int my_expert;
  lane_best(my_value, my_expert);
  float weight_sum = 0.f;
  for (int k = 0; k < p.topk; ++k) {
    int e_best = warp_argmax_index(my_value, my_expert);
    // e_best < E always: the checks guarantee topk <= experts in the kept groups, and every open
    // expert is a candidate whatever its value. Kept as a guard against writing an id >= E.
    if (e_best >= E) e_best = 0;
    const int owner = e_best / per;
    float w_local = 0.f;
    if (lane == owner) {
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        if (e0 + j == e_best) {
          w_local = sv[j];
          open &= ~(1u << j);
        }
      }
      lane_best(my_value, my_expert);
    }
    const float w = __shfl_sync(0xffffffffu, w_local, owner);
    weight_sum = pmath::add_rn(weight_sum, w);
    if (lane == 0) {
      out_id[k] = e_best;
      out_w[k] = w;  // rescaled below
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
