// Routing metadata: which row of the expert-grouped layout each (token, k) choice goes to.
//
// Rows are grouped by local expert in ascending order and, inside an expert, kept in (token, k)
// order: a stable counting sort. The flat list of T*K choices is cut into one contiguous chunk per
// block and, inside a block, one sub-chunk per warp. Inside a warp, __match_any_sync groups the
// lanes that chose the same expert, so a lane's rank among its peers is a popcount: no atomics,
// and the order is deterministic.
//
//   count kernel (only when there are several blocks): each block counts its chunk per expert.
//   place kernel: each block counts its chunk per (warp, expert) again, reads the other blocks'
//     counts to find the expert starts (every block does this small scan itself, so no third
//     launch is needed), then hands out rows walking its chunk in order. Block 0 also writes
//     expert_offsets and the -1 of padding and unused rows.
// With one block (T*K <= kSortChunk) the place kernel alone does everything.
//
// Ids are read in batches of kSortBatch rounds so that several loads are in flight per lane: the
// sort is latency bound.
#pragma once

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "common/cuda_utils.cuh"
#include "common/limits.h"

namespace moe_kernels {

constexpr int kSortBatch = 8;       // rounds of 32 ids loaded before any is used
constexpr int kSortChunk = 4096;    // choices per block (measured: 8192 is slower at T*K >= 32768)

struct SortParams {
  const void* topk_ids;
  const int32_t* expert_map;
  int64_t num_choices;       // T * K
  int num_experts;
  int num_local_experts;
  int align;
  int64_t num_rows;
  int64_t chunk;             // choices per block
  int32_t* block_counts;     // [gridDim.x][E_local], or nullptr with a single block
  int64_t* expert_offsets;
  int32_t* inv_permuted_idx;
  int32_t* permuted_idx;
};

// The local expert of a choice, or -1 when dropped: not local (expert_map -1), or an id out of
// range (a GPU cannot raise on data without a host sync, so bad ids are dropped, never written).
template <typename IdT>
__device__ __forceinline__ int local_expert_of(const SortParams& p, IdT id) {
  if (id < 0 || id >= p.num_experts) return -1;
  if (p.expert_map == nullptr) return static_cast<int>(id);
  const int local = __ldg(p.expert_map + id);
  return (local >= 0 && local < p.num_local_experts) ? local : -1;
}

// Walks the choices [begin, end) of the calling warp in rounds of 32. For every lane in range,
// use(i, expert, rank) sees its choice (expert -1 when dropped) and its rank among the earlier
// lanes of the round with the same expert; then the first lane of each expert group calls
// commit(expert, group size). The barriers order the shared-memory reads of `use` before the
// group leader's update, and that update before the next round.
template <typename IdT, typename Use, typename Commit>
__device__ __forceinline__ void walk_chunk(const SortParams& p, int64_t begin, int64_t end, Use use,
                                           Commit commit) {
  const int lane = threadIdx.x % 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  const IdT* ids = static_cast<const IdT*>(p.topk_ids);
  for (int64_t base = begin; base < end; base += 32 * kSortBatch) {
    int experts[kSortBatch];
#pragma unroll
    for (int r = 0; r < kSortBatch; ++r) {
      const int64_t i = base + r * 32 + lane;
      experts[r] = i < end ? local_expert_of<IdT>(p, ids[i]) : -1;
    }
#pragma unroll
    for (int r = 0; r < kSortBatch; ++r) {
      if (base + r * 32 >= end) break;  // warp-uniform: the rest of the batch is empty
      const int64_t i = base + r * 32 + lane;
      const int e = experts[r];
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      if (i < end) use(i, e, __popc(peers & lanes_below));
      __syncwarp();
      if (e >= 0 && (peers & lanes_below) == 0) commit(e, __popc(peers));
      __syncwarp();
    }
  }
}

__device__ __forceinline__ int64_t clamp_to(int64_t x, int64_t hi) { return x < hi ? x : hi; }

// Counts this block's chunk per (warp, expert) into warp_counts [kWarps][E] (shared memory).
template <typename IdT, int kWarps>
__device__ __forceinline__ void count_block_chunk(const SortParams& p, int32_t* warp_counts, int64_t& begin,
                                                  int64_t& end) {
  const int E = p.num_local_experts;
  const int warp = threadIdx.x / 32;
  const int64_t block_begin = clamp_to(blockIdx.x * p.chunk, p.num_choices);
  const int64_t block_end = clamp_to(block_begin + p.chunk, p.num_choices);
  const int64_t per_warp = (block_end - block_begin + kWarps - 1) / kWarps;
  begin = clamp_to(block_begin + warp * per_warp, block_end);
  end = clamp_to(begin + per_warp, block_end);
  for (int i = threadIdx.x; i < kWarps * E; i += kWarps * 32) warp_counts[i] = 0;
  __syncthreads();
  int32_t* my_counts = warp_counts + warp * E;
  walk_chunk<IdT>(p, begin, end, [](int64_t, int, int) {}, [&](int e, int n) { my_counts[e] += n; });
  __syncthreads();
}

template <typename IdT, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) sort_count_kernel(SortParams p) {
  extern __shared__ int32_t warp_counts[];
  int64_t begin, end;
  count_block_chunk<IdT, kWarps>(p, warp_counts, begin, end);
  const int E = p.num_local_experts;
  for (int e = threadIdx.x; e < E; e += kWarps * 32) {
    int32_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_counts[w * E + e];
    p.block_counts[blockIdx.x * E + e] = total;
  }
}

