// Argument checks of the ep ops, shared by the CUDA and the CPU implementations so that both
// reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace moe_kernels {

enum class PreReorderMode { kCopy, kQuantPerTensor, kQuantPerToken };

struct PreReorderShape {
  int64_t num_tokens;          // T
  int64_t topk;                // K
  int64_t hidden;              // H
  at::ScalarType out_dtype;    // resolved: hidden's dtype, or float8_e4m3fn
  PreReorderMode mode;
};

PreReorderShape check_pre_reorder_args(const at::Tensor& hidden_states, const at::Tensor& src2dst,
                                       const at::Tensor& topk_ids, int64_t start_expert_id, int64_t end_expert_id,
                                       const std::optional<at::Tensor>& scale,
                                       std::optional<at::ScalarType> out_dtype);

void check_post_reorder_args(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                             const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id);

}  // namespace moe_kernels
