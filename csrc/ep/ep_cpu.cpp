#include <cmath>
#include <cstring>
#include <vector>

#include "ep/checks.h"
#include "ep/cpu_reference.h"
#include "permute/cpu_reference.h"
#include "quant/fp8_math.h"

namespace moe_kernels::cpu {
namespace {

// e4m3(saturate(x / scale)): the fp32 division (one IEEE rounding, as __fdiv_rn on the device),
// the clamp to +-448 (NaN passes through), then c10's conversion, which rounds to nearest even.
Float8_e4m3fn quantize(float x, float scale) {
  float v = fp8::div_rn(x, scale);
  if (!std::isnan(v)) v = std::fmin(std::fmax(v, -fp8::kE4M3Max), fp8::kE4M3Max);
  return Float8_e4m3fn(v);
}

}  // namespace

Tensor ep_pre_reorder(const Tensor& hidden_states, const Tensor& src2dst, const Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id, const std::optional<Tensor>& scale,
                          std::optional<ScalarType> out_dtype) {
  const PreReorderShape s =
      check_pre_reorder_args(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale, out_dtype);
  const int64_t T = s.num_tokens, K = s.topk, H = s.hidden, rows = T * K;
  // Rows that no local choice maps to are left unwritten (as on the GPU).
  auto out = empty_on({rows, H}, s.out_dtype, hidden_states);
  const void* id = topk_ids.const_data_ptr();
  const bool id64 = topk_ids.scalar_type() == kLong;
  const int32_t* dst_row = cptr<int32_t>(src2dst);

  const bool quantize_rows = s.mode != PreReorderMode::kCopy;
  const void* x = hidden_states.const_data_ptr();
  const ScalarType xt = hidden_states.scalar_type();
  const float* scales = quantize_rows ? cptr<float>(*scale) : nullptr;
  const int64_t row_bytes = H * hidden_states.element_size();

  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = read_index(id, id64, t * K + k);
      const int64_t r = dst_row[t * K + k];
      if (e < start_expert_id || e > end_expert_id) continue;  // not an expert of this rank
      if (r < 0 || r >= rows) continue;                        // a bad row: skipped, as on the GPU
      if (!quantize_rows) {
        std::memcpy(static_cast<uint8_t*>(out.mutable_data_ptr()) + r * row_bytes,
                    static_cast<const uint8_t*>(x) + t * row_bytes, row_bytes);
        continue;
      }
      const float sc = scales[s.mode == PreReorderMode::kQuantPerToken ? t : 0];
      auto* q = ptr<Float8_e4m3fn>(out) + r * H;
      for (int64_t h = 0; h < H; ++h) q[h] = quantize(read_as_float(x, xt, t * H + h), sc);
    }
  }
  return out;
}

Tensor ep_post_reorder(const Tensor& down_output, const Tensor& src2dst, const Tensor& topk_ids,
                           const Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id) {
  check_post_reorder_args(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id);
  // The weighted gather of moe_unpermute with the expert-range filter (fp32 fma in k order).
  return weighted_gather(down_output, topk_weights, src2dst, topk_ids, start_expert_id, end_expert_id);
}

std::tuple<Tensor, Tensor, Tensor> ep_dispatch_plan(const Tensor& topk_ids, int64_t experts_per_rank,
                                                                int64_t world_size, int64_t capacity) {
  check_dispatch_plan_args(topk_ids, experts_per_rank, world_size, capacity);
  const int64_t T = topk_ids.size(0), K = topk_ids.size(1), W = world_size;
  const void* id = topk_ids.const_data_ptr();
  const bool id64 = topk_ids.scalar_type() == kLong;
  // wants[t][d]: one of token t's choices is an expert of rank d (ids outside [0, W * experts_per_rank) go nowhere).
  std::vector<std::vector<bool>> wants(T, std::vector<bool>(W, false));
  std::vector<int64_t> count(W, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = read_index(id, id64, t * K + k);
      if (e >= 0 && e < W * experts_per_rank) wants[t][e / experts_per_rank] = true;
    }
    for (int64_t d = 0; d < W; ++d) count[d] += wants[t][d];
  }
  // Segment of rank d: after the records of ranks < d (variable), or at d * capacity (fixed).
  std::vector<int64_t> first(W, 0);
  for (int64_t d = 1; d < W; ++d) first[d] = capacity < 0 ? first[d - 1] + count[d - 1] : d * capacity;

  auto slots = empty_on({T, W}, kInt, topk_ids);
  auto counts = empty_on({W}, kInt, topk_ids);
  auto dropped = zeros_on({1}, kInt, topk_ids);
  int32_t* slot = ptr<int32_t>(slots);
  std::vector<int64_t> seen(W, 0);  // records of rank d so far, in token order
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < W; ++d) {
      slot[t * W + d] = -1;
      if (!wants[t][d]) continue;
      const int64_t i = seen[d]++;
      if (capacity < 0 || i < capacity) slot[t * W + d] = static_cast<int32_t>(first[d] + i);
    }
  }
  for (int64_t d = 0; d < W; ++d) {
    ptr<int32_t>(counts)[d] = static_cast<int32_t>(count[d]);
    if (capacity >= 0 && count[d] > capacity) ptr<int32_t>(dropped)[0] += static_cast<int32_t>(count[d] - capacity);
  }
  return {slots, counts, dropped};
}