template <typename IdT, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) sort_place_kernel(SortParams p) {
  constexpr int kThreads = kWarps * 32;
  using BlockScan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  extern __shared__ int32_t warp_counts[];  // [kWarps][E]: counts, then each warp's next row

  allow_dependent_grid();  // the row scatter may launch now; it waits for this grid's results
  int64_t begin, end;
  count_block_chunk<IdT, kWarps>(p, warp_counts, begin, end);
  const int E = p.num_local_experts;

  // Each thread owns a run of at most kPerThread consecutive experts: their sizes over all blocks
  // (for the scan that places the experts) and the rows that earlier blocks take in each. The
  // per-block counts are read once, unrolled, so the loads overlap instead of queueing.
  constexpr int kPerThread = (kMaxSortExperts + kThreads - 1) / kThreads;
  const int e0 = static_cast<int>(threadIdx.x) * kPerThread;
  int64_t total[kPerThread];
  int64_t before[kPerThread];
  int64_t my_rows = 0;
  auto aligned = [&](int64_t n) { return p.align > 0 ? (n + p.align - 1) / p.align * p.align : n; };
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int e = e0 + j;
    total[j] = 0;
    before[j] = 0;
    if (e >= E) continue;
    if (p.block_counts == nullptr) {
      for (int w = 0; w < kWarps; ++w) total[j] += warp_counts[w * E + e];
    } else {
#pragma unroll 8
      for (int b = 0; b < static_cast<int>(gridDim.x); ++b) {
        const int32_t n = p.block_counts[b * E + e];
        before[j] += b < static_cast<int>(blockIdx.x) ? n : 0;
        total[j] += n;
      }
    }
    my_rows += aligned(total[j]);
  }
  int64_t start = 0;
  int64_t used = 0;
  BlockScan(scan_storage).ExclusiveSum(my_rows, start, used);

#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int e = e0 + j;
    if (e >= E) continue;
    int64_t row = start + before[j];
    for (int w = 0; w < kWarps; ++w) {  // counts -> first row of each warp's share
      const int32_t n = warp_counts[w * E + e];
      warp_counts[w * E + e] = static_cast<int32_t>(row);
      row += n;
    }
    if (blockIdx.x == 0) {
      p.expert_offsets[e] = start;
      for (int64_t r = start + total[j]; r < start + aligned(total[j]); ++r) p.permuted_idx[r] = -1;  // padding
    }
    start += aligned(total[j]);
  }
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) p.expert_offsets[E] = used;
    for (int64_t r = used + threadIdx.x; r < p.num_rows; r += kThreads) p.permuted_idx[r] = -1;
  }
  __syncthreads();

  int32_t* my_next = warp_counts + (threadIdx.x / 32) * E;
  auto place = [&](int64_t i, int e, int rank) {
    if (e < 0) {
      p.inv_permuted_idx[i] = -1;
      return;
    }
    const int32_t row = my_next[e] + rank;
    p.inv_permuted_idx[i] = row;
    p.permuted_idx[row] = static_cast<int32_t>(i);
  };
  walk_chunk<IdT>(p, begin, end, place, [&](int e, int n) { my_next[e] += n; });
}

}  // namespace moe_kernels
