// Argument checks of the permute ops, shared by the CUDA and the CPU implementations so that both
// reject the same inputs with the same messages.
#pragma once

#include "common/stable_glue.h"

#include <optional>

namespace moe_kernels {

struct SortShape {
  int64_t num_tokens;         // T
  int64_t topk;               // K
  int64_t num_local_experts;  // E_local, resolved (E when there is no expert_map)
  int64_t num_rows;           // M, a static upper bound: shapes never depend on data
};

SortShape check_sort_args(const char* op, const Tensor& topk_ids, int64_t num_experts,
                          const std::optional<Tensor>& expert_map, int64_t num_local_experts,
                          int64_t align_block_size);

void check_permute_hidden(const char* op, const Tensor& hidden_states, const Tensor& topk_ids);

// The scales that travel with moe_permute's rows: [T] or [T, 1] (per token), or [T, G] (per group
// of columns), float32, contiguous, on hidden_states' device. Returns G (1 per token).
int64_t check_permute_scales(const char* op, const Tensor& scales, const Tensor& hidden_states);

// Checks of a weighted gather (moe_unpermute, ep_post_reorder): rows [R,H], weights [T,K],
// index [T,K] int32.
void check_weighted_gather_args(const char* op, const char* rows_name, const Tensor& rows,
                                const Tensor& topk_weights, const Tensor& index, const char* index_name);

// moe_unpermute's bias [E, H] float32 and expert_offsets [E + 1] int64 (both or neither),
// contiguous, on permuted's device.
void check_unpermute_bias(const char* op, const Tensor& permuted, const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& expert_offsets);

void check_problem_sizes_args(const Tensor& expert_offsets, int64_t n, int64_t k);

}  // namespace moe_kernels
