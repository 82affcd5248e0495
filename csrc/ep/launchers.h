// Launchers of the ep/ kernels. Plain C++ (pointers, sizes, a stream): no torch types, so that
// the .cu files compile without torch headers. ep_post_reorder has no launcher here: it is the
// weighted gather of permute/ (launch_weighted_gather with its expert-range filter).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "ep/record_layout.h"

namespace moe_kernels {

enum class PreReorderScale {
  kNone,       // plain copy (output dtype = input dtype)
  kPerTensor,  // quantize to e4m3 with scale[0]
  kPerToken,   // quantize to e4m3 with scale[t]
};

struct PreReorderArgs {
  const void* hidden_states;   // [T, H], `dtype`
  DType dtype;                 // any; float32, float16 or bfloat16 when quantizing
  const int32_t* src2dst;      // [T, K]
  const void* topk_ids;        // [T, K], int32 or int64
  bool ids_int64;
  int64_t start_expert;
  int64_t end_expert;          // inclusive
  int64_t num_tokens;          // T
  int topk;                    // K
  int64_t hidden;              // H
  PreReorderScale scale_mode;
  const float* scale;          // [1] or [T] when quantizing, else nullptr
  void* out;                   // [T*K, H], `dtype` or float8_e4m3fn when quantizing
};

// out[src2dst[t,k]] = convert(hidden_states[t]) for each k with start <= topk_ids[t,k] <= end and
// 0 <= src2dst[t,k] < T*K; convert is the identity or e4m3(saturate(x / scale)).
cudaError_t launch_pre_reorder(const PreReorderArgs& args, cudaStream_t stream);

// ep_dispatch_plan (dispatch_plan.cuh): slots [T, W], counts [W], dropped [1].
struct DispatchPlanArgs {
  const void* topk_ids;        // [T, K], int32 or int64
  bool ids_int64;
  int64_t num_tokens;
  int topk;
  int64_t experts_per_rank;
  int world_size;
  int64_t capacity;            // < 0: variable splits
  int32_t* slots;
  int32_t* counts;
  int32_t* dropped;
};
cudaError_t launch_dispatch_plan(const DispatchPlanArgs& args, cudaStream_t stream);

// ep_pack_records (records.cuh).
struct PackRecordsArgs {
  const void* rows;            // [T, H], layout.row_bytes per row
  const float* scales;         // [T, G] or nullptr
  const float* weights;        // [T, K]
  const void* topk_ids;        // [T, K], int32 or int64
  bool ids_int64;
  const int32_t* slots;        // [T, W]
  const int32_t* counts;       // [W]
  void* records;               // [num_records, layout.record_bytes]
  int64_t num_records;
  RecordLayout layout;
  int64_t num_tokens;
  int world_size;
  int64_t capacity;            // < 0: variable splits
  int64_t experts_per_rank;
};
cudaError_t launch_pack_records(const PackRecordsArgs& args, cudaStream_t stream);

// ep_unpack_records (records.cuh).
struct UnpackRecordsArgs {
  const void* records;         // [N, layout.record_bytes]
  int64_t num_records;
  RecordLayout layout;
  void* rows;                  // [N, H]
  float* scales;               // [N, G]
  float* weights;              // [N, K]
  int32_t* ids;                // [N, K]
};
cudaError_t launch_unpack_records(const UnpackRecordsArgs& args, cudaStream_t stream);

}  // namespace moe_kernels
