// Public C++ API of the expert-parallel reorder ops (SGLang's EP MoE: every rank sees all tokens
// and computes the experts [start_expert_id, end_expert_id], inclusive). Each call goes through
// the PyTorch dispatcher, so it runs the CUDA or CPU implementation by the inputs' device, exactly
// as torch.ops.moe_kernels.<op> does. Contracts (shapes, dtypes, meaning): docs/ops.md and the
// Python docstrings.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace moe_kernels {

// -> out [T*K, H]: out[src2dst[t,k]] = hidden_states[t] for each k with start <= topk_ids[t,k] <= end;
// other rows are left unwritten. out_dtype float8_e4m3fn quantizes: e4m3(saturate(x / scale)),
// scale [1] (per tensor) or [T] (per token), float32.
at::Tensor ep_pre_reorder(const at::Tensor& hidden_states, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id,
                          const std::optional<at::Tensor>& scale = std::nullopt,
                          std::optional<at::ScalarType> out_dtype = std::nullopt);

// -> out [T, H]: out[t] = sum over k with start <= topk_ids[t,k] <= end of
// topk_weights[t,k] * down_output[src2dst[t,k]] (fp32 accumulation); zeros for tokens with none.
at::Tensor ep_post_reorder(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                           const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id);

}  // namespace moe_kernels
