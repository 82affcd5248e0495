#include "ep/checks.h"

#include <limits>

#include "common/limits.h"
#include "permute/checks.h"

namespace moe_kernels {
namespace {

// topk_ids [T, K] int32/int64 beside src2dst [T, K] int32, and the expert range.
void check_routing(const char* op, const at::Device& device, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                   int64_t start_expert_id, int64_t end_expert_id) {
  TORCH_CHECK(src2dst.dim() == 2, op, ": src2dst must be 2-D [T, K], got shape ", src2dst.sizes());
  TORCH_CHECK(src2dst.scalar_type() == at::kInt, op, ": src2dst must be int32, got ", src2dst.scalar_type());
  TORCH_CHECK(src2dst.is_contiguous(), op, ": src2dst must be contiguous");
  TORCH_CHECK(src2dst.size(1) >= 1 && src2dst.size(1) <= kMaxTopK, op, ": src2dst must have 1 to ", kMaxTopK,
              " columns (K), got ", src2dst.size(1));
  TORCH_CHECK(src2dst.device() == device, op, ": src2dst must be on ", device, ", got ", src2dst.device());
  TORCH_CHECK(topk_ids.sizes() == src2dst.sizes(), op, ": topk_ids must have shape ", src2dst.sizes(),
              " (as src2dst), got ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong, op,
              ": topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(topk_ids.is_contiguous(), op, ": topk_ids must be contiguous");
  TORCH_CHECK(topk_ids.device() == device, op, ": topk_ids must be on ", device, ", got ", topk_ids.device());
  TORCH_CHECK(start_expert_id >= 0, op, ": start_expert_id must be >= 0, got ", start_expert_id);
  TORCH_CHECK(start_expert_id <= end_expert_id, op, ": start_expert_id must be <= end_expert_id (the range is ",
              "inclusive), got start_expert_id=", start_expert_id, " and end_expert_id=", end_expert_id);
}

}  // namespace

PreReorderShape check_pre_reorder_args(const at::Tensor& hidden_states, const at::Tensor& src2dst,
                                       const at::Tensor& topk_ids, int64_t start_expert_id, int64_t end_expert_id,
                                       const std::optional<at::Tensor>& scale,
                                       std::optional<at::ScalarType> out_dtype) {
  const char* op = "ep_pre_reorder";
  TORCH_CHECK(hidden_states.dim() == 2, op, ": hidden_states must be 2-D [T, H], got shape ", hidden_states.sizes());
  const auto dt = hidden_states.scalar_type();
  const bool is_float = dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat;
  TORCH_CHECK(is_float || dt == at::kFloat8_e4m3fn, op,
              ": hidden_states must be bfloat16, float16, float32 or float8_e4m3fn, got ", dt);
  TORCH_CHECK(hidden_states.is_contiguous(), op, ": hidden_states must be contiguous");
  check_routing(op, hidden_states.device(), src2dst, topk_ids, start_expert_id, end_expert_id);
  const int64_t T = hidden_states.size(0);
  TORCH_CHECK(src2dst.size(0) == T, op, ": hidden_states has ", T, " rows but src2dst has ", src2dst.size(0),
              " (T must match)");
  const int64_t K = src2dst.size(1);
  TORCH_CHECK(T * K < std::numeric_limits<int32_t>::max(), op, ": T*K=", T * K,
              " rows, more than int32 row indices (src2dst) hold");

  const at::ScalarType out = out_dtype.value_or(dt);
  PreReorderMode mode = PreReorderMode::kCopy;
  if (out != dt) {
    TORCH_CHECK(out == at::kFloat8_e4m3fn, op, ": out_dtype must be None, ", dt,
                " (hidden_states' dtype) or float8_e4m3fn, got ", out);
    TORCH_CHECK(scale.has_value(), op, ": quantizing to float8_e4m3fn needs a scale ([1] per tensor or [T] per ",
                "token, float32)");
    const at::Tensor& s = *scale;
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": scale must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.is_contiguous(), op, ": scale must be contiguous");
    TORCH_CHECK(s.device() == hidden_states.device(), op, ": scale must be on ", hidden_states.device(),
                " (as hidden_states), got ", s.device());
    const bool per_tensor = s.dim() <= 1 && s.numel() == 1;
    const bool per_token = (s.dim() == 1 && s.size(0) == T) || (s.dim() == 2 && s.size(0) == T && s.size(1) == 1);
    TORCH_CHECK(per_tensor || per_token, op, ": scale must have shape [1] (per tensor) or [T]=[", T,
                "] (per token; [T, 1] is accepted too), got shape ", s.sizes());
    mode = per_tensor ? PreReorderMode::kQuantPerTensor : PreReorderMode::kQuantPerToken;
  } else {
    TORCH_CHECK(!scale.has_value(), op, ": scale is only used when quantizing (out_dtype=float8_e4m3fn from a ",
                "bfloat16, float16 or float32 hidden_states); got a scale with out_dtype ", out);
  }
  return PreReorderShape{T, K, hidden_states.size(1), out, mode};
}

void check_post_reorder_args(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                             const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id) {
  const char* op = "ep_post_reorder";
  check_weighted_gather_args(op, "down_output", down_output, topk_weights, src2dst, "src2dst");
  check_routing(op, down_output.device(), src2dst, topk_ids, start_expert_id, end_expert_id);
}

}  // namespace moe_kernels
