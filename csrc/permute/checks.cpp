#include "permute/checks.h"

#include <limits>

#include "common/limits.h"

namespace moe_kernels {

namespace {
bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }
}  // namespace

SortShape check_sort_args(const char* op, const at::Tensor& topk_ids, int64_t num_experts,
                          const std::optional<at::Tensor>& expert_map, int64_t num_local_experts,
                          int64_t align_block_size) {
  TORCH_CHECK(topk_ids.dim() == 2, op, ": topk_ids must be 2-D [T, K], got shape ", topk_ids.sizes());
  TORCH_CHECK(is_index_dtype(topk_ids.scalar_type()), op, ": topk_ids must be int32 or int64, got ",
              topk_ids.scalar_type());
  TORCH_CHECK(topk_ids.is_contiguous(), op, ": topk_ids must be contiguous");
  const int64_t T = topk_ids.size(0);
  const int64_t K = topk_ids.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxTopK, op, ": topk_ids must have 1 to ", kMaxTopK, " columns (K), got ", K);
  TORCH_CHECK(num_experts >= 1, op, ": num_experts must be positive, got ", num_experts);
  TORCH_CHECK(align_block_size >= 0, op, ": align_block_size must be >= 0, got ", align_block_size);

  int64_t local = num_experts;
  if (expert_map.has_value()) {
    const at::Tensor& map = *expert_map;
    TORCH_CHECK(map.dim() == 1 && map.size(0) == num_experts, op, ": expert_map must have shape [",
                num_experts, "] (num_experts), got ", map.sizes());
    TORCH_CHECK(map.scalar_type() == at::kInt, op, ": expert_map must be int32, got ", map.scalar_type());
    TORCH_CHECK(map.is_contiguous(), op, ": expert_map must be contiguous");
    TORCH_CHECK(map.device() == topk_ids.device(), op, ": expert_map must be on ", topk_ids.device(), ", got ",
                map.device());
    TORCH_CHECK(num_local_experts >= 1 && num_local_experts <= num_experts, op,
                ": num_local_experts must be in [1, num_experts=", num_experts,
                "] when expert_map is given (output shapes cannot depend on its contents), got ", num_local_experts);
    local = num_local_experts;
  } else {
    TORCH_CHECK(num_local_experts == -1 || num_local_experts == num_experts, op,
                ": without expert_map, num_local_experts must be -1 or num_experts=", num_experts, ", got ",
                num_local_experts);
  }
  TORCH_CHECK(local <= kMaxSortExperts, op, ": at most ", kMaxSortExperts, " local experts are supported, got ",
              local);

  const int64_t choices = T * K;
  int64_t rows = choices;
  if (align_block_size > 0) {
    const int64_t a = align_block_size;
    rows = (choices + local * (a - 1) + a - 1) / a * a;
  }
  TORCH_CHECK(rows < std::numeric_limits<int32_t>::max(), op, ": T*K=", choices, " with align_block_size=",
              align_block_size, " gives ", rows, " rows, more than int32 row indices hold");
  return SortShape{T, K, local, rows};
}

void check_permute_hidden(const char* op, const at::Tensor& hidden_states, const at::Tensor& topk_ids) {
  TORCH_CHECK(hidden_states.dim() == 2, op, ": hidden_states must be 2-D [T, H], got shape ", hidden_states.sizes());
  const auto dt = hidden_states.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat || dt == at::kFloat8_e4m3fn, op,
              ": hidden_states must be bfloat16, float16, float32 or float8_e4m3fn, got ", dt);
  TORCH_CHECK(hidden_states.is_contiguous(), op, ": hidden_states must be contiguous");
  TORCH_CHECK(hidden_states.size(0) == topk_ids.size(0), op, ": hidden_states has ", hidden_states.size(0),
              " rows but topk_ids has ", topk_ids.size(0), " (T must match)");
  TORCH_CHECK(hidden_states.device() == topk_ids.device(), op, ": topk_ids must be on ", hidden_states.device(),
              ", got ", topk_ids.device());
}

