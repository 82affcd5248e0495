#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/portable_math.h"
#include "common/row_expert.h"
#include "permute/checks.h"
#include "permute/cpu_reference.h"

namespace moe_kernels::cpu {

std::tuple<Tensor, Tensor, Tensor> moe_sort_tokens(const Tensor& topk_ids, int64_t num_experts,
                                                              const std::optional<Tensor>& expert_map,
                                                              int64_t num_local_experts, int64_t align_block_size) {
  const char* op = "moe_sort_tokens";
  const SortShape s = check_sort_args(op, topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
  const void* id = topk_ids.const_data_ptr();
  const bool id64 = topk_ids.scalar_type() == kLong;
  const int32_t* map = expert_map ? ptr<int32_t>(*expert_map) : nullptr;
  const int64_t choices = s.num_tokens * s.topk;

  // The local expert of each choice, -1 when dropped. Unlike the GPU (which cannot raise on data
  // without a host sync and drops such choices), the reference rejects ids out of range.
  std::vector<int64_t> local(choices);
  for (int64_t i = 0; i < choices; ++i) {
    const int64_t e = read_index(id, id64, i);
    STD_TORCH_CHECK(e >= 0 && e < num_experts, op, ": topk_ids holds ", e, ", outside [0, num_experts=",
                    num_experts, ")");
    local[i] = map ? map[e] : e;
    STD_TORCH_CHECK(local[i] >= -1 && local[i] < s.num_local_experts, op, ": expert_map[", e, "] = ", local[i],
                ", outside [-1, num_local_experts=", s.num_local_experts, ")");
  }

  std::vector<int64_t> count(s.num_local_experts, 0);
  for (int64_t e : local)
    if (e >= 0) ++count[e];

  auto offsets = empty_on({s.num_local_experts + 1}, kLong, topk_ids);
  auto inv = empty_on({s.num_tokens, s.topk}, kInt, topk_ids);
  auto perm = empty_on({s.num_rows}, kInt, topk_ids);
  int64_t* off = ptr<int64_t>(offsets);
  int32_t* inv_p = ptr<int32_t>(inv);
  int32_t* perm_p = ptr<int32_t>(perm);
  std::fill(perm_p, perm_p + s.num_rows, -1);

  std::vector<int64_t> next(s.num_local_experts);
  int64_t row = 0;
  for (int64_t e = 0; e < s.num_local_experts; ++e) {
    off[e] = next[e] = row;
    const int64_t a = align_block_size;
    row += a > 0 ? (count[e] + a - 1) / a * a : count[e];
  }
  off[s.num_local_experts] = row;

  for (int64_t i = 0; i < choices; ++i) {  // (token, k) order: stable inside each expert
    if (local[i] < 0) {
      inv_p[i] = -1;
      continue;
    }
    const int64_t r = next[local[i]]++;
    inv_p[i] = static_cast<int32_t>(r);
    perm_p[r] = static_cast<int32_t>(i);
  }
  return {offsets, inv, perm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_permute(
    const Tensor& hidden_states, const Tensor& topk_ids, int64_t num_experts,
    const std::optional<Tensor>& expert_map, int64_t num_local_experts, int64_t align_block_size,
    const std::optional<Tensor>& scales) {
  const char* op = "moe_permute";
  check_permute_hidden(op, hidden_states, topk_ids);
  const int64_t G = scales ? check_permute_scales(op, *scales, hidden_states) : 0;
  auto [offsets, inv, perm] = moe_sort_tokens(topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
  const int64_t M = perm.size(0);
  const int64_t H = hidden_states.size(1);
  const int64_t K = topk_ids.size(1);
  auto permuted = empty_on({M, H}, hidden_states.scalar_type(), hidden_states);
  Tensor permuted_scales = scales ? empty_on({M, G}, kFloat, hidden_states) : empty_on({int64_t{0}}, kFloat, hidden_states);
  const int64_t row_bytes = H * hidden_states.element_size();
  const auto* src = static_cast<const uint8_t*>(hidden_states.data_ptr());
  auto* dst = static_cast<uint8_t*>(permuted.data_ptr());
  const float* src_s = scales ? ptr<float>(*scales) : nullptr;
  float* dst_s = scales ? ptr<float>(permuted_scales) : nullptr;
  const int32_t* perm_p = ptr<int32_t>(perm);
  const int64_t used = ptr<int64_t>(offsets)[offsets.size(0) - 1];
  // A row and its G scales move together. Padding rows (and their scales) get zeros; rows past
  // `used` are unspecified.
  for (int64_t r = 0; r < used; ++r) {
    const int64_t token = perm_p[r] >= 0 ? perm_p[r] / K : -1;
    if (token >= 0) {
      std::memcpy(dst + r * row_bytes, src + token * row_bytes, row_bytes);
    } else {
      std::memset(dst + r * row_bytes, 0, row_bytes);
    }
    for (int64_t i = 0; i < G; ++i) dst_s[r * G + i] = token >= 0 ? src_s[token * G + i] : 0.0f;
  }
  return {permuted, offsets, inv, perm, permuted_scales};
}

Tensor weighted_gather(const Tensor& rows, const Tensor& topk_weights, const Tensor& index,
                       const std::optional<Tensor>& topk_ids, int64_t start_expert, int64_t end_expert,
                       const float* bias, const int64_t* expert_offsets, int64_t num_experts) {
  const int64_t T = index.size(0);
  const int64_t K = index.size(1);
  const int64_t R = rows.size(0);
  const int64_t H = rows.size(1);
  // Inputs read as float (exact for float16/bfloat16); fp32 accumulators, rounded once at the end.
  const void* xp = rows.const_data_ptr();
  const ScalarType xt = rows.scalar_type();
  const void* wp = topk_weights.const_data_ptr();
  const ScalarType wt = topk_weights.scalar_type();
  const int32_t* ip = cptr<int32_t>(index);
  const void* idp = topk_ids ? topk_ids->const_data_ptr() : nullptr;
  const bool id64 = topk_ids && topk_ids->scalar_type() == kLong;
  std::vector<float> out(T * H, 0.f);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t flat = t * K + k;
      const int32_t r = ip[flat];
      if (r < 0 || r >= R) continue;  // dropped (or a bad index: skipped, as on the GPU)
      if (idp) {
        const int64_t e = read_index(idp, id64, flat);
        if (e < start_expert || e > end_expert) continue;
      }
      const float w = read_as_float(wp, wt, flat);
      // The bias of the expert owning row r (none past the last expert's rows), added in fp32.
      const int64_t e = bias ? row_expert(expert_offsets, num_experts, r) : -1;
      const float* b = e >= 0 ? bias + e * H : nullptr;
      for (int64_t h = 0; h < H; ++h) {
        const float v = read_as_float(xp, xt, r * H + h);
        out[t * H + h] = std::fma(w, b ? pmath::add_rn(v, b[h]) : v, out[t * H + h]);
      }
    }
  }
  Tensor result = empty_on({T, H}, xt, rows);
  void* rp = result.mutable_data_ptr();
  for (int64_t i = 0; i < T * H; ++i) write_from_float(rp, xt, i, out[i]);
  return result;
}

Tensor moe_unpermute(const Tensor& permuted, const Tensor& topk_weights, const Tensor& inv_permuted_idx,
                     const std::optional<Tensor>& bias, const std::optional<Tensor>& expert_offsets) {
  check_weighted_gather_args("moe_unpermute", "permuted", permuted, topk_weights, inv_permuted_idx,
                             "inv_permuted_idx");
  check_unpermute_bias("moe_unpermute", permuted, bias, expert_offsets);
  return weighted_gather(permuted, topk_weights, inv_permuted_idx, std::nullopt, 0, 0,
                         bias ? cptr<float>(*bias) : nullptr, expert_offsets ? cptr<int64_t>(*expert_offsets) : nullptr,
                         bias ? bias->size(0) : 0);
}

std::tuple<Tensor, Tensor> compute_problem_sizes(const Tensor& expert_offsets, int64_t n, int64_t k,
                                                         bool swap_ab) {
  check_problem_sizes_args(expert_offsets, n, k);
  const int64_t E = expert_offsets.size(0) - 1;
  auto ps1 = empty_on({E, 3}, kInt, expert_offsets);
  auto ps2 = empty_on({E, 3}, kInt, expert_offsets);
  const int64_t* off = ptr<int64_t>(expert_offsets);
  int32_t* p1 = ptr<int32_t>(ps1);
  int32_t* p2 = ptr<int32_t>(ps2);
  for (int64_t e = 0; e < E; ++e) {
    const int32_t m = static_cast<int32_t>(off[e + 1] - off[e]);
    const int32_t g1[3] = {m, static_cast<int32_t>(2 * n), static_cast<int32_t>(k)};
    const int32_t g2[3] = {m, static_cast<int32_t>(k), static_cast<int32_t>(n)};
    for (int j = 0; j < 3; ++j) {  // swap_ab: the transposed problem, M and N exchanged
      p1[3 * e + j] = swap_ab ? g1[j == 0 ? 1 : j == 1 ? 0 : 2] : g1[j];
      p2[3 * e + j] = swap_ab ? g2[j == 0 ? 1 : j == 1 ? 0 : 2] : g2[j];
    }
  }
  return {ps1, ps2};
}

}  // namespace moe_kernels::cpu
