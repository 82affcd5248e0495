#include "permute/checks.h"

#include <limits>

#include "common/expert_bias_checks.h"
#include "common/limits.h"

namespace moe_kernels {

namespace {
bool is_index_dtype(ScalarType t) { return t == kInt || t == kLong; }
}  // namespace

SortShape check_sort_args(const char* op, const Tensor& topk_ids, int64_t num_experts,
                          const std::optional<Tensor>& expert_map, int64_t num_local_experts,
                          int64_t align_block_size) {
  STD_TORCH_CHECK(topk_ids.dim() == 2, op, ": topk_ids must be 2-D [T, K], got shape ", shape_of(topk_ids));
  STD_TORCH_CHECK(is_index_dtype(topk_ids.scalar_type()), op, ": topk_ids must be int32 or int64, got ",
              topk_ids.scalar_type());
  STD_TORCH_CHECK(topk_ids.is_contiguous(), op, ": topk_ids must be contiguous");
  const int64_t T = topk_ids.size(0);
  const int64_t K = topk_ids.size(1);
  STD_TORCH_CHECK(K >= 1 && K <= kMaxTopK, op, ": topk_ids must have 1 to ", kMaxTopK, " columns (K), got ", K);
  STD_TORCH_CHECK(num_experts >= 1, op, ": num_experts must be positive, got ", num_experts);
  STD_TORCH_CHECK(align_block_size >= 0, op, ": align_block_size must be >= 0, got ", align_block_size);

  int64_t local = num_experts;
  if (expert_map.has_value()) {
    const Tensor& map = *expert_map;
    STD_TORCH_CHECK(map.dim() == 1 && map.size(0) == num_experts, op, ": expert_map must have shape [",
                num_experts, "] (num_experts), got ", shape_of(map));
    STD_TORCH_CHECK(map.scalar_type() == kInt, op, ": expert_map must be int32, got ", map.scalar_type());
    STD_TORCH_CHECK(map.is_contiguous(), op, ": expert_map must be contiguous");
    STD_TORCH_CHECK(same_device(map, topk_ids), op, ": expert_map must be on ", device_of(topk_ids), ", got ",
                device_of(map));
    STD_TORCH_CHECK(num_local_experts >= 1 && num_local_experts <= num_experts, op,
                ": num_local_experts must be in [1, num_experts=", num_experts,
                "] when expert_map is given (output shapes cannot depend on its contents), got ", num_local_experts);
    local = num_local_experts;
  } else {
    STD_TORCH_CHECK(num_local_experts == -1 || num_local_experts == num_experts, op,
                ": without expert_map, num_local_experts must be -1 or num_experts=", num_experts, ", got ",
                num_local_experts);
  }
  STD_TORCH_CHECK(local <= kMaxSortExperts, op, ": at most ", kMaxSortExperts, " local experts are supported, got ",
              local);

  const int64_t choices = T * K;
  int64_t rows = choices;
  if (align_block_size > 0) {
    const int64_t a = align_block_size;
    rows = (choices + local * (a - 1) + a - 1) / a * a;
  }
  STD_TORCH_CHECK(rows < std::numeric_limits<int32_t>::max(), op, ": T*K=", choices, " with align_block_size=",
              align_block_size, " gives ", rows, " rows, more than int32 row indices hold");
  return SortShape{T, K, local, rows};
}

void check_permute_hidden(const char* op, const Tensor& hidden_states, const Tensor& topk_ids) {
  STD_TORCH_CHECK(hidden_states.dim() == 2, op, ": hidden_states must be 2-D [T, H], got shape ", shape_of(hidden_states));
  const auto dt = hidden_states.scalar_type();
  STD_TORCH_CHECK(dt == kBFloat16 || dt == kHalf || dt == kFloat || dt == kFloat8, op,
              ": hidden_states must be bfloat16, float16, float32 or float8_e4m3fn, got ", dt);
  STD_TORCH_CHECK(hidden_states.is_contiguous(), op, ": hidden_states must be contiguous");
  STD_TORCH_CHECK(hidden_states.size(0) == topk_ids.size(0), op, ": hidden_states has ", hidden_states.size(0),
              " rows but topk_ids has ", topk_ids.size(0), " (T must match)");
  STD_TORCH_CHECK(same_device(hidden_states, topk_ids), op, ": topk_ids must be on ", device_of(hidden_states),
              ", got ", device_of(topk_ids));
}

int64_t check_permute_scales(const char* op, const Tensor& scales, const Tensor& hidden_states) {
  const int64_t T = hidden_states.size(0);
  STD_TORCH_CHECK((scales.dim() == 1 || scales.dim() == 2) && scales.size(0) == T && (scales.dim() == 1 || scales.size(1) >= 1),
              op, ": scales must be [T] or [T, 1] (per token) or [T, G] (per group), T=", T, ", got shape ",
              shape_of(scales));
  STD_TORCH_CHECK(scales.scalar_type() == kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  STD_TORCH_CHECK(scales.is_contiguous(), op, ": scales must be contiguous (row-major [T, G]), got strides ",
              strides_of(scales));
  STD_TORCH_CHECK(same_device(scales, hidden_states), op, ": scales must be on ", device_of(hidden_states),
              " (as hidden_states), got ", device_of(scales));
  return scales.dim() == 1 ? 1 : scales.size(1);
}

void check_weighted_gather_args(const char* op, const char* rows_name, const Tensor& rows,
                                const Tensor& topk_weights, const Tensor& index, const char* index_name) {
  STD_TORCH_CHECK(rows.dim() == 2, op, ": ", rows_name, " must be 2-D [rows, H], got shape ", shape_of(rows));
  const auto dt = rows.scalar_type();
  STD_TORCH_CHECK(dt == kBFloat16 || dt == kHalf || dt == kFloat, op, ": ", rows_name,
              " must be bfloat16, float16 or float32, got ", dt);
  STD_TORCH_CHECK(rows.is_contiguous(), op, ": ", rows_name, " must be contiguous");
  STD_TORCH_CHECK(index.dim() == 2, op, ": ", index_name, " must be 2-D [T, K], got shape ", shape_of(index));
  STD_TORCH_CHECK(index.scalar_type() == kInt, op, ": ", index_name, " must be int32, got ", index.scalar_type());
  STD_TORCH_CHECK(index.is_contiguous(), op, ": ", index_name, " must be contiguous");
  STD_TORCH_CHECK(index.size(1) >= 1 && index.size(1) <= kMaxTopK, op, ": ", index_name, " must have 1 to ", kMaxTopK,
              " columns (K), got ", index.size(1));
  STD_TORCH_CHECK(same_shape(topk_weights, index), op, ": topk_weights must have shape ", shape_of(index),
              " (as ", index_name, "), got ", shape_of(topk_weights));
  STD_TORCH_CHECK(topk_weights.scalar_type() == kFloat || topk_weights.scalar_type() == dt, op,
              ": topk_weights must be float32 or ", dt, " (as ", rows_name, "), got ", topk_weights.scalar_type());
  STD_TORCH_CHECK(topk_weights.is_contiguous(), op, ": topk_weights must be contiguous");
  STD_TORCH_CHECK(same_device(index, rows), op, ": ", index_name, " must be on ", device_of(rows), ", got ",
              device_of(index));
  STD_TORCH_CHECK(same_device(topk_weights, rows), op, ": topk_weights must be on ", device_of(rows), ", got ",
              device_of(topk_weights));
}

void check_unpermute_bias(const char* op, const Tensor& permuted, const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& expert_offsets) {
  check_expert_bias(op, bias, expert_offsets, permuted, "permuted", permuted.size(1), "[E, H]", "H from permuted");
}

void check_problem_sizes_args(const Tensor& expert_offsets, int64_t n, int64_t k) {
  const char* op = "compute_problem_sizes";
  STD_TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) >= 1, op,
              ": expert_offsets must be 1-D [E_local + 1], got shape ", shape_of(expert_offsets));
  STD_TORCH_CHECK(expert_offsets.scalar_type() == kLong, op, ": expert_offsets must be int64, got ",
              expert_offsets.scalar_type());
  STD_TORCH_CHECK(expert_offsets.is_contiguous(), op, ": expert_offsets must be contiguous");
  STD_TORCH_CHECK(n >= 1 && 2 * n < std::numeric_limits<int32_t>::max(), op, ": n must be positive, got ", n);
  STD_TORCH_CHECK(k >= 1 && k < std::numeric_limits<int32_t>::max(), op, ": k must be positive, got ", k);
}

}  // namespace moe_kernels
