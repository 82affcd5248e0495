#include <cmath>
#include <cstring>

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

}  // namespace moe_kernels::cpu
