// Ops of a downstream extension, built on moe_kernels' public C++ API. Each call goes through the
// dispatcher, so the same code runs on CPU and CUDA tensors; the extension compiles no kernel.
#include <moe_kernels/permute.h>
#include <moe_kernels/routing.h>
#include <torch/library.h>

namespace {

// The router: DeepSeek grouped top-k with moe_fused_gate's defaults (sigmoid, renormalized).
std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                                         int64_t num_expert_group, int64_t topk_group, int64_t topk) {
  return moe_kernels::moe_fused_gate(scores, bias, num_expert_group, topk_group, topk);
}

// Token rows grouped by expert; expert_map, alignment and scales left at the header's defaults
// (without scales, the fifth output, permuted_scales, is empty and dropped here).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& hidden_states,
                                                                   const at::Tensor& topk_ids, int64_t num_experts) {
  auto [permuted, offsets, inv, perm, scales] = moe_kernels::moe_permute(hidden_states, topk_ids, num_experts);
  return {permuted, offsets, inv, perm};
}

}  // namespace

// The combine: moe_unpermute without its optional expert bias (a kernel's C++ signature must match
// the schema it is registered for, so the public function is wrapped rather than passed as is).
static at::Tensor combine(const at::Tensor& permuted, const at::Tensor& topk_weights, const at::Tensor& inv_permuted_idx) {
  return moe_kernels::moe_unpermute(permuted, topk_weights, inv_permuted_idx);
}

TORCH_LIBRARY(moe_kernels_downstream, m) {
  m.def("route(Tensor scores, Tensor? bias, int num_expert_group, int topk_group, int topk) "
        "-> (Tensor topk_weights, Tensor topk_ids)",
        &route);
  m.def("permute(Tensor hidden_states, Tensor topk_ids, int num_experts) "
        "-> (Tensor permuted, Tensor expert_offsets, Tensor inv_permuted_idx, Tensor permuted_idx)",
        &permute);
  m.def("combine(Tensor permuted, Tensor topk_weights, Tensor inv_permuted_idx) -> Tensor", &combine);
}
