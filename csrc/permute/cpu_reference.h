// CPU implementations of the permute ops: plain loops, written to be read as the specification
// that the CUDA kernels are tested against.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace moe_kernels::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_sort_tokens(const at::Tensor& topk_ids, int64_t num_experts,
                                                              const std::optional<at::Tensor>& expert_map,
                                                              int64_t num_local_experts, int64_t align_block_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& hidden_states, const at::Tensor& topk_ids, int64_t num_experts,
    const std::optional<at::Tensor>& expert_map, int64_t num_local_experts, int64_t align_block_size,
    const std::optional<at::Tensor>& scales);

// out[t] = sum over kept k of w[t,k] * (rows[index[t,k]] + bias[e]); kept: index >= 0 and, when
// topk_ids is given, start <= topk_ids[t,k] <= end; bias (optional, [num_experts, H] fp32) of the
// expert e owning the row (row_expert over expert_offsets). Accumulates in fp32 in k order.
at::Tensor weighted_gather(const at::Tensor& rows, const at::Tensor& topk_weights, const at::Tensor& index,
                           const std::optional<at::Tensor>& topk_ids, int64_t start_expert, int64_t end_expert,
                           const float* bias = nullptr, const int64_t* expert_offsets = nullptr,
                           int64_t num_experts = 0);

at::Tensor moe_unpermute(const at::Tensor& permuted, const at::Tensor& topk_weights,
                         const at::Tensor& inv_permuted_idx, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& expert_offsets);

std::tuple<at::Tensor, at::Tensor> compute_problem_sizes(const at::Tensor& expert_offsets, int64_t n, int64_t k,
                                                         bool swap_ab);

}  // namespace moe_kernels::cpu
