#include <cstring>
#include <vector>

#include "common/portable_math.h"
#include "common/row_expert.h"
#include "permute/checks.h"
#include "permute/cpu_reference.h"

namespace moe_kernels::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_sort_tokens(const at::Tensor& topk_ids, int64_t num_experts,
                                                              const std::optional<at::Tensor>& expert_map,
                                                              int64_t num_local_experts, int64_t align_block_size) {
  const char* op = "moe_sort_tokens";
  const SortShape s = check_sort_args(op, topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
  const at::Tensor ids = topk_ids.to(at::kLong);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int32_t* map = expert_map ? expert_map->data_ptr<int32_t>() : nullptr;
  const int64_t choices = s.num_tokens * s.topk;

  // The local expert of each choice, -1 when dropped. Unlike the GPU (which cannot raise on data
  // without a host sync and drops such choices), the reference rejects ids out of range.
  std::vector<int64_t> local(choices);
  for (int64_t i = 0; i < choices; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < num_experts, op, ": topk_ids holds ", id[i], ", outside [0, num_experts=",
                num_experts, ")");
    local[i] = map ? map[id[i]] : id[i];
    TORCH_CHECK(local[i] >= -1 && local[i] < s.num_local_experts, op, ": expert_map[", id[i], "] = ", local[i],
                ", outside [-1, num_local_experts=", s.num_local_experts, ")");
  }

  std::vector<int64_t> count(s.num_local_experts, 0);
  for (int64_t e : local)
    if (e >= 0) ++count[e];

  auto offsets = at::empty({s.num_local_experts + 1}, topk_ids.options().dtype(at::kLong));
  auto inv = at::empty({s.num_tokens, s.topk}, topk_ids.options().dtype(at::kInt));
  auto perm = at::full({s.num_rows}, -1, topk_ids.options().dtype(at::kInt));
  int64_t* off = offsets.data_ptr<int64_t>();
  int32_t* inv_p = inv.data_ptr<int32_t>();
  int32_t* perm_p = perm.data_ptr<int32_t>();

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& hidden_states, const at::Tensor& topk_ids, int64_t num_experts,
    const std::optional<at::Tensor>& expert_map, int64_t num_local_experts, int64_t align_block_size,
    const std::optional<at::Tensor>& scales) {
  const char* op = "moe_permute";
  check_permute_hidden(op, hidden_states, topk_ids);
  const int64_t G = scales ? check_permute_scales(op, *scales, hidden_states) : 0;
  auto [offsets, inv, perm] = moe_sort_tokens(topk_ids, num_experts, expert_map, num_local_experts, align_block_size);
  const int64_t M = perm.size(0);
  const int64_t H = hidden_states.size(1);
  const int64_t K = topk_ids.size(1);
  auto permuted = at::empty({M, H}, hidden_states.options());
  const auto f32 = hidden_states.options().dtype(at::kFloat);
  auto permuted_scales = scales ? at::empty({M, G}, f32) : at::empty({0}, f32);
  const int64_t row_bytes = H * hidden_states.element_size();
  const auto* src = static_cast<const uint8_t*>(hidden_states.data_ptr());
  auto* dst = static_cast<uint8_t*>(permuted.data_ptr());
  const float* src_s = scales ? scales->data_ptr<float>() : nullptr;
  float* dst_s = scales ? permuted_scales.data_ptr<float>() : nullptr;
  const int32_t* perm_p = perm.data_ptr<int32_t>();
  const int64_t used = offsets[-1].item<int64_t>();
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

at::Tensor weighted_gather(const at::Tensor& rows, const at::Tensor& topk_weights, const at::Tensor& index,
                           const std::optional<at::Tensor>& topk_ids, int64_t start_expert, int64_t end_expert,
                           const float* bias, const int64_t* expert_offsets, int64_t num_experts) {
  const int64_t T = index.size(0);
  const int64_t K = index.size(1);
  const int64_t R = rows.size(0);
  const int64_t H = rows.size(1);
  const at::Tensor x = rows.to(at::kFloat);
  const at::Tensor w = topk_weights.to(at::kFloat);
  const at::Tensor ids = topk_ids ? topk_ids->to(at::kLong) : at::Tensor();
  at::Tensor acc = at::zeros({T, H}, rows.options().dtype(at::kFloat));
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int32_t* ip = index.data_ptr<int32_t>();
  const int64_t* idp = topk_ids ? ids.data_ptr<int64_t>() : nullptr;
  float* out = acc.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t flat = t * K + k;
      const int32_t r = ip[flat];
      if (r < 0 || r >= R) continue;  // dropped (or a bad index: skipped, as on the GPU)
      if (idp && (idp[flat] < start_expert || idp[flat] > end_expert)) continue;
      // The bias of the expert owning row r (none past the last expert's rows), added in fp32.
      const int64_t e = bias ? row_expert(expert_offsets, num_experts, r) : -1;
      const float* b = e >= 0 ? bias + e * H : nullptr;
      for (int64_t h = 0; h < H; ++h) {
        const float v = b ? pmath::add_rn(xp[r * H + h], b[h]) : xp[r * H + h];
        out[t * H + h] = std::fma(wp[flat], v, out[t * H + h]);
      }
    }
  }
  return acc.to(rows.scalar_type());
}

at::Tensor moe_unpermute(const at::Tensor& permuted, const at::Tensor& topk_weights,
                         const at::Tensor& inv_permuted_idx, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& expert_offsets) {
  check_weighted_gather_args("moe_unpermute", "permuted", permuted, topk_weights, inv_permuted_idx,
                             "inv_permuted_idx");
  check_unpermute_bias("moe_unpermute", permuted, bias, expert_offsets);
  return weighted_gather(permuted, topk_weights, inv_permuted_idx, std::nullopt, 0, 0,
                         bias ? bias->data_ptr<float>() : nullptr,
                         expert_offsets ? expert_offsets->data_ptr<int64_t>() : nullptr, bias ? bias->size(0) : 0);
}

std::tuple<at::Tensor, at::Tensor> compute_problem_sizes(const at::Tensor& expert_offsets, int64_t n, int64_t k,
                                                         bool swap_ab) {
  check_problem_sizes_args(expert_offsets, n, k);
  const int64_t E = expert_offsets.size(0) - 1;
  auto ps1 = at::empty({E, 3}, expert_offsets.options().dtype(at::kInt));
  auto ps2 = at::empty({E, 3}, expert_offsets.options().dtype(at::kInt));
  const int64_t* off = expert_offsets.data_ptr<int64_t>();
  int32_t* p1 = ps1.data_ptr<int32_t>();
  int32_t* p2 = ps2.data_ptr<int32_t>();
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
