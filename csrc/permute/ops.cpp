// Torch glue of the permute ops: checks, allocation, the launch on the current stream, and the
// registration of the CUDA and CPU implementations. The public C++ API (include/moe_kernels/
// permute.h) calls through the dispatcher.
#include <torch/library.h>

#include "common/torch_glue.h"
#include "moe_kernels/permute.h"
#include "permute/checks.h"
#include "permute/cpu_reference.h"
#include "permute/launchers.h"
#include "permute/weighted_gather_glue.h"

namespace moe_kernels {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_sort_tokens(const at::Tensor& topk_ids, int64_t num_experts,
                                                              const std::optional<at::Tensor>& expert_map,
                                                              int64_t num_local_experts, int64_t align_block_size) {
  const char* op = "moe_sort_tokens";
  const SortShape s = check_sort_args(op, topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  auto offsets = at::empty({s.num_local_experts + 1}, topk_ids.options().dtype(at::kLong));
  auto inv = at::empty({s.num_tokens, s.topk}, topk_ids.options().dtype(at::kInt));
  auto perm = at::empty({s.num_rows}, topk_ids.options().dtype(at::kInt));
  SortTokensArgs a{topk_ids.data_ptr(),
                   topk_ids.scalar_type() == at::kLong,
                   expert_map ? expert_map->data_ptr<int32_t>() : nullptr,
                   s.num_tokens,
                   static_cast<int>(s.topk),
                   static_cast<int>(num_experts),
                   static_cast<int>(s.num_local_experts),
                   static_cast<int>(align_block_size),
                   s.num_rows,
                   offsets.data_ptr<int64_t>(),
                   inv.data_ptr<int32_t>(),
                   perm.data_ptr<int32_t>()};
  // Per-block expert counts of the multi-block sort, from the caching allocator (no cudaMalloc).
  const int64_t scratch_ints = sort_tokens_workspace_ints(s.num_tokens * s.topk, static_cast<int>(s.num_local_experts));
  at::Tensor scratch = at::empty({scratch_ints}, topk_ids.options().dtype(at::kInt));
  check_launch(launch_sort_tokens(a, scratch_ints > 0 ? scratch.data_ptr() : nullptr, current_stream()), op);
  return {offsets, inv, perm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& hidden_states, const at::Tensor& topk_ids, int64_t num_experts,
    const std::optional<at::Tensor>& expert_map, int64_t num_local_experts, int64_t align_block_size,
    const std::optional<at::Tensor>& scales) {
  const char* op = "moe_permute";
  check_permute_hidden(op, hidden_states, topk_ids);
  const int64_t scales_per_row = scales ? check_permute_scales(op, *scales, hidden_states) : 0;
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  auto [offsets, inv, perm] = moe_sort_tokens(topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
  auto permuted = at::empty({perm.size(0), hidden_states.size(1)}, hidden_states.options());
  const auto f32 = hidden_states.options().dtype(at::kFloat);
  auto permuted_scales = scales ? at::empty({perm.size(0), scales_per_row}, f32) : at::empty({0}, f32);
  PermuteRowsArgs a{hidden_states.data_ptr(),
                    permuted.data_ptr(),
                    hidden_states.size(1) * hidden_states.element_size(),
                    hidden_states.size(0),
                    static_cast<int>(topk_ids.size(1)),
                    perm.size(0),
                    inv.data_ptr<int32_t>(),
                    perm.data_ptr<int32_t>(),
                    offsets.data_ptr<int64_t>(),
                    static_cast<int>(offsets.size(0) - 1),
                    align_block_size > 0,
                    scales ? scales->data_ptr<float>() : nullptr,
                    scales ? permuted_scales.data_ptr<float>() : nullptr,
                    scales_per_row};
  check_launch(launch_permute_rows(a, current_stream()), op);
  return {permuted, offsets, inv, perm, permuted_scales};
}

at::Tensor weighted_gather(const char* op, const at::Tensor& rows, const at::Tensor& topk_weights,
                           const at::Tensor& index, const std::optional<at::Tensor>& topk_ids, int64_t start_expert,
                           int64_t end_expert, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& expert_offsets) {
  const c10::cuda::CUDAGuard guard(rows.device());
  auto out = at::empty({index.size(0), rows.size(1)}, rows.options());
  WeightedGatherArgs a{};
  a.rows = rows.data_ptr();
  a.topk_weights = topk_weights.data_ptr();
  a.weights_fp32 = topk_weights.scalar_type() == at::kFloat;
  a.index = index.data_ptr<int32_t>();
  a.topk_ids = topk_ids ? topk_ids->data_ptr() : nullptr;
  a.ids_int64 = topk_ids && topk_ids->scalar_type() == at::kLong;
  a.start_expert = start_expert;
  a.end_expert = end_expert;
  a.out = out.data_ptr();
  a.dtype = to_dtype(rows.scalar_type());
  a.num_tokens = index.size(0);
  a.topk = static_cast<int>(index.size(1));
  a.hidden = rows.size(1);
  a.num_rows = rows.size(0);
  if (bias) {
    a.bias = bias->data_ptr<float>();
    a.expert_offsets = expert_offsets->data_ptr<int64_t>();
    a.num_experts = bias->size(0);
  }
  check_launch(launch_weighted_gather(a, current_stream()), op);
  return out;
}

at::Tensor moe_unpermute(const at::Tensor& permuted, const at::Tensor& topk_weights,
                         const at::Tensor& inv_permuted_idx, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& expert_offsets) {
  const char* op = "moe_unpermute";
  check_weighted_gather_args(op, "permuted", permuted, topk_weights, inv_permuted_idx, "inv_permuted_idx");
  check_unpermute_bias(op, permuted, bias, expert_offsets);
  return weighted_gather(op, permuted, topk_weights, inv_permuted_idx, std::nullopt, 0, 0, bias, expert_offsets);
}

std::tuple<at::Tensor, at::Tensor> compute_problem_sizes(const at::Tensor& expert_offsets, int64_t n, int64_t k,
                                                         bool swap_ab) {
  check_problem_sizes_args(expert_offsets, n, k);
  const c10::cuda::CUDAGuard guard(expert_offsets.device());
  const int64_t E = expert_offsets.size(0) - 1;
  auto ps1 = at::empty({E, 3}, expert_offsets.options().dtype(at::kInt));
  auto ps2 = at::empty({E, 3}, expert_offsets.options().dtype(at::kInt));
  ProblemSizesArgs a{expert_offsets.data_ptr<int64_t>(), static_cast<int>(E), static_cast<int>(n),
                     static_cast<int>(k), swap_ab, ps1.data_ptr<int32_t>(), ps2.data_ptr<int32_t>()};
  check_launch(launch_problem_sizes(a, current_stream()), "compute_problem_sizes");
  return {ps1, ps2};
}

}  // namespace cuda

// Public API: through the dispatcher, so the device of the inputs picks the implementation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_sort_tokens(const at::Tensor& topk_ids, int64_t num_experts,
                                                              const std::optional<at::Tensor>& expert_map,
                                                              int64_t num_local_experts, int64_t align_block_size) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::moe_sort_tokens", "")
                           .typed<decltype(moe_sort_tokens)>();
  return handle.call(topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& hidden_states, const at::Tensor& topk_ids, int64_t num_experts,
    const std::optional<at::Tensor>& expert_map, int64_t num_local_experts, int64_t align_block_size,
    const std::optional<at::Tensor>& scales) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::moe_permute", "")
                           .typed<decltype(moe_permute)>();
  return handle.call(hidden_states, topk_ids, num_experts, expert_map, num_local_experts, align_block_size, scales);
}

at::Tensor moe_unpermute(const at::Tensor& permuted, const at::Tensor& topk_weights,
                         const at::Tensor& inv_permuted_idx, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& expert_offsets) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::moe_unpermute", "")
                           .typed<decltype(moe_unpermute)>();
  return handle.call(permuted, topk_weights, inv_permuted_idx, bias, expert_offsets);
}

std::tuple<at::Tensor, at::Tensor> compute_problem_sizes(const at::Tensor& expert_offsets, int64_t n, int64_t k,
                                                         bool swap_ab) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::compute_problem_sizes", "")
                           .typed<decltype(compute_problem_sizes)>();
  return handle.call(expert_offsets, n, k, swap_ab);
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("moe_sort_tokens", &cuda::moe_sort_tokens);
  m.impl("moe_permute", &cuda::moe_permute);
  m.impl("moe_unpermute", &cuda::moe_unpermute);
  m.impl("compute_problem_sizes", &cuda::compute_problem_sizes);
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("moe_sort_tokens", &cpu::moe_sort_tokens);
  m.impl("moe_permute", &cpu::moe_permute);
  m.impl("moe_unpermute", &cpu::moe_unpermute);
  m.impl("compute_problem_sizes", &cpu::compute_problem_sizes);
}

}  // namespace moe_kernels
