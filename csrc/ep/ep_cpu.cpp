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
c10::Float8_e4m3fn quantize(float x, float scale) {
  float v = fp8::div_rn(x, scale);
  if (!std::isnan(v)) v = std::fmin(std::fmax(v, -fp8::kE4M3Max), fp8::kE4M3Max);
  return c10::Float8_e4m3fn(v);
}

}  // namespace

at::Tensor ep_pre_reorder(const at::Tensor& hidden_states, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id, const std::optional<at::Tensor>& scale,
                          std::optional<at::ScalarType> out_dtype) {
  const PreReorderShape s =
      check_pre_reorder_args(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale, out_dtype);
  const int64_t T = s.num_tokens, K = s.topk, H = s.hidden, rows = T * K;
  // Rows that no local choice maps to are left unwritten (as on the GPU).
  auto out = at::empty({rows, H}, hidden_states.options().dtype(s.out_dtype));
  const at::Tensor ids = topk_ids.to(at::kLong);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int32_t* dst_row = src2dst.data_ptr<int32_t>();

  const bool quantize_rows = s.mode != PreReorderMode::kCopy;
  const at::Tensor x = quantize_rows ? hidden_states.to(at::kFloat) : hidden_states;
  const float* scales = quantize_rows ? scale->data_ptr<float>() : nullptr;
  const int64_t row_bytes = H * hidden_states.element_size();

  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = id[t * K + k];
      const int64_t r = dst_row[t * K + k];
      if (e < start_expert_id || e > end_expert_id) continue;  // not an expert of this rank
      if (r < 0 || r >= rows) continue;                        // a bad row: skipped, as on the GPU
      if (!quantize_rows) {
        std::memcpy(static_cast<uint8_t*>(out.data_ptr()) + r * row_bytes,
                    static_cast<const uint8_t*>(hidden_states.data_ptr()) + t * row_bytes, row_bytes);
        continue;
      }
      const float sc = scales[s.mode == PreReorderMode::kQuantPerToken ? t : 0];
      const float* xr = x.data_ptr<float>() + t * H;
      auto* q = out.data_ptr<c10::Float8_e4m3fn>() + r * H;
      for (int64_t h = 0; h < H; ++h) q[h] = quantize(xr[h], sc);
    }
  }
  return out;
}

at::Tensor ep_post_reorder(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                           const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id) {
  check_post_reorder_args(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id);
  // The weighted gather of moe_unpermute with the expert-range filter (fp32 fma in k order).
  return weighted_gather(down_output, topk_weights, src2dst, topk_ids, start_expert_id, end_expert_id);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ep_dispatch_plan(const at::Tensor& topk_ids, int64_t experts_per_rank,
                                                                int64_t world_size, int64_t capacity) {
  check_dispatch_plan_args(topk_ids, experts_per_rank, world_size, capacity);
  const int64_t T = topk_ids.size(0), K = topk_ids.size(1), W = world_size;
  const at::Tensor ids = topk_ids.to(at::kLong);
  const int64_t* id = ids.data_ptr<int64_t>();
  // wants[t][d]: one of token t's choices is an expert of rank d (ids outside [0, W * experts_per_rank) go nowhere).
  std::vector<std::vector<bool>> wants(T, std::vector<bool>(W, false));
  std::vector<int64_t> count(W, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = id[t * K + k];
      if (e >= 0 && e < W * experts_per_rank) wants[t][e / experts_per_rank] = true;
    }
    for (int64_t d = 0; d < W; ++d) count[d] += wants[t][d];
  }
  // Segment of rank d: after the records of ranks < d (variable), or at d * capacity (fixed).
  std::vector<int64_t> first(W, 0);
  for (int64_t d = 1; d < W; ++d) first[d] = capacity < 0 ? first[d - 1] + count[d - 1] : d * capacity;

  auto slots = at::empty({T, W}, topk_ids.options().dtype(at::kInt));
  auto counts = at::empty({W}, topk_ids.options().dtype(at::kInt));
  auto dropped = at::zeros({1}, topk_ids.options().dtype(at::kInt));
  int32_t* slot = slots.data_ptr<int32_t>();
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
    counts.data_ptr<int32_t>()[d] = static_cast<int32_t>(count[d]);
    if (capacity >= 0 && count[d] > capacity) dropped.data_ptr<int32_t>()[0] += static_cast<int32_t>(count[d] - capacity);
  }
  return {slots, counts, dropped};
}

