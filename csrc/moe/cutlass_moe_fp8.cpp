// cutlass_moe_fp8: the FP8 expert computation of an MoE layer composed from the library's ops
// (quantize -> permute -> grouped GEMM1 -> silu*mul + quantize -> grouped GEMM2 -> weighted
// unpermute). Every step calls the public API through the dispatcher, so the same composition
// runs on CUDA and, with the CPU references, on the CPU (registered as CompositeExplicitAutograd).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "moe_kernels/gemm.h"
#include "moe_kernels/permute.h"
#include "moe_kernels/quant.h"

namespace moe_kernels {
namespace {

at::Tensor cutlass_moe_fp8_impl(const at::Tensor& hidden_states, const at::Tensor& w1, const at::Tensor& w2,
                                const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& w1_scale,
                                const at::Tensor& w2_scale, const std::optional<at::Tensor>& a1_scale,
                                const std::optional<at::Tensor>& a2_scale, bool per_act_token, bool per_out_ch,
                                const std::optional<at::Tensor>& expert_map, int64_t num_local_experts,
                                bool apply_router_weight_on_input) {
  const char* op = "cutlass_moe_fp8";
  TORCH_CHECK(hidden_states.dim() == 2, op, ": hidden_states must be 2-D [T, H], got shape ", hidden_states.sizes());
  TORCH_CHECK(hidden_states.scalar_type() == at::kBFloat16 || hidden_states.scalar_type() == at::kHalf, op,
              ": hidden_states must be bfloat16 or float16, got ", hidden_states.scalar_type());
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, op, ": w1 must be [E, 2I, H] and w2 [E, H, I], got ", w1.sizes(),
              " and ", w2.sizes());
  const int64_t E_local = w1.size(0);
  const int64_t H = hidden_states.size(1);
  const int64_t I = w2.size(2);
  TORCH_CHECK(w1.size(1) == 2 * I && w1.size(2) == H && w2.size(0) == E_local && w2.size(1) == H, op,
              ": w1 must be [E, 2I, H] = [", E_local, ", ", 2 * I, ", ", H, "] and w2 [E, H, I] = [", E_local, ", ", H,
              ", ", I, "], got ", w1.sizes(), " and ", w2.sizes());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && topk_ids.dim() == 2 &&
                  topk_ids.size(0) == hidden_states.size(0),
              op, ": topk_weights and topk_ids must be [T, K] with T=", hidden_states.size(0), ", got ",
              topk_weights.sizes(), " and ", topk_ids.sizes());
  int64_t num_experts = E_local;
  if (expert_map) {
    num_experts = expert_map->size(0);
    TORCH_CHECK(num_local_experts == -1 || num_local_experts == E_local, op, ": num_local_experts must be -1 or ",
                E_local, " (w1.size(0)), got ", num_local_experts);
    // Rows of other ranks' experts are never computed, so a dynamic per-tensor scale of GEMM1's
    // output would include rows nobody wrote: the second quantization needs a static or a
    // per-token scale here.
    TORCH_CHECK(a2_scale.has_value() || per_act_token, op,
                ": with expert_map, a2_scale (static) or per_act_token=True is required");
  }

  at::Tensor x = hidden_states;
  at::Tensor weights = topk_weights;
  if (apply_router_weight_on_input) {
    TORCH_CHECK(topk_ids.size(1) == 1, op, ": apply_router_weight_on_input needs topk == 1, got ", topk_ids.size(1));
    x = (hidden_states.to(at::kFloat) * topk_weights.to(at::kFloat)).to(hidden_states.scalar_type());
    weights = at::ones_like(topk_weights, topk_weights.options().dtype(at::kFloat));
  }

  // Weight scales: [E] per expert, or [E, N] per output channel (as [E, N] or [E, N, 1]).
  const at::Tensor w1s = per_out_ch ? w1_scale.reshape({E_local, -1}) : w1_scale.reshape({-1});
  const at::Tensor w2s = per_out_ch ? w2_scale.reshape({E_local, -1}) : w2_scale.reshape({-1});
  TORCH_CHECK(w1s.numel() == (per_out_ch ? 2 * I : 1) * E_local && w2s.numel() == (per_out_ch ? H : 1) * E_local,
              op, ": w1_scale and w2_scale must be [E] per expert, or [E, 2I] and [E, H] with per_out_ch, got ",
              w1_scale.sizes(), " and ", w2_scale.sizes());

  // Quantize once per token, then move fp8 rows (half the bytes of bf16) with their per-token
  // scales in the same pass; a per-tensor scale stays as it is.
  auto [x_q, a1s] = scaled_fp8_quant(x, a1_scale, per_act_token);
  const bool a1_per_tensor = !per_act_token || a1_scale.has_value();
  auto [permuted, offsets, inv, perm, permuted_scales] =
      moe_permute(x_q, topk_ids, num_experts, expert_map, expert_map ? E_local : -1, 0,
                  a1_per_tensor ? std::nullopt : std::optional<at::Tensor>(a1s));
  const at::Tensor gemm1_scales = a1_per_tensor ? a1s : permuted_scales;  // [1] or [M, 1]
  at::Tensor h1 = cutlass_grouped_gemm_fp8(permuted, w1, gemm1_scales, w1s, offsets);  // [M, 2I]
  auto [y_q, a2s] = silu_and_mul_quant_fp8(h1, a2_scale, per_act_token);       // [M, I]
  at::Tensor h2 = cutlass_grouped_gemm_fp8(y_q, w2, a2s, w2s, offsets);        // [M, H]
  return moe_unpermute(h2, weights, inv).to(hidden_states.scalar_type());
}

}  // namespace

at::Tensor cutlass_moe_fp8(const at::Tensor& hidden_states, const at::Tensor& w1, const at::Tensor& w2,
                           const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& w1_scale,
                           const at::Tensor& w2_scale, const std::optional<at::Tensor>& a1_scale,
                           const std::optional<at::Tensor>& a2_scale, bool per_act_token, bool per_out_ch,
                           const std::optional<at::Tensor>& expert_map, int64_t num_local_experts,
                           bool apply_router_weight_on_input) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::cutlass_moe_fp8", "")
                           .typed<decltype(cutlass_moe_fp8)>();
  return handle.call(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, a1_scale, a2_scale,
                     per_act_token, per_out_ch, expert_map, num_local_experts, apply_router_weight_on_input);
}

TORCH_LIBRARY_IMPL(moe_kernels, CompositeExplicitAutograd, m) { m.impl("cutlass_moe_fp8", &cutlass_moe_fp8_impl); }

}  // namespace moe_kernels
