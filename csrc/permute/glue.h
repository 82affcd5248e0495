// The CUDA implementations of the permute ops as C++ functions (permute/ops.cpp), for composites
// that call them directly (cutlass_moe_fp8). The CPU ones: permute/cpu_reference.h.
#pragma once

#include <optional>
#include <tuple>

#include "common/stable_glue.h"

namespace moe_kernels::cuda {

std::tuple<Tensor, Tensor, Tensor> moe_sort_tokens(const Tensor& topk_ids, int64_t num_experts,
                                                   const std::optional<Tensor>& expert_map, int64_t num_local_experts,
                                                   int64_t align_block_size);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_permute(const Tensor& hidden_states, const Tensor& topk_ids,
                                                               int64_t num_experts,
                                                               const std::optional<Tensor>& expert_map,
                                                               int64_t num_local_experts, int64_t align_block_size,
                                                               const std::optional<Tensor>& scales);

Tensor moe_unpermute(const Tensor& permuted, const Tensor& topk_weights, const Tensor& inv_permuted_idx,
                     const std::optional<Tensor>& bias = std::nullopt,
                     const std::optional<Tensor>& expert_offsets = std::nullopt);

}  // namespace moe_kernels::cuda
