// Public C++ API of the permute ops. Each call goes through the PyTorch dispatcher, so it runs the
// CUDA or CPU implementation by the inputs' device, exactly as torch.ops.moe_kernels.<op> does.
// Contracts (shapes, dtypes, meaning): docs/ops.md and the Python docstrings.
// Header-only: every function calls its op through the PyTorch dispatcher and is compiled into your
// extension against your torch; _C.so (built on torch's stable ABI) exports no C++ symbol.
// `import moe_kernels` (or load _C.so) before the first call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace moe_kernels {

// -> (expert_offsets [E_local+1] int64, inv_permuted_idx [T,K] int32, permuted_idx [M] int32)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_sort_tokens(
    const at::Tensor& topk_ids, int64_t num_experts, const std::optional<at::Tensor>& expert_map = std::nullopt,
    int64_t num_local_experts = -1, int64_t align_block_size = 0) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::moe_sort_tokens", "")
                           .typed<decltype(moe_sort_tokens)>();
  return handle.call(topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
}

// -> (permuted [M,H], expert_offsets, inv_permuted_idx, permuted_idx, permuted_scales)
// scales [T] / [T,1] (per token) or [T,G] (per group) float32 move with their rows in the same
// pass: permuted_scales [M,G] (padding rows 0, rows past expert_offsets[-1] unwritten); without
// scales, permuted_scales is an empty [0] float32 tensor.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& hidden_states, const at::Tensor& topk_ids, int64_t num_experts,
    const std::optional<at::Tensor>& expert_map = std::nullopt, int64_t num_local_experts = -1,
    int64_t align_block_size = 0, const std::optional<at::Tensor>& scales = std::nullopt) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::moe_permute", "")
                           .typed<decltype(moe_permute)>();
  return handle.call(hidden_states, topk_ids, num_experts, expert_map, num_local_experts, align_block_size, scales);
}

// -> out [T,H]: out[t] = sum_k topk_weights[t,k] * (permuted[inv_permuted_idx[t,k]] + bias[e]),
// bias optional: [E, H] float32, e the expert owning the row (expert_offsets [E + 1] int64, given
// with bias), added in fp32 before the weight multiplies.
inline at::Tensor moe_unpermute(const at::Tensor& permuted, const at::Tensor& topk_weights,
                                const at::Tensor& inv_permuted_idx,
                                const std::optional<at::Tensor>& bias = std::nullopt,
                                const std::optional<at::Tensor>& expert_offsets = std::nullopt) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::moe_unpermute", "")
                           .typed<decltype(moe_unpermute)>();
  return handle.call(permuted, topk_weights, inv_permuted_idx, bias, expert_offsets);
}

// -> (problem_sizes1 [E_local,3] int32, problem_sizes2 [E_local,3] int32)
inline std::tuple<at::Tensor, at::Tensor> compute_problem_sizes(const at::Tensor& expert_offsets, int64_t n, int64_t k,
                                                         bool swap_ab = false) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::compute_problem_sizes", "")
                           .typed<decltype(compute_problem_sizes)>();
  return handle.call(expert_offsets, n, k, swap_ab);
}

}  // namespace moe_kernels
