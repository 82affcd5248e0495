// Public C++ API of the expert-parallel reorder ops (SGLang's EP MoE: every rank sees all tokens
// and computes the experts [start_expert_id, end_expert_id], inclusive). Each call goes through
// the PyTorch dispatcher, so it runs the CUDA or CPU implementation by the inputs' device, exactly
// as torch.ops.moe_kernels.<op> does. Contracts (shapes, dtypes, meaning): docs/ops.md and the
// Python docstrings.
// Header-only: every function calls its op through the PyTorch dispatcher and is compiled into your
// extension against your torch; _C.so (built on torch's stable ABI) exports no C++ symbol.
// `import moe_kernels` (or load _C.so) before the first call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace moe_kernels {

// -> out [T*K, H]: out[src2dst[t,k]] = hidden_states[t] for each k with start <= topk_ids[t,k] <= end;
// other rows are left unwritten. out_dtype float8_e4m3fn quantizes: e4m3(saturate(x / scale)),
// scale [1] (per tensor) or [T] (per token), float32.
inline at::Tensor ep_pre_reorder(const at::Tensor& hidden_states, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id,
                          const std::optional<at::Tensor>& scale = std::nullopt,
                          std::optional<at::ScalarType> out_dtype = std::nullopt) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::ep_pre_reorder", "")
                           .typed<decltype(ep_pre_reorder)>();
  return handle.call(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale, out_dtype);
}

// -> out [T, H]: out[t] = sum over k with start <= topk_ids[t,k] <= end of
// topk_weights[t,k] * down_output[src2dst[t,k]] (fp32 accumulation); zeros for tokens with none.
inline at::Tensor ep_post_reorder(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                           const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::ep_post_reorder", "")
                           .typed<decltype(ep_post_reorder)>();
  return handle.call(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id);
}

// Expert-parallel dispatch through one packed buffer per direction (moe_kernels.modular.AllToAll).
// Rank d owns experts [d * experts_per_rank, (d + 1) * experts_per_rank).
//
// -> (slots [T, W] int32, counts [W] int32, dropped [1] int32): slots[t, d] is the record of token t
// for rank d in the send buffer (grouped by rank, token order inside a rank), or -1 when no choice
// of t is on rank d or (capacity >= 0) the record falls past rank d's capacity; counts[d] = tokens
// that want rank d; dropped = records without a slot. capacity -1: variable splits (rank d's records
// follow those of ranks < d); capacity >= 0: rank d's segment is [d * capacity, (d + 1) * capacity).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ep_dispatch_plan(const at::Tensor& topk_ids, int64_t experts_per_rank,
                                                                int64_t world_size, int64_t capacity = -1) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::ep_dispatch_plan", "")
                           .typed<decltype(ep_dispatch_plan)>();
  return handle.call(topk_ids, experts_per_rank, world_size, capacity);
}

// -> records [num_records, record_bytes] uint8: record slots[t, d] = [x[t] bytes | scales[t] fp32 |
// topk_weights[t] fp32 | topk_ids[t] int32] (layout: csrc/ep/record_layout.h). With capacity >= 0
// (num_records = W * capacity), unfilled records get scale 1, weight 0 and ids of an expert of
// another rank, so the receiver computes nothing for them.
inline at::Tensor ep_pack_records(const at::Tensor& x, const std::optional<at::Tensor>& scales,
                           const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& slots,
                           const at::Tensor& counts, int64_t num_records, int64_t experts_per_rank,
                           int64_t capacity = -1) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::ep_pack_records", "")
                           .typed<decltype(ep_pack_records)>();
  return handle.call(x, scales, topk_weights, topk_ids, slots, counts, num_records, experts_per_rank, capacity);
}

// -> (x [N, hidden] dtype, scales [N, num_scales] fp32, topk_weights [N, topk] fp32, topk_ids [N, topk] int32):
// the fields of N records, each contiguous.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_unpack_records(const at::Tensor& records, int64_t hidden,
                                                                             at::ScalarType dtype, int64_t num_scales,
                                                                             int64_t topk) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::ep_unpack_records", "")
                           .typed<decltype(ep_unpack_records)>();
  return handle.call(records, hidden, dtype, num_scales, topk);
}

}  // namespace moe_kernels
