// CPU implementations of the permute ops: plain loops, written to be read as the specification
// that the CUDA kernels are tested against.
#pragma once

#include "common/stable_glue.h"

#include <optional>
#include <tuple>

namespace moe_kernels::cpu {

std::tuple<Tensor, Tensor, Tensor> moe_sort_tokens(const Tensor& topk_ids, int64_t num_experts,
                                                              const std::optional<Tensor>& expert_map,
                                                              int64_t num_local_experts, int64_t align_block_size);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_permute(
    const Tensor& hidden_states, const Tensor& topk_ids, int64_t num_experts,
    const std::optional<Tensor>& expert_map, int64_t num_local_experts, int64_t align_block_size,
    const std::optional<Tensor>& scales);

// out[t] = sum over kept k of w[t,k] * (rows[index[t,k]] + bias[e]); kept: index >= 0 and, when
// topk_ids is given, start <= topk_ids[t,k] <= end; bias (optional, [num_experts, H] fp32) of the
// expert e owning the row (row_expert over expert_offsets). Accumulates in fp32 in k order.
Tensor weighted_gather(const Tensor& rows, const Tensor& topk_weights, const Tensor& index,
                       const std::optional<Tensor>& topk_ids, int64_t start_expert, int64_t end_expert,
                       const float* bias = nullptr, const int64_t* expert_offsets = nullptr, int64_t num_experts = 0);

Tensor moe_unpermute(const Tensor& permuted, const Tensor& topk_weights, const Tensor& inv_permuted_idx,
                     const std::optional<Tensor>& bias = std::nullopt,
                     const std::optional<Tensor>& expert_offsets = std::nullopt);

std::tuple<Tensor, Tensor> compute_problem_sizes(const Tensor& expert_offsets, int64_t n, int64_t k,
                                                         bool swap_ab);

}  // namespace moe_kernels::cpu
