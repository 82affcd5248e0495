// CPU implementations of the ep ops: plain loops, written to be read as the specification that the
// CUDA kernels are tested against (fp8 bytes included).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace moe_kernels::cpu {

at::Tensor ep_pre_reorder(const at::Tensor& hidden_states, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id, const std::optional<at::Tensor>& scale,
                          std::optional<at::ScalarType> out_dtype);

at::Tensor ep_post_reorder(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                           const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ep_dispatch_plan(const at::Tensor& topk_ids, int64_t experts_per_rank,
                                                                int64_t world_size, int64_t capacity);

at::Tensor ep_pack_records(const at::Tensor& x, const std::optional<at::Tensor>& scales,
                           const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& slots,
                           const at::Tensor& counts, int64_t num_records, int64_t experts_per_rank, int64_t capacity);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_unpack_records(const at::Tensor& records, int64_t hidden,
                                                                             at::ScalarType dtype, int64_t num_scales,
                                                                             int64_t topk);

}  // namespace moe_kernels::cpu
