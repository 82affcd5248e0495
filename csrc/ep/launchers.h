// Launchers of the ep/ kernels. Plain C++ (pointers, sizes, a stream): no torch types, so that
// the .cu files compile without torch headers. ep_post_reorder has no launcher here: it is the
// weighted gather of permute/ (launch_weighted_gather with its expert-range filter).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"

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

}  // namespace moe_kernels
