// Launchers of the permute/ kernels. Plain C++ (pointers, sizes, a stream): no torch types, so
// that the .cu files compile without torch headers. Each returns the launch's cudaError_t.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/limits.h"

namespace moe_kernels {

struct SortTokensArgs {
  const void* topk_ids;         // [T, K], int32 or int64
  bool ids_int64;
  const int32_t* expert_map;    // [E] or nullptr
  int64_t num_tokens;           // T
  int topk;                     // K
  int num_experts;              // E
  int num_local_experts;        // E_local
  int align_block_size;         // 0: no padding
  int64_t num_rows;             // M
  int64_t* expert_offsets;      // [E_local + 1]
  int32_t* inv_permuted_idx;    // [T, K]
  int32_t* permuted_idx;        // [M]
};
// Scratch (int32 elements) that launch_sort_tokens needs for these sizes; 0 when none.
int64_t sort_tokens_workspace_ints(int64_t num_choices, int num_local_experts);
cudaError_t launch_sort_tokens(const SortTokensArgs& args, void* workspace, cudaStream_t stream);

struct PermuteRowsArgs {
  const void* hidden_states;    // [T, H], any element type: rows are moved as bytes
  void* permuted;               // [M, H]
  int64_t row_bytes;            // H * element size
  int64_t num_tokens;
  int topk;
  int64_t num_rows;             // M
  const int32_t* inv_permuted_idx;  // [T, K]
  const int32_t* permuted_idx;      // [M]
  const int64_t* expert_offsets;    // [E_local + 1]; its last entry bounds the rows in use
  int num_local_experts;
  bool zero_padding_rows;       // align_block_size > 0: padding rows inside the used range get zeros
  const float* scales;          // [T, scales_per_row] fp32 or nullptr: moved with the rows
  float* permuted_scales;       // [M, scales_per_row]
  int64_t scales_per_row;       // 0 without scales
};
cudaError_t launch_permute_rows(const PermuteRowsArgs& args, cudaStream_t stream);

// out[t] = sum_k w[t,k] * (rows[index[t,k]] + bias[e]) over the kept k (fp32 accumulation, one
// write; bias optional, e the local expert owning the row). Kept: index >= 0 (moe_unpermute),
// or, when topk_ids is given, expert in [start, end] (ep_post_reorder). One kernel serves both.
struct WeightedGatherArgs {
  const void* rows;             // [R, H], `dtype`
  const void* topk_weights;     // [T, K], float32 or `dtype`
  bool weights_fp32;
  const int32_t* index;         // [T, K] rows
  const void* topk_ids;         // [T, K] or nullptr: expert-range filter
  bool ids_int64;
  int64_t start_expert;
  int64_t end_expert;           // inclusive
  void* out;                    // [T, H], `dtype`
  DType dtype;                  // float32, float16 or bfloat16
  int64_t num_tokens;
  int topk;
  int64_t hidden;
  int64_t num_rows;             // R: rows past it are never read
  const float* bias = nullptr;  // [num_experts, H] fp32 or nullptr (moe_unpermute's w2 bias)
  const int64_t* expert_offsets = nullptr;  // [num_experts + 1] with bias: rows of each expert
  int64_t num_experts = 0;
};
cudaError_t launch_weighted_gather(const WeightedGatherArgs& args, cudaStream_t stream);

struct ProblemSizesArgs {
  const int64_t* expert_offsets;  // [E_local + 1]
  int num_local_experts;
  int n;
  int k;
  bool swap_ab;
  int32_t* problem_sizes1;      // [E_local, 3]
  int32_t* problem_sizes2;      // [E_local, 3]
};
cudaError_t launch_problem_sizes(const ProblemSizesArgs& args, cudaStream_t stream);

}  // namespace moe_kernels
