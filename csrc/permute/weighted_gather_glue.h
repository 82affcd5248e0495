// The CUDA side of the weighted gather shared by moe_unpermute and ep_post_reorder: allocation and
// launch on the current stream, after the caller's checks. topk_ids given: keep only the choices
// whose expert lies in [start_expert, end_expert].
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace moe_kernels::cuda {

at::Tensor weighted_gather(const char* op, const at::Tensor& rows, const at::Tensor& topk_weights,
                           const at::Tensor& index, const std::optional<at::Tensor>& topk_ids, int64_t start_expert,
                           int64_t end_expert, const std::optional<at::Tensor>& bias = std::nullopt,
                           const std::optional<at::Tensor>& expert_offsets = std::nullopt);

}  // namespace moe_kernels::cuda
