// CPU implementations of the ep ops: plain loops, written to be read as the specification that the
// CUDA kernels are tested against (fp8 bytes included).
#pragma once

#include "common/stable_glue.h"

#include <optional>
#include <tuple>

namespace moe_kernels::cpu {

Tensor ep_pre_reorder(const Tensor& hidden_states, const Tensor& src2dst, const Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id, const std::optional<Tensor>& scale,
                          std::optional<ScalarType> out_dtype);

Tensor ep_post_reorder(const Tensor& down_output, const Tensor& src2dst, const Tensor& topk_ids,
                           const Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id);

std::tuple<Tensor, Tensor, Tensor> ep_dispatch_plan(const Tensor& topk_ids, int64_t experts_per_rank,
                                                                int64_t world_size, int64_t capacity);

Tensor ep_pack_records(const Tensor& x, const std::optional<Tensor>& scales,
                           const Tensor& topk_weights, const Tensor& topk_ids, const Tensor& slots,
                           const Tensor& counts, int64_t num_records, int64_t experts_per_rank, int64_t capacity);

std::tuple<Tensor, Tensor, Tensor, Tensor> ep_unpack_records(const Tensor& records, int64_t hidden,
                                                                             ScalarType dtype, int64_t num_scales,
                                                                             int64_t topk);

}  // namespace moe_kernels::cpu