Tensor ep_pack_records(const Tensor& x, const std::optional<Tensor>& scales,
                           const Tensor& topk_weights, const Tensor& topk_ids, const Tensor& slots,
                           const Tensor& counts, int64_t num_records, int64_t experts_per_rank, int64_t capacity) {
  const RecordLayout l = check_pack_records_args(x, scales, topk_weights, topk_ids, slots, counts, num_records,
                                                 experts_per_rank, capacity);
  const int64_t T = x.size(0), K = l.topk, G = l.num_scales, W = slots.size(1);
  // Padding bytes and the rows of unfilled records are unspecified, as on the GPU (empty).
  auto records = empty_on({num_records, l.record_bytes}, kByte, x);
  uint8_t* out = ptr<uint8_t>(records);
  const uint8_t* rows = static_cast<const uint8_t*>(x.data_ptr());
  // ids travel as int32 (int64 ids are narrowed, as the kernel does).
  const void* id = topk_ids.const_data_ptr();
  const bool id64 = topk_ids.scalar_type() == kLong;
  const int32_t* slot = ptr<int32_t>(slots);

  auto put_meta = [&](int64_t r, int64_t w, const void* word) {
    std::memcpy(out + r * l.record_bytes + l.meta_offset + 4 * w, word, 4);
  };
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < W; ++d) {
      const int64_t r = slot[t * W + d];
      if (r < 0 || r >= num_records) continue;  // no record (or a bad slot: skipped, as on the GPU)
      std::memcpy(out + r * l.record_bytes, rows + t * l.row_bytes, l.row_bytes);
      for (int64_t g = 0; g < G; ++g) put_meta(r, g, ptr<float>(*scales) + t * G + g);
      for (int64_t k = 0; k < K; ++k) put_meta(r, G + k, ptr<float>(topk_weights) + t * K + k);
      for (int64_t k = 0; k < K; ++k) {
        const int32_t e = static_cast<int32_t>(read_index(id, id64, t * K + k));
        put_meta(r, G + K + k, &e);
      }
    }
  }
  // Fixed capacity: unfilled slots say "nothing to compute": scale 1, weight 0, and as id the first
  // expert of the next rank (valid, and never the destination's own expert).
  if (capacity > 0) {
    const float one = 1.0f, zero = 0.0f;
    for (int64_t r = 0; r < num_records; ++r) {
      const int64_t d = r / capacity;
      if (r % capacity < ptr<int32_t>(counts)[d]) continue;
      const int32_t other = static_cast<int32_t>(((d + 1) % W) * experts_per_rank);
      for (int64_t g = 0; g < G; ++g) put_meta(r, g, &one);
      for (int64_t k = 0; k < K; ++k) put_meta(r, G + k, &zero);
      for (int64_t k = 0; k < K; ++k) put_meta(r, G + K + k, &other);
    }
  }
  return records;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ep_unpack_records(const Tensor& records, int64_t hidden,
                                                                             ScalarType dtype, int64_t num_scales,
                                                                             int64_t topk) {
  const RecordLayout l = check_unpack_records_args(records, hidden, dtype, num_scales, topk);
  const int64_t N = records.size(0);
  auto x = empty_on({N, hidden}, dtype, records);
  auto scales = empty_on({N, num_scales}, kFloat, records);
  auto weights = empty_on({N, topk}, kFloat, records);
  auto ids = empty_on({N, topk}, kInt, records);
  const uint8_t* in = ptr<uint8_t>(records);
  for (int64_t r = 0; r < N; ++r) {
    const uint8_t* rec = in + r * l.record_bytes;
    std::memcpy(static_cast<uint8_t*>(x.data_ptr()) + r * l.row_bytes, rec, l.row_bytes);
    std::memcpy(ptr<float>(scales) + r * num_scales, rec + l.scales_offset(), 4 * num_scales);
    std::memcpy(ptr<float>(weights) + r * topk, rec + l.weights_offset(), 4 * topk);
    std::memcpy(ptr<int32_t>(ids) + r * topk, rec + l.ids_offset(), 4 * topk);
  }
  return {x, scales, weights, ids};
}

}  // namespace moe_kernels::cpu