at::Tensor ep_pack_records(const at::Tensor& x, const std::optional<at::Tensor>& scales,
                           const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& slots,
                           const at::Tensor& counts, int64_t num_records, int64_t experts_per_rank, int64_t capacity) {
  const RecordLayout l = check_pack_records_args(x, scales, topk_weights, topk_ids, slots, counts, num_records,
                                                 experts_per_rank, capacity);
  const int64_t T = x.size(0), K = l.topk, G = l.num_scales, W = slots.size(1);
  // Padding bytes and the rows of unfilled records are unspecified, as on the GPU (empty).
  auto records = at::empty({num_records, l.record_bytes}, x.options().dtype(at::kByte));
  uint8_t* out = records.data_ptr<uint8_t>();
  const uint8_t* rows = static_cast<const uint8_t*>(x.data_ptr());
  const at::Tensor ids = topk_ids.to(at::kInt);
  const int32_t* slot = slots.data_ptr<int32_t>();

  auto put_meta = [&](int64_t r, int64_t w, const void* word) {
    std::memcpy(out + r * l.record_bytes + l.meta_offset + 4 * w, word, 4);
  };
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < W; ++d) {
      const int64_t r = slot[t * W + d];
      if (r < 0 || r >= num_records) continue;  // no record (or a bad slot: skipped, as on the GPU)
      std::memcpy(out + r * l.record_bytes, rows + t * l.row_bytes, l.row_bytes);
      for (int64_t g = 0; g < G; ++g) put_meta(r, g, scales->data_ptr<float>() + t * G + g);
      for (int64_t k = 0; k < K; ++k) put_meta(r, G + k, topk_weights.data_ptr<float>() + t * K + k);
      for (int64_t k = 0; k < K; ++k) put_meta(r, G + K + k, ids.data_ptr<int32_t>() + t * K + k);
    }
  }
  // Fixed capacity: unfilled slots say "nothing to compute": scale 1, weight 0, and as id the first
  // expert of the next rank (valid, and never the destination's own expert).
  if (capacity > 0) {
    const float one = 1.0f, zero = 0.0f;
    for (int64_t r = 0; r < num_records; ++r) {
      const int64_t d = r / capacity;
      if (r % capacity < counts.data_ptr<int32_t>()[d]) continue;
      const int32_t other = static_cast<int32_t>(((d + 1) % W) * experts_per_rank);
      for (int64_t g = 0; g < G; ++g) put_meta(r, g, &one);
      for (int64_t k = 0; k < K; ++k) put_meta(r, G + k, &zero);
      for (int64_t k = 0; k < K; ++k) put_meta(r, G + K + k, &other);
    }
  }
  return records;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_unpack_records(const at::Tensor& records, int64_t hidden,
                                                                             at::ScalarType dtype, int64_t num_scales,
                                                                             int64_t topk) {
  const RecordLayout l = check_unpack_records_args(records, hidden, dtype, num_scales, topk);
  const int64_t N = records.size(0);
  auto x = at::empty({N, hidden}, records.options().dtype(dtype));
  auto scales = at::empty({N, num_scales}, records.options().dtype(at::kFloat));
  auto weights = at::empty({N, topk}, records.options().dtype(at::kFloat));
  auto ids = at::empty({N, topk}, records.options().dtype(at::kInt));
  const uint8_t* in = records.data_ptr<uint8_t>();
  for (int64_t r = 0; r < N; ++r) {
    const uint8_t* rec = in + r * l.record_bytes;
    std::memcpy(static_cast<uint8_t*>(x.data_ptr()) + r * l.row_bytes, rec, l.row_bytes);
    std::memcpy(scales.data_ptr<float>() + r * num_scales, rec + l.scales_offset(), 4 * num_scales);
    std::memcpy(weights.data_ptr<float>() + r * topk, rec + l.weights_offset(), 4 * topk);
    std::memcpy(ids.data_ptr<int32_t>() + r * topk, rec + l.ids_offset(), 4 * topk);
  }
  return {x, scales, weights, ids};
}

}  // namespace moe_kernels::cpu