int64_t check_permute_scales(const char* op, const at::Tensor& scales, const at::Tensor& hidden_states) {
  const int64_t T = hidden_states.size(0);
  TORCH_CHECK((scales.dim() == 1 || scales.dim() == 2) && scales.size(0) == T && (scales.dim() == 1 || scales.size(1) >= 1),
              op, ": scales must be [T] or [T, 1] (per token) or [T, G] (per group), T=", T, ", got shape ",
              scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(scales.is_contiguous(), op, ": scales must be contiguous (row-major [T, G]), got strides ",
              scales.strides());
  TORCH_CHECK(scales.device() == hidden_states.device(), op, ": scales must be on ", hidden_states.device(),
              " (as hidden_states), got ", scales.device());
  return scales.dim() == 1 ? 1 : scales.size(1);
}

void check_weighted_gather_args(const char* op, const char* rows_name, const at::Tensor& rows,
                                const at::Tensor& topk_weights, const at::Tensor& index, const char* index_name) {
  TORCH_CHECK(rows.dim() == 2, op, ": ", rows_name, " must be 2-D [rows, H], got shape ", rows.sizes());
  const auto dt = rows.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, op, ": ", rows_name,
              " must be bfloat16, float16 or float32, got ", dt);
  TORCH_CHECK(rows.is_contiguous(), op, ": ", rows_name, " must be contiguous");
  TORCH_CHECK(index.dim() == 2, op, ": ", index_name, " must be 2-D [T, K], got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt, op, ": ", index_name, " must be int32, got ", index.scalar_type());
  TORCH_CHECK(index.is_contiguous(), op, ": ", index_name, " must be contiguous");
  TORCH_CHECK(index.size(1) >= 1 && index.size(1) <= kMaxTopK, op, ": ", index_name, " must have 1 to ", kMaxTopK,
              " columns (K), got ", index.size(1));
  TORCH_CHECK(topk_weights.sizes() == index.sizes(), op, ": topk_weights must have shape ", index.sizes(),
              " (as ", index_name, "), got ", topk_weights.sizes());
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat || topk_weights.scalar_type() == dt, op,
              ": topk_weights must be float32 or ", dt, " (as ", rows_name, "), got ", topk_weights.scalar_type());
  TORCH_CHECK(topk_weights.is_contiguous(), op, ": topk_weights must be contiguous");
  TORCH_CHECK(index.device() == rows.device(), op, ": ", index_name, " must be on ", rows.device(), ", got ",
              index.device());
  TORCH_CHECK(topk_weights.device() == rows.device(), op, ": topk_weights must be on ", rows.device(), ", got ",
              topk_weights.device());
}

void check_unpermute_bias(const char* op, const at::Tensor& permuted, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& expert_offsets) {
  TORCH_CHECK(bias.has_value() == expert_offsets.has_value(), op,
              ": bias and expert_offsets go together (bias [E, H] per expert, expert_offsets [E + 1] its rows), got ",
              bias.has_value() ? "bias without expert_offsets" : "expert_offsets without bias");
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  const at::Tensor& off = *expert_offsets;
  TORCH_CHECK(off.dim() == 1 && off.size(0) >= 1, op, ": expert_offsets must be 1-D [E + 1], got shape ", off.sizes());
  TORCH_CHECK(off.scalar_type() == at::kLong, op, ": expert_offsets must be int64, got ", off.scalar_type());
  TORCH_CHECK(off.is_contiguous(), op, ": expert_offsets must be contiguous");
  TORCH_CHECK(off.device() == permuted.device(), op, ": expert_offsets must be on ", permuted.device(),
              " (as permuted), got ", off.device());
  const int64_t E = off.size(0) - 1;
  TORCH_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == permuted.size(1), op, ": bias must be [E, H] = [", E,
              ", ", permuted.size(1), "] (E from expert_offsets, H from permuted), got shape ", b.sizes());
  TORCH_CHECK(b.scalar_type() == at::kFloat, op, ": bias must be float32, got ", b.scalar_type());
  TORCH_CHECK(b.is_contiguous(), op, ": bias must be contiguous");
  TORCH_CHECK(b.device() == permuted.device(), op, ": bias must be on ", permuted.device(), " (as permuted), got ",
              b.device());
}

void check_problem_sizes_args(const at::Tensor& expert_offsets, int64_t n, int64_t k) {
  const char* op = "compute_problem_sizes";
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) >= 1, op,
              ": expert_offsets must be 1-D [E_local + 1], got shape ", expert_offsets.sizes());
  TORCH_CHECK(expert_offsets.scalar_type() == at::kLong, op, ": expert_offsets must be int64, got ",
              expert_offsets.scalar_type());
  TORCH_CHECK(expert_offsets.is_contiguous(), op, ": expert_offsets must be contiguous");
  TORCH_CHECK(n >= 1 && 2 * n < std::numeric_limits<int32_t>::max(), op, ": n must be positive, got ", n);
  TORCH_CHECK(k >= 1 && k < std::numeric_limits<int32_t>::max(), op, ": k must be positive, got ", k);
}

}  // namespace moe_kernels
