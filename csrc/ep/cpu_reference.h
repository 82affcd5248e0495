// CPU implementations of the ep ops: plain loops, written to be read as the specification that the
// CUDA kernels are tested against (fp8 bytes included).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace moe_kernels::cpu {

at::Tensor ep_pre_reorder(const at::Tensor& hidden_states, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id, const std::optional<at::Tensor>& scale,
                          std::optional<at::ScalarType> out_dtype);

at::Tensor ep_post_reorder(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                           const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id);

}  // namespace moe_kernels::cpu
