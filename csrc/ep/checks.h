// Argument checks of the ep ops, shared by the CUDA and the CPU implementations so that both
// reject the same inputs with the same messages.
#pragma once

#include "common/stable_glue.h"

#include <optional>

#include "ep/record_layout.h"

namespace moe_kernels {

enum class PreReorderMode { kCopy, kQuantPerTensor, kQuantPerToken };

struct PreReorderShape {
  int64_t num_tokens;          // T
  int64_t topk;                // K
  int64_t hidden;              // H
  ScalarType out_dtype;    // resolved: hidden's dtype, or float8_e4m3fn
  PreReorderMode mode;
};

PreReorderShape check_pre_reorder_args(const Tensor& hidden_states, const Tensor& src2dst,
                                       const Tensor& topk_ids, int64_t start_expert_id, int64_t end_expert_id,
                                       const std::optional<Tensor>& scale,
                                       std::optional<ScalarType> out_dtype);

void check_post_reorder_args(const Tensor& down_output, const Tensor& src2dst, const Tensor& topk_ids,
                             const Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id);

// ep_dispatch_plan: topk_ids [T, K] int32/int64, 1 <= world_size <= kMaxEpRanks, capacity -1 or >= 0.
void check_dispatch_plan_args(const Tensor& topk_ids, int64_t experts_per_rank, int64_t world_size,
                              int64_t capacity);

// ep_pack_records: returns the record layout of x's rows with G scales and K choices.
RecordLayout check_pack_records_args(const Tensor& x, const std::optional<Tensor>& scales,
                                     const Tensor& topk_weights, const Tensor& topk_ids,
                                     const Tensor& slots, const Tensor& counts, int64_t num_records,
                                     int64_t experts_per_rank, int64_t capacity);

// ep_unpack_records: returns the layout that records [N, record_bytes] must have.
RecordLayout check_unpack_records_args(const Tensor& records, int64_t hidden, ScalarType dtype,
                                       int64_t num_scales, int64_t topk);

}  // namespace moe_kernels
