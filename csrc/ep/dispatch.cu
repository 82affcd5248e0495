// Launchers of the expert-parallel dispatch kernels (dispatch_plan.cuh, records.cuh): the id type
// and the row vector width are chosen here.
#include <algorithm>

#include "ep/dispatch_plan.cuh"
#include "ep/launchers.h"
#include "ep/records.cuh"

namespace moe_kernels {
namespace {

// As ep_pre_reorder: up to four waves of 128-thread blocks on 132 SMs, each looping over its share.
constexpr int64_t kMaxRecordBlocks = 132 * 16 * 4;

dim3 record_grid(int64_t items, int64_t vecs_per_row) {
  const int64_t slices = std::max<int64_t>(1, ceil_div(vecs_per_row, kRecordThreads));
  const int64_t x = std::max<int64_t>(1, std::min(items, std::max<int64_t>(1, kMaxRecordBlocks / slices)));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(slices));
}

template <int kVecBytes, typename IdT>
cudaError_t launch_pack(const PackRecordsArgs& a, cudaStream_t stream) {
  PackParams<IdT> p{static_cast<const uint8_t*>(a.rows), a.scales, a.weights, static_cast<const IdT*>(a.topk_ids),
                    a.slots, a.counts, static_cast<uint8_t*>(a.records), a.num_records, a.layout, a.num_tokens,
                    a.world_size, a.capacity, a.experts_per_rank};
  // Enough blocks for the tokens, and in fixed-capacity mode for the unfilled records too.
  const int64_t items = std::max<int64_t>(a.num_tokens, a.capacity >= 0 ? ceil_div(a.num_records, kRecordThreads) : 0);
  pack_records_kernel<kVecBytes, IdT><<<record_grid(items, a.layout.row_bytes / kVecBytes), kRecordThreads, 0,
                                        stream>>>(p);
  return cudaGetLastError();
}

template <int kVecBytes>
cudaError_t launch_pack_vec(const PackRecordsArgs& a, cudaStream_t stream) {
  return a.ids_int64 ? launch_pack<kVecBytes, int64_t>(a, stream) : launch_pack<kVecBytes, int32_t>(a, stream);
}

template <int kVecBytes>
cudaError_t launch_unpack(const UnpackRecordsArgs& a, cudaStream_t stream) {
  UnpackParams p{static_cast<const uint8_t*>(a.records), a.num_records, a.layout, static_cast<uint8_t*>(a.rows),
                 reinterpret_cast<uint32_t*>(a.scales), reinterpret_cast<uint32_t*>(a.weights),
                 reinterpret_cast<uint32_t*>(a.ids)};
  unpack_records_kernel<kVecBytes><<<record_grid(a.num_records, a.layout.row_bytes / kVecBytes), kRecordThreads, 0,
                                     stream>>>(p);
  return cudaGetLastError();
}

// The widest access (<= 16 bytes) that divides the row and the base addresses; records are
// 16-byte multiples, so their pitch never limits it.
int row_vec_bytes(int64_t row_bytes, const void* a, const void* b) {
  const void* ptrs[] = {a, b};
  return pick_vec_bytes(row_bytes, ptrs, 2);
}

}  // namespace

cudaError_t launch_dispatch_plan(const DispatchPlanArgs& a, cudaStream_t stream) {
  if (a.ids_int64) {
    DispatchPlanParams<int64_t> p{static_cast<const int64_t*>(a.topk_ids), a.num_tokens, a.topk, a.experts_per_rank,
                                  a.world_size, a.capacity, a.slots, a.counts, a.dropped};
    dispatch_plan_kernel<<<1, kPlanThreads, 0, stream>>>(p);
  } else {
    DispatchPlanParams<int32_t> p{static_cast<const int32_t*>(a.topk_ids), a.num_tokens, a.topk, a.experts_per_rank,
                                  a.world_size, a.capacity, a.slots, a.counts, a.dropped};
    dispatch_plan_kernel<<<1, kPlanThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_pack_records(const PackRecordsArgs& a, cudaStream_t stream) {
  if (a.num_records == 0) return cudaSuccess;
  switch (row_vec_bytes(a.layout.row_bytes, a.rows, a.records)) {
    case 16: return launch_pack_vec<16>(a, stream);
    case 8: return launch_pack_vec<8>(a, stream);
    case 4: return launch_pack_vec<4>(a, stream);
    case 2: return launch_pack_vec<2>(a, stream);
    default: return launch_pack_vec<1>(a, stream);
  }
}

cudaError_t launch_unpack_records(const UnpackRecordsArgs& a, cudaStream_t stream) {
  if (a.num_records == 0) return cudaSuccess;
  switch (row_vec_bytes(a.layout.row_bytes, a.rows, a.records)) {
    case 16: return launch_unpack<16>(a, stream);
    case 8: return launch_unpack<8>(a, stream);
    case 4: return launch_unpack<4>(a, stream);
    case 2: return launch_unpack<2>(a, stream);
    default: return launch_unpack<1>(a, stream);
  }
}

}  // namespace moe_kernels
