// Routing metadata in one block: which row of the expert-grouped layout each (token, k) goes to.
//
// Rows are grouped by local expert in ascending order and, inside an expert, kept in (token, k)
// order (a stable counting sort). The flat list of T*K choices is cut into one contiguous chunk
// per warp; each warp counts its chunk per expert, a scan over (expert, warp) turns the counts
// into each warp's first row per expert, and each warp walks its chunk again handing out rows.
// Inside a warp, __match_any_sync groups lanes with the same expert, so the rank of a lane among
// its peers is a popcount: no atomics, and the order is deterministic.
//
// A single block keeps everything in shared memory and needs no grid-wide sync; the ids are read
// in batches of kBatch rounds so that many loads are in flight per lane (the sort is latency
// bound, and at T*K = 131072 it stays a few percent of the data movement that follows it).
#pragma once

#include <cstdint>
#include <cub/block/block_scan.cuh>

namespace moe_kernels {

constexpr int kSortWarps = 32;
constexpr int kSortThreads = kSortWarps * 32;
constexpr int kSortBatch = 8;  // rounds of 32 ids loaded before any is used

struct SortParams {
  const void* topk_ids;
  const int32_t* expert_map;
  int64_t num_choices;  // T * K
  int num_experts;
  int num_local_experts;
  int align;
  int64_t num_rows;
  int64_t* expert_offsets;
  int32_t* inv_permuted_idx;
  int32_t* permuted_idx;
};

// The local expert of choice i, or -1 when dropped: not local (expert_map -1), or an id out of
// range (a GPU cannot raise on data without a host sync, so bad ids are dropped, never written).
template <typename IdT>
__device__ __forceinline__ int local_expert_of(const SortParams& p, IdT id) {
  if (id < 0 || id >= p.num_experts) return -1;
  if (p.expert_map == nullptr) return static_cast<int>(id);
  int local = __ldg(p.expert_map + id);
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

template <typename IdT>
__global__ void __launch_bounds__(kSortThreads) sort_tokens_kernel(SortParams p) {
  using BlockScan = cub::BlockScan<int64_t, kSortThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  extern __shared__ int32_t warp_counts[];  // [kSortWarps][E_local], later each warp's next row

  const int E = p.num_local_experts;
  const int warp = threadIdx.x / 32;
  const int64_t chunk = (p.num_choices + kSortWarps - 1) / kSortWarps;
  const int64_t begin = warp * chunk < p.num_choices ? warp * chunk : p.num_choices;
  const int64_t end = begin + chunk < p.num_choices ? begin + chunk : p.num_choices;
  int32_t* my_counts = warp_counts + warp * E;

  for (int i = threadIdx.x; i < kSortWarps * E; i += kSortThreads) warp_counts[i] = 0;
  __syncthreads();

  // Pass 1: per-warp counts.
  auto add_to_count = [&](int e, int n) { my_counts[e] += n; };
  walk_chunk<IdT>(p, begin, end, [](int64_t, int, int) {}, add_to_count);
  __syncthreads();

  // Each thread owns a run of consecutive experts for the scan.
  const int per_thread = (E + kSortThreads - 1) / kSortThreads;
  const int e0 = min(E, static_cast<int>(threadIdx.x) * per_thread);
  const int e1 = min(E, e0 + per_thread);
  int64_t my_rows = 0;
  for (int e = e0; e < e1; ++e) {
    int64_t total = 0;
    for (int w = 0; w < kSortWarps; ++w) total += warp_counts[w * E + e];
    my_rows += p.align > 0 ? (total + p.align - 1) / p.align * p.align : total;
  }
  int64_t start = 0;
  int64_t used = 0;
  BlockScan(scan_storage).ExclusiveSum(my_rows, start, used);

  for (int e = e0; e < e1; ++e) {
    p.expert_offsets[e] = start;
    int64_t row = start;
    for (int w = 0; w < kSortWarps; ++w) {  // counts -> first row of each warp's share
      const int32_t n = warp_counts[w * E + e];
      warp_counts[w * E + e] = static_cast<int32_t>(row);
      row += n;
    }
    const int64_t segment_end = p.align > 0 ? start + (row - start + p.align - 1) / p.align * p.align : row;
    for (int64_t r = row; r < segment_end; ++r) p.permuted_idx[r] = -1;  // alignment padding
    start = segment_end;
  }
  if (threadIdx.x == 0) p.expert_offsets[E] = used;
  for (int64_t r = used + threadIdx.x; r < p.num_rows; r += kSortThreads) p.permuted_idx[r] = -1;
  __syncthreads();

  // Pass 2: hand out rows in (token, k) order.
  auto place = [&](int64_t i, int e, int rank) {
    if (e < 0) {
      p.inv_permuted_idx[i] = -1;
      return;
    }
    const int32_t row = my_counts[e] + rank;
    p.inv_permuted_idx[i] = row;
    p.permuted_idx[row] = static_cast<int32_t>(i);
  };
  walk_chunk<IdT>(p, begin, end, place, add_to_count);
}

}  // namespace moe_kernels
