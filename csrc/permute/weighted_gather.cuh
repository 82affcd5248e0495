// out[t] = sum over kept k of w[t,k] * (rows[index[t,k]] + bias[e]): the reduction of
// moe_unpermute and of ep_post_reorder, which differ only in which k are kept (the Keep policy).
// The bias (moe_unpermute's, optional) is the fp32 [E, H] row of the local expert e that owns the
// source row (row_expert over expert_offsets), added in fp32 before the weight multiplies.
//
// One block per token (grid-stride), kVec elements per access so that each thread moves 16 bytes;
// fp32 accumulators in registers; out is written once. The K source rows and weights of a token
// are staged in shared memory after the filter, so the inner loop has no branches on ids.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/float_convert.cuh"
#include "common/limits.h"
#include "common/portable_math.h"
#include "common/row_expert.h"

namespace moe_kernels {

constexpr int kGatherThreads = 128;

template <typename T, typename W>
struct WeightedGatherParams {
  const T* rows;
  const W* weights;
  const int32_t* index;
  T* out;
  int64_t num_tokens;
  int topk;
  int64_t hidden;
  int64_t num_rows;
  const float* bias;              // [num_experts, hidden] fp32, or nullptr
  const int64_t* expert_offsets;  // [num_experts + 1] with bias
  int64_t num_experts;
};

// moe_unpermute: a choice is kept when it has a row (dropped choices carry -1).
struct KeepMapped {
  __device__ bool operator()(int64_t /*flat*/) const { return true; }
};

// ep_post_reorder: a choice is kept when its expert lies in [start, end].
template <typename IdT>
struct KeepExpertRange {
  const IdT* topk_ids;
  int64_t start;
  int64_t end;
  __device__ bool operator()(int64_t flat) const {
    const IdT e = topk_ids[flat];
    return e >= start && e <= end;
  }
};

// Grid: x walks tokens, y splits the row into slices of kGatherThreads packs, so that small T
// still fills the GPU (T = 16 with H = 7168 gives 16 x 7 blocks). Each thread owns one pack of
// kVec elements of the row and sums its K sources with several loads in flight.
template <typename T, typename W, int kVec, typename Keep>
__global__ void __launch_bounds__(kGatherThreads) weighted_gather_kernel(WeightedGatherParams<T, W> p, Keep keep) {
  struct alignas(sizeof(T) * kVec) Pack { T v[kVec]; };
  __shared__ int32_t rows[kMaxTopK];
  __shared__ float weights[kMaxTopK];
  __shared__ const float* biases[kMaxTopK];  // the kept rows' bias rows (nullptr: none)
  __shared__ int num_kept;
  const int64_t packs_per_row = p.hidden / kVec;
  const int64_t v = static_cast<int64_t>(blockIdx.y) * kGatherThreads + threadIdx.x;
  const int lane = threadIdx.x % 32;

  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < 32) {  // warp 0 compacts the kept choices, in k order (fixed summation order)
      int n = 0;
      for (int k0 = 0; k0 < p.topk; k0 += 32) {
        const int k = k0 + lane;
        const int64_t flat = t * p.topk + k;
        int32_t r = -1;
        // Rows outside [0, R) are skipped: nothing is read out of bounds on bad indices.
        if (k < p.topk) r = p.index[flat];
        const bool kept = r >= 0 && r < p.num_rows && keep(flat);
        const unsigned ballot = __ballot_sync(0xffffffffu, kept);
        if (kept) {
          const int slot = n + __popc(ballot & ((1u << lane) - 1u));
          rows[slot] = r;
          weights[slot] = to_float(p.weights[flat]);
          const int64_t e = p.bias != nullptr ? row_expert(p.expert_offsets, p.num_experts, r) : -1;
          biases[slot] = e >= 0 ? p.bias + e * p.hidden : nullptr;
        }
        n += __popc(ballot);
      }
      if (lane == 0) num_kept = n;
    }
    __syncthreads();
    if (v < packs_per_row) {
      const int n = num_kept;
      float acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
#pragma unroll 8
      for (int k = 0; k < n; ++k) {
        const Pack x = reinterpret_cast<const Pack*>(p.rows + rows[k] * p.hidden)[v];
        const float w = weights[k];
        const float* b = biases[k];
        if (b == nullptr) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] = fmaf(w, to_float(x.v[j]), acc[j]);
        } else {
          b += v * kVec;
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] = fmaf(w, pmath::add_rn(to_float(x.v[j]), b[j]), acc[j]);
        }
      }
      Pack y;
#pragma unroll
      for (int j = 0; j < kVec; ++j) y.v[j] = from_float<T>(acc[j]);
      reinterpret_cast<Pack*>(p.out + t * p.hidden)[v] = y;
    }
    __syncthreads();  // rows[] and num_kept are reused by the next token
  }
}

}  // namespace moe_kernels
