// The CUDA side of the weighted gather shared by moe_unpermute and ep_post_reorder: allocation and
// launch on the current stream, after the caller's checks. topk_ids given: keep only the choices
// whose expert lies in [start_expert, end_expert].
#pragma once

#include "common/stable_glue.h"

#include <optional>

namespace moe_kernels::cuda {

Tensor weighted_gather(const char* op, const Tensor& rows, const Tensor& topk_weights,
                           const Tensor& index, const std::optional<Tensor>& topk_ids, int64_t start_expert,
                           int64_t end_expert, const std::optional<Tensor>& bias = std::nullopt,
                           const std::optional<Tensor>& expert_offsets = std::nullopt);

}  // namespace moe_kernels::cuda
