// Torch glue of the permute ops: checks, allocation, the launch on the current stream, and the
// registration of the CUDA and CPU implementations (stable ABI, see common/stable_glue.h).

#include "common/stable_glue.h"
#include "permute/checks.h"
#include "permute/cpu_reference.h"
#include "permute/launchers.h"
#include "permute/glue.h"
#include "permute/weighted_gather_glue.h"

namespace moe_kernels {
namespace cuda {

std::tuple<Tensor, Tensor, Tensor> moe_sort_tokens(const Tensor& topk_ids, int64_t num_experts,
                                                              const std::optional<Tensor>& expert_map,
                                                              int64_t num_local_experts, int64_t align_block_size) {
  const char* op = "moe_sort_tokens";
  const SortShape s = check_sort_args(op, topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
  const CudaDeviceScope scope(topk_ids);
  auto offsets = empty_on({s.num_local_experts + 1}, kLong, topk_ids);
  auto inv = empty_on({s.num_tokens, s.topk}, kInt, topk_ids);
  auto perm = empty_on({s.num_rows}, kInt, topk_ids);
  SortTokensArgs a{topk_ids.data_ptr(),
                   topk_ids.scalar_type() == kLong,
                   expert_map ? ptr<int32_t>(*expert_map) : nullptr,
                   s.num_tokens,
                   static_cast<int>(s.topk),
                   static_cast<int>(num_experts),
                   static_cast<int>(s.num_local_experts),
                   static_cast<int>(align_block_size),
                   s.num_rows,
                   ptr<int64_t>(offsets),
                   ptr<int32_t>(inv),
                   ptr<int32_t>(perm)};
  // Per-block expert counts of the multi-block sort, from the caching allocator (no cudaMalloc).
  const int64_t scratch_ints = sort_tokens_workspace_ints(s.num_tokens * s.topk, static_cast<int>(s.num_local_experts));
  Tensor scratch = empty_on({scratch_ints}, kInt, topk_ids);
  check_launch(launch_sort_tokens(a, scratch_ints > 0 ? scratch.data_ptr() : nullptr, current_stream(topk_ids)), op);
  return {offsets, inv, perm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_permute(
    const Tensor& hidden_states, const Tensor& topk_ids, int64_t num_experts,
    const std::optional<Tensor>& expert_map, int64_t num_local_experts, int64_t align_block_size,
    const std::optional<Tensor>& scales) {
  const char* op = "moe_permute";
  check_permute_hidden(op, hidden_states, topk_ids);
  const int64_t scales_per_row = scales ? check_permute_scales(op, *scales, hidden_states) : 0;
  const CudaDeviceScope scope(hidden_states);
  auto [offsets, inv, perm] = moe_sort_tokens(topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
  auto permuted = empty_on({perm.size(0), hidden_states.size(1)}, hidden_states.scalar_type(), hidden_states);
  Tensor permuted_scales = scales ? empty_on({perm.size(0), scales_per_row}, kFloat, hidden_states)
                                  : empty_on({int64_t{0}}, kFloat, hidden_states);
  PermuteRowsArgs a{hidden_states.data_ptr(),
                    permuted.data_ptr(),
                    hidden_states.size(1) * static_cast<int64_t>(hidden_states.element_size()),
                    hidden_states.size(0),
                    static_cast<int>(topk_ids.size(1)),
                    perm.size(0),
                    ptr<int32_t>(inv),
                    ptr<int32_t>(perm),
                    ptr<int64_t>(offsets),
                    static_cast<int>(offsets.size(0) - 1),
                    align_block_size > 0,
                    scales ? ptr<float>(*scales) : nullptr,
                    scales ? ptr<float>(permuted_scales) : nullptr,
                    scales_per_row};
  check_launch(launch_permute_rows(a, current_stream(hidden_states)), op);
  return {permuted, offsets, inv, perm, permuted_scales};
}

Tensor weighted_gather(const char* op, const Tensor& rows, const Tensor& topk_weights,
                           const Tensor& index, const std::optional<Tensor>& topk_ids, int64_t start_expert,
                           int64_t end_expert, const std::optional<Tensor>& bias,
                           const std::optional<Tensor>& expert_offsets) {
  const CudaDeviceScope scope(rows);
  auto out = empty_on({index.size(0), rows.size(1)}, rows.scalar_type(), rows);
  WeightedGatherArgs a{};
  a.rows = rows.data_ptr();
  a.topk_weights = topk_weights.data_ptr();
  a.weights_fp32 = topk_weights.scalar_type() == kFloat;
  a.index = ptr<int32_t>(index);
  a.topk_ids = topk_ids ? topk_ids->data_ptr() : nullptr;
  a.ids_int64 = topk_ids && topk_ids->scalar_type() == kLong;
  a.start_expert = start_expert;
  a.end_expert = end_expert;
  a.out = out.data_ptr();
  a.dtype = to_dtype(rows.scalar_type());
  a.num_tokens = index.size(0);
  a.topk = static_cast<int>(index.size(1));
  a.hidden = rows.size(1);
  a.num_rows = rows.size(0);
  if (bias) {
    a.bias = cptr<float>(*bias);
    a.expert_offsets = cptr<int64_t>(*expert_offsets);
    a.num_experts = bias->size(0);
  }
  check_launch(launch_weighted_gather(a, current_stream(rows)), op);
  return out;
}

Tensor moe_unpermute(const Tensor& permuted, const Tensor& topk_weights, const Tensor& inv_permuted_idx,
                     const std::optional<Tensor>& bias, const std::optional<Tensor>& expert_offsets) {
  const char* op = "moe_unpermute";
  check_weighted_gather_args(op, "permuted", permuted, topk_weights, inv_permuted_idx, "inv_permuted_idx");
  check_unpermute_bias(op, permuted, bias, expert_offsets);
  return weighted_gather(op, permuted, topk_weights, inv_permuted_idx, std::nullopt, 0, 0, bias, expert_offsets);
}

std::tuple<Tensor, Tensor> compute_problem_sizes(const Tensor& expert_offsets, int64_t n, int64_t k,
                                                         bool swap_ab) {
  check_problem_sizes_args(expert_offsets, n, k);
  const CudaDeviceScope scope(expert_offsets);
  const int64_t E = expert_offsets.size(0) - 1;
  auto ps1 = empty_on({E, 3}, kInt, expert_offsets);
  auto ps2 = empty_on({E, 3}, kInt, expert_offsets);
  ProblemSizesArgs a{ptr<int64_t>(expert_offsets), static_cast<int>(E), static_cast<int>(n),
                     static_cast<int>(k), swap_ab, ptr<int32_t>(ps1), ptr<int32_t>(ps2)};
  check_launch(launch_problem_sizes(a, current_stream(expert_offsets)), "compute_problem_sizes");
  return {ps1, ps2};
}

}  // namespace cuda

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("moe_sort_tokens", TORCH_BOX(&cuda::moe_sort_tokens));
  m.impl("moe_permute", TORCH_BOX(&cuda::moe_permute));
  m.impl("moe_unpermute", TORCH_BOX(&cuda::moe_unpermute));
  m.impl("compute_problem_sizes", TORCH_BOX(&cuda::compute_problem_sizes));
}

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("moe_sort_tokens", TORCH_BOX(&cpu::moe_sort_tokens));
  m.impl("moe_permute", TORCH_BOX(&cpu::moe_permute));
  m.impl("moe_unpermute", TORCH_BOX(&cpu::moe_unpermute));
  m.impl("compute_problem_sizes", TORCH_BOX(&cpu::compute_problem_sizes));
}

}  // namespace moe_kernels
