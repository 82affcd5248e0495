#include "ep/checks.h"

#include <limits>

#include "common/limits.h"
#include "permute/checks.h"

namespace moe_kernels {
namespace {

// topk_ids [T, K] int32/int64 beside src2dst [T, K] int32, and the expert range.
void check_routing(const char* op, const Tensor& ref, const Tensor& src2dst, const Tensor& topk_ids,
                   int64_t start_expert_id, int64_t end_expert_id) {
  STD_TORCH_CHECK(src2dst.dim() == 2, op, ": src2dst must be 2-D [T, K], got shape ", shape_of(src2dst));
  STD_TORCH_CHECK(src2dst.scalar_type() == kInt, op, ": src2dst must be int32, got ", src2dst.scalar_type());
  STD_TORCH_CHECK(src2dst.is_contiguous(), op, ": src2dst must be contiguous");
  STD_TORCH_CHECK(src2dst.size(1) >= 1 && src2dst.size(1) <= kMaxTopK, op, ": src2dst must have 1 to ", kMaxTopK,
              " columns (K), got ", src2dst.size(1));
  STD_TORCH_CHECK(same_device(src2dst, ref), op, ": src2dst must be on ", device_of(ref), ", got ", device_of(src2dst));
  STD_TORCH_CHECK(same_shape(topk_ids, src2dst), op, ": topk_ids must have shape ", shape_of(src2dst),
              " (as src2dst), got ", shape_of(topk_ids));
  STD_TORCH_CHECK(topk_ids.scalar_type() == kInt || topk_ids.scalar_type() == kLong, op,
              ": topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  STD_TORCH_CHECK(topk_ids.is_contiguous(), op, ": topk_ids must be contiguous");
  STD_TORCH_CHECK(same_device(topk_ids, ref), op, ": topk_ids must be on ", device_of(ref), ", got ", device_of(topk_ids));
  STD_TORCH_CHECK(start_expert_id >= 0, op, ": start_expert_id must be >= 0, got ", start_expert_id);
  STD_TORCH_CHECK(start_expert_id <= end_expert_id, op, ": start_expert_id must be <= end_expert_id (the range is ",
              "inclusive), got start_expert_id=", start_expert_id, " and end_expert_id=", end_expert_id);
}

}  // namespace

PreReorderShape check_pre_reorder_args(const Tensor& hidden_states, const Tensor& src2dst,
                                       const Tensor& topk_ids, int64_t start_expert_id, int64_t end_expert_id,
                                       const std::optional<Tensor>& scale,
                                       std::optional<ScalarType> out_dtype) {
  const char* op = "ep_pre_reorder";
  STD_TORCH_CHECK(hidden_states.dim() == 2, op, ": hidden_states must be 2-D [T, H], got shape ", shape_of(hidden_states));
  const auto dt = hidden_states.scalar_type();
  const bool is_float = dt == kBFloat16 || dt == kHalf || dt == kFloat;
  STD_TORCH_CHECK(is_float || dt == kFloat8, op,
              ": hidden_states must be bfloat16, float16, float32 or float8_e4m3fn, got ", dt);
  STD_TORCH_CHECK(hidden_states.is_contiguous(), op, ": hidden_states must be contiguous");
  check_routing(op, hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id);
  const int64_t T = hidden_states.size(0);
  STD_TORCH_CHECK(src2dst.size(0) == T, op, ": hidden_states has ", T, " rows but src2dst has ", src2dst.size(0),
              " (T must match)");
  const int64_t K = src2dst.size(1);
  STD_TORCH_CHECK(T * K < std::numeric_limits<int32_t>::max(), op, ": T*K=", T * K,
              " rows, more than int32 row indices (src2dst) hold");

  const ScalarType out = out_dtype.value_or(dt);
  PreReorderMode mode = PreReorderMode::kCopy;
  if (out != dt) {
    STD_TORCH_CHECK(out == kFloat8, op, ": out_dtype must be None, ", dt,
                " (hidden_states' dtype) or float8_e4m3fn, got ", out);
    STD_TORCH_CHECK(scale.has_value(), op, ": quantizing to float8_e4m3fn needs a scale ([1] per tensor or [T] per ",
                "token, float32)");
    const Tensor& s = *scale;
    STD_TORCH_CHECK(s.scalar_type() == kFloat, op, ": scale must be float32, got ", s.scalar_type());
    STD_TORCH_CHECK(s.is_contiguous(), op, ": scale must be contiguous");
    STD_TORCH_CHECK(same_device(s, hidden_states), op, ": scale must be on ", device_of(hidden_states),
                " (as hidden_states), got ", device_of(s));
    const bool per_tensor = s.dim() <= 1 && s.numel() == 1;
    const bool per_token = (s.dim() == 1 && s.size(0) == T) || (s.dim() == 2 && s.size(0) == T && s.size(1) == 1);
    STD_TORCH_CHECK(per_tensor || per_token, op, ": scale must have shape [1] (per tensor) or [T]=[", T,
                "] (per token; [T, 1] is accepted too), got shape ", shape_of(s));
    mode = per_tensor ? PreReorderMode::kQuantPerTensor : PreReorderMode::kQuantPerToken;
  } else {
    STD_TORCH_CHECK(!scale.has_value(), op, ": scale is only used when quantizing (out_dtype=float8_e4m3fn from a ",
                "bfloat16, float16 or float32 hidden_states); got a scale with out_dtype ", out);
  }
  return PreReorderShape{T, K, hidden_states.size(1), out, mode};
}

void check_post_reorder_args(const Tensor& down_output, const Tensor& src2dst, const Tensor& topk_ids,
                             const Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id) {
  const char* op = "ep_post_reorder";
  check_weighted_gather_args(op, "down_output", down_output, topk_weights, src2dst, "src2dst");
  check_routing(op, down_output, src2dst, topk_ids, start_expert_id, end_expert_id);
}

namespace {

void check_tensor(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  STD_TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  STD_TORCH_CHECK(same_device(t, ref), op, ": ", name, " must be on ", device_of(ref), ", got ", device_of(t));
}

bool is_row_dtype(ScalarType dt) {
  return dt == kBFloat16 || dt == kHalf || dt == kFloat || dt == kFloat8;
}

}  // namespace

void check_dispatch_plan_args(const Tensor& topk_ids, int64_t experts_per_rank, int64_t world_size,
                              int64_t capacity) {
  const char* op = "ep_dispatch_plan";
  STD_TORCH_CHECK(topk_ids.dim() == 2, op, ": topk_ids must be 2-D [T, K], got shape ", shape_of(topk_ids));
  STD_TORCH_CHECK(topk_ids.scalar_type() == kInt || topk_ids.scalar_type() == kLong, op,
              ": topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  STD_TORCH_CHECK(topk_ids.is_contiguous(), op, ": topk_ids must be contiguous");
  STD_TORCH_CHECK(experts_per_rank >= 1, op, ": experts_per_rank must be >= 1, got ", experts_per_rank);
  STD_TORCH_CHECK(world_size >= 1 && world_size <= kMaxEpRanks, op, ": world_size must be in [1, ", kMaxEpRanks,
              "], got ", world_size);
  STD_TORCH_CHECK(capacity >= -1, op, ": capacity must be -1 (variable splits) or >= 0 records per rank, got ",
              capacity);
  const int64_t T = topk_ids.size(0);
  const int64_t records = capacity < 0 ? T * world_size : capacity * world_size;
  STD_TORCH_CHECK(records < std::numeric_limits<int32_t>::max() && T * world_size < std::numeric_limits<int32_t>::max(),
              op, ": T * world_size (", T * world_size, ") and capacity * world_size (", capacity * world_size,
              ") must fit int32 slot indices");
}

RecordLayout check_pack_records_args(const Tensor& x, const std::optional<Tensor>& scales,
                                     const Tensor& topk_weights, const Tensor& topk_ids,
                                     const Tensor& slots, const Tensor& counts, int64_t num_records,
                                     int64_t experts_per_rank, int64_t capacity) {
  const char* op = "ep_pack_records";
  STD_TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, H], got shape ", shape_of(x));
  STD_TORCH_CHECK(is_row_dtype(x.scalar_type()), op, ": x must be bfloat16, float16, float32 or float8_e4m3fn, got ",
              x.scalar_type());
  check_tensor(op, "x", x, x);
  const int64_t T = x.size(0);
  STD_TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T, op, ": topk_ids must be [T, K] with T=", T, ", got shape ",
              shape_of(topk_ids));
  STD_TORCH_CHECK(topk_ids.size(1) >= 1 && topk_ids.size(1) <= kMaxTopK, op, ": topk_ids must have 1 to ", kMaxTopK,
              " columns (K), got ", topk_ids.size(1));
  STD_TORCH_CHECK(topk_ids.scalar_type() == kInt || topk_ids.scalar_type() == kLong, op,
              ": topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  check_tensor(op, "topk_ids", topk_ids, x);
  const int64_t K = topk_ids.size(1);
  STD_TORCH_CHECK(same_shape(topk_weights, topk_ids), op, ": topk_weights must have shape ", shape_of(topk_ids),
              " (as topk_ids), got ", shape_of(topk_weights));
  STD_TORCH_CHECK(topk_weights.scalar_type() == kFloat, op, ": topk_weights must be float32, got ",
              topk_weights.scalar_type());
  check_tensor(op, "topk_weights", topk_weights, x);
  int64_t G = 0;
  if (scales.has_value()) {
    const Tensor& s = *scales;
    STD_TORCH_CHECK(s.scalar_type() == kFloat, op, ": scales must be float32, got ", s.scalar_type());
    STD_TORCH_CHECK((s.dim() == 1 || s.dim() == 2) && s.size(0) == T, op,
                ": scales must be [T] or [T, G] (per token or per group) with T=", T, ", got shape ", shape_of(s));
    check_tensor(op, "scales", s, x);
    G = s.dim() == 1 ? 1 : s.size(1);
  }
  STD_TORCH_CHECK(slots.dim() == 2 && slots.size(0) == T && slots.size(1) >= 1 && slots.size(1) <= kMaxEpRanks, op,
              ": slots must be [T, W] with T=", T, " and 1 <= W <= ", kMaxEpRanks, ", got shape ", shape_of(slots));
  STD_TORCH_CHECK(slots.scalar_type() == kInt, op, ": slots must be int32, got ", slots.scalar_type());
  check_tensor(op, "slots", slots, x);
  const int64_t W = slots.size(1);
  STD_TORCH_CHECK(counts.dim() == 1 && counts.size(0) == W, op, ": counts must be [W] = [", W, "], got shape ",
              shape_of(counts));
  STD_TORCH_CHECK(counts.scalar_type() == kInt, op, ": counts must be int32, got ", counts.scalar_type());
  check_tensor(op, "counts", counts, x);
  STD_TORCH_CHECK(experts_per_rank >= 1, op, ": experts_per_rank must be >= 1, got ", experts_per_rank);
  STD_TORCH_CHECK(num_records >= 0 && num_records < std::numeric_limits<int32_t>::max(), op,
              ": num_records must be in [0, 2^31 - 1), got ", num_records);
  STD_TORCH_CHECK(capacity >= -1, op, ": capacity must be -1 (variable splits) or >= 0, got ", capacity);
  STD_TORCH_CHECK(capacity < 0 || num_records == capacity * W, op, ": with a capacity, num_records must be W * capacity = ",
              capacity * W, ", got ", num_records);
  return make_record_layout(x.size(1), x.element_size(), static_cast<int>(G), static_cast<int>(K));
}

RecordLayout check_unpack_records_args(const Tensor& records, int64_t hidden, ScalarType dtype,
                                       int64_t num_scales, int64_t topk) {
  const char* op = "ep_unpack_records";
  STD_TORCH_CHECK(is_row_dtype(dtype), op, ": dtype must be bfloat16, float16, float32 or float8_e4m3fn, got ", dtype);
  STD_TORCH_CHECK(hidden >= 0, op, ": hidden must be >= 0, got ", hidden);
  STD_TORCH_CHECK(num_scales >= 0, op, ": num_scales must be >= 0, got ", num_scales);
  STD_TORCH_CHECK(topk >= 1 && topk <= kMaxTopK, op, ": topk must be in [1, ", kMaxTopK, "], got ", topk);
  const RecordLayout l = make_record_layout(hidden, element_size_of(dtype), static_cast<int>(num_scales),
                                            static_cast<int>(topk));
  STD_TORCH_CHECK(records.scalar_type() == kByte, op, ": records must be uint8, got ", records.scalar_type());
  STD_TORCH_CHECK(records.dim() == 2 && records.size(1) == l.record_bytes, op, ": records must be [N, ", l.record_bytes,
              "] (the record of H=", hidden, " ", dtype, ", ", num_scales, " scales, K=", topk, "), got shape ",
              shape_of(records));
  STD_TORCH_CHECK(records.is_contiguous(), op, ": records must be contiguous");
  return l;
}

}  // namespace moe_kernels
