// ep_pack_records / ep_unpack_records: the one buffer per direction of the expert-parallel
// dispatch. Pack writes, for each (token, destination rank) pair that ep_dispatch_plan gave a slot,
// one record (record_layout.h) = the token's row, its scales, its K weights and K ids; unpack
// splits received records back into contiguous rows, scales, weights and ids for the experts.
//
// Pack scatters by token (as ep_pre_reorder): the row is read once and stored to each of its
// records; the metadata words are copied by one thread each. Unpack is a gather by record. Both
// use grid x for tokens/records and grid y for slices of kRecordThreads row vectors, so that a few
// tokens still fill the GPU.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "ep/record_layout.h"

namespace moe_kernels {

constexpr int kRecordThreads = 128;

template <typename IdT>
struct PackParams {
  const uint8_t* rows;       // [T, row_bytes]
  const float* scales;       // [T, G], or nullptr when G = 0
  const float* weights;      // [T, K]
  const IdT* ids;            // [T, K], written as int32
  const int32_t* slots;      // [T, W]
  const int32_t* counts;     // [W]: read in fixed-capacity mode only
  uint8_t* records;          // [num_records, record_bytes]
  int64_t num_records;
  RecordLayout layout;
  int64_t num_tokens;
  int world_size;
  int64_t capacity;          // < 0: variable splits (every record is written by a token)
  int64_t experts_per_rank;
};

// Metadata word w (0 <= w < G + 2K) of token t, as 4 raw bytes.
template <typename IdT>
__device__ __forceinline__ uint32_t meta_word(const PackParams<IdT>& p, int64_t t, int w) {
  const int G = p.layout.num_scales, K = p.layout.topk;
  if (w < G) return __float_as_uint(p.scales[t * G + w]);
  if (w < G + K) return __float_as_uint(p.weights[t * K + (w - G)]);
  return static_cast<uint32_t>(static_cast<int32_t>(p.ids[t * K + (w - G - K)]));
}

template <int kVecBytes, typename IdT>
__global__ void __launch_bounds__(kRecordThreads) pack_records_kernel(PackParams<IdT> p) {
  using Vec = ByteVec<kVecBytes>;
  __shared__ int32_t dst[kMaxEpRanks];
  __shared__ int num_dst;
  const RecordLayout& l = p.layout;
  const int64_t vecs_per_row = l.row_bytes / kVecBytes;
  const int64_t v = static_cast<int64_t>(blockIdx.y) * kRecordThreads + threadIdx.x;
  const int lane = threadIdx.x % 32;

  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < 32) {  // warp 0 compacts the token's slots (rank order)
      int n = 0;
      for (int d0 = 0; d0 < p.world_size; d0 += 32) {
        const int d = d0 + lane;
        const int32_t s = d < p.world_size ? p.slots[t * p.world_size + d] : -1;
        const bool kept = s >= 0 && s < p.num_records;  // a bad slot is skipped: no write out of bounds
        const unsigned ballot = __ballot_sync(0xffffffffu, kept);
        if (kept) dst[n + __popc(ballot & ((1u << lane) - 1u))] = s;
        n += __popc(ballot);
      }
      if (lane == 0) num_dst = n;
    }
    __syncthreads();
    const int n = num_dst;
    if (n > 0 && v < vecs_per_row) {  // a token that goes nowhere is not read
      const Vec x = reinterpret_cast<const Vec*>(p.rows + t * l.row_bytes)[v];
      for (int i = 0; i < n; ++i) reinterpret_cast<Vec*>(p.records + dst[i] * l.record_bytes)[v] = x;
    }
    if (blockIdx.y == 0) {
      const int words = l.num_scales + 2 * l.topk;  // G + 2K metadata words
      for (int i = threadIdx.x; i < n * words; i += kRecordThreads) {
        const int r = i / words, w = i % words;
        reinterpret_cast<uint32_t*>(p.records + dst[r] * l.record_bytes + l.meta_offset)[w] = meta_word(p, t, w);
      }
    }
    __syncthreads();  // dst[] and num_dst are reused by the next token
  }

  // Fixed capacity: the slots that no token filled still cross the wire, so they must read as
  // "nothing to compute" on the receiver: weight 0, scale 1, and for every id an expert of another
  // rank than the destination (a valid id, which the receiver's expert_map drops). Their rows are
  // left unwritten: no expert reads them.
  if (p.capacity >= 0) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * gridDim.y * kRecordThreads;
    const int64_t first = (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kRecordThreads + threadIdx.x;
    const int G = l.num_scales, K = l.topk;
    for (int64_t r = first; r < p.num_records; r += stride) {
      const int d = static_cast<int>(r / p.capacity);
      if (r % p.capacity < p.counts[d]) continue;
      const int32_t other = static_cast<int32_t>(((d + 1) % p.world_size) * p.experts_per_rank);
      uint32_t* meta = reinterpret_cast<uint32_t*>(p.records + r * l.record_bytes + l.meta_offset);
      for (int w = 0; w < G; ++w) meta[w] = __float_as_uint(1.0f);
      for (int w = G; w < G + K; ++w) meta[w] = __float_as_uint(0.0f);
      for (int w = G + K; w < G + 2 * K; ++w) meta[w] = static_cast<uint32_t>(other);
    }
  }
}

struct UnpackParams {
  const uint8_t* records;    // [N, record_bytes]
  int64_t num_records;       // N
  RecordLayout layout;
  uint8_t* rows;             // [N, row_bytes]
  uint32_t* scales;          // [N, G] fp32 bits
  uint32_t* weights;         // [N, K] fp32 bits
  uint32_t* ids;             // [N, K] int32 bits
};

template <int kVecBytes>
__global__ void __launch_bounds__(kRecordThreads) unpack_records_kernel(UnpackParams p) {
  using Vec = ByteVec<kVecBytes>;
  const RecordLayout& l = p.layout;
  const int G = l.num_scales, K = l.topk;
  const int64_t vecs_per_row = l.row_bytes / kVecBytes;
  const int64_t v = static_cast<int64_t>(blockIdx.y) * kRecordThreads + threadIdx.x;
  for (int64_t r = blockIdx.x; r < p.num_records; r += gridDim.x) {
    const uint8_t* rec = p.records + r * l.record_bytes;
    if (v < vecs_per_row) {
      reinterpret_cast<Vec*>(p.rows + r * l.row_bytes)[v] = reinterpret_cast<const Vec*>(rec)[v];
    }
    if (blockIdx.y == 0) {
      const uint32_t* meta = reinterpret_cast<const uint32_t*>(rec + l.meta_offset);
      for (int w = threadIdx.x; w < G + 2 * K; w += kRecordThreads) {
        if (w < G) {
          p.scales[r * G + w] = meta[w];
        } else if (w < G + K) {
          p.weights[r * K + (w - G)] = meta[w];
        } else {
          p.ids[r * K + (w - G - K)] = meta[w];
        }
      }
    }
  }
}

}  // namespace moe_kernels
