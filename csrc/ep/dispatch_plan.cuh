// ep_dispatch_plan: where each (token, destination rank) record goes in the send buffer.
//
// Rank d owns experts [d * experts_per_rank, (d + 1) * experts_per_rank); a token goes once to
// every rank that owns at least one of its choices. Records are grouped by destination and, inside
// a destination, in token order (stable, so the exchange is deterministic). Rank d's segment starts
// at the exclusive prefix sum of the counts (variable splits) or at d * capacity (fixed capacity:
// records past the capacity get no slot and are counted as dropped).
//
// One block: the work is T * K id reads and a prefix sum per rank, a few microseconds at the token
// counts of one layer; one block needs no grid-wide synchronization between the count and the
// placement. Per chunk of kPlanThreads tokens, each warp ballots every rank's bit and the warp
// totals are scanned in shared memory.
#pragma once

#include <cstdint>

#include "ep/record_layout.h"

namespace moe_kernels {

constexpr int kPlanThreads = 1024;
constexpr int kPlanWarps = kPlanThreads / 32;

template <typename IdT>
struct DispatchPlanParams {
  const IdT* topk_ids;       // [T, K]
  int64_t num_tokens;        // T
  int topk;                  // K
  int64_t experts_per_rank;
  int world_size;            // W <= kMaxEpRanks
  int64_t capacity;          // records per destination; < 0: variable splits
  int32_t* slots;            // [T, W] out: record index in the send buffer, or -1
  int32_t* counts;           // [W] out: tokens that want rank d (before the capacity)
  int32_t* dropped;          // [1] out: records that got no slot (fixed capacity), else 0
};

// Bit d set when one of token t's choices is an expert of rank d. Ids outside
// [0, W * experts_per_rank) (e.g. -1 for a padded slot) go nowhere.
template <typename IdT>
__device__ __forceinline__ uint64_t destination_mask(const DispatchPlanParams<IdT>& p, int64_t t) {
  uint64_t mask = 0;
  if (t >= p.num_tokens) return mask;
  const int64_t num_experts = p.experts_per_rank * p.world_size;
  for (int k = 0; k < p.topk; ++k) {
    const int64_t e = static_cast<int64_t>(p.topk_ids[t * p.topk + k]);
    if (e >= 0 && e < num_experts) mask |= uint64_t{1} << (e / p.experts_per_rank);
  }
  return mask;
}

template <typename IdT>
__global__ void __launch_bounds__(kPlanThreads) dispatch_plan_kernel(DispatchPlanParams<IdT> p) {
  __shared__ int64_t first[kMaxEpRanks];               // slot of rank d's first record
  __shared__ int32_t seen[kMaxEpRanks];                // tokens of rank d in earlier chunks
  __shared__ int32_t warp_base[kPlanWarps][kMaxEpRanks];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const unsigned lanes_before = (1u << lane) - 1u;
  const int W = p.world_size;

  if (threadIdx.x < W) seen[threadIdx.x] = 0;
  __syncthreads();
  if (p.capacity < 0) {  // variable splits: the segments start at the prefix sums of the totals
    for (int64_t t0 = 0; t0 < p.num_tokens; t0 += kPlanThreads) {
      const uint64_t mask = destination_mask(p, t0 + threadIdx.x);
      for (int d = 0; d < W; ++d) {
        const int n = __popc(__ballot_sync(0xffffffffu, (mask >> d) & 1));
        if (lane == 0 && n > 0) atomicAdd(&seen[d], n);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t start = 0;
      for (int d = 0; d < W; ++d) {
        first[d] = start;
        start += seen[d];
        seen[d] = 0;
      }
    }
  } else if (threadIdx.x < W) {
    first[threadIdx.x] = threadIdx.x * p.capacity;
  }
  __syncthreads();

  for (int64_t t0 = 0; t0 < p.num_tokens; t0 += kPlanThreads) {
    const int64_t t = t0 + threadIdx.x;
    const uint64_t mask = destination_mask(p, t);
    for (int d = 0; d < W; ++d) {
      const unsigned ballot = __ballot_sync(0xffffffffu, (mask >> d) & 1);
      if (lane == 0) warp_base[warp][d] = __popc(ballot);
    }
    __syncthreads();
    if (threadIdx.x < W) {  // exclusive scan of the warp totals, continuing from earlier chunks
      const int d = threadIdx.x;
      int32_t running = seen[d];
      for (int w = 0; w < kPlanWarps; ++w) {
        const int32_t n = warp_base[w][d];
        warp_base[w][d] = running;
        running += n;
      }
      seen[d] = running;
    }
    __syncthreads();
    for (int d = 0; d < W; ++d) {
      const bool wanted = (mask >> d) & 1;
      const unsigned ballot = __ballot_sync(0xffffffffu, wanted);
      if (t < p.num_tokens) {
        int32_t slot = -1;
        if (wanted) {
          const int64_t i = warp_base[warp][d] + __popc(ballot & lanes_before);
          if (p.capacity < 0 || i < p.capacity) slot = static_cast<int32_t>(first[d] + i);
        }
        p.slots[t * W + d] = slot;
      }
    }
    __syncthreads();  // warp_base is rewritten by the next chunk
  }

  if (threadIdx.x < W) p.counts[threadIdx.x] = seen[threadIdx.x];
  if (threadIdx.x == 0) {
    int32_t dropped = 0;
    if (p.capacity >= 0) {
      for (int d = 0; d < W; ++d) dropped += seen[d] > p.capacity ? seen[d] - static_cast<int32_t>(p.capacity) : 0;
    }
    *p.dropped = dropped;
  }
}

}  // namespace moe_kernels
