// Torch glue of the ep ops: checks, allocation, the launch on the current stream, and the
// registration of the CUDA and CPU implementations. The public C++ API (include/moe_kernels/ep.h)
// calls through the dispatcher. ep_post_reorder launches the weighted gather of permute/ (the
// kernel of moe_unpermute) with its expert-range filter.
#include <torch/library.h>

#include "common/torch_glue.h"
#include "ep/checks.h"
#include "ep/cpu_reference.h"
#include "ep/launchers.h"
#include "moe_kernels/ep.h"
#include "permute/weighted_gather_glue.h"

namespace moe_kernels {
namespace cuda {

at::Tensor ep_pre_reorder(const at::Tensor& hidden_states, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id, const std::optional<at::Tensor>& scale,
                          std::optional<at::ScalarType> out_dtype) {
  const char* op = "ep_pre_reorder";
  const PreReorderShape s =
      check_pre_reorder_args(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale, out_dtype);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  // Rows that no local choice maps to are left unwritten: writing them would cost bandwidth for
  // rows that the experts of this rank never read (SGLang leaves them too).
  auto out = at::empty({s.num_tokens * s.topk, s.hidden}, hidden_states.options().dtype(s.out_dtype));
  PreReorderArgs a{};
  a.hidden_states = hidden_states.data_ptr();
  a.dtype = to_dtype(hidden_states.scalar_type());
  a.src2dst = src2dst.data_ptr<int32_t>();
  a.topk_ids = topk_ids.data_ptr();
  a.ids_int64 = topk_ids.scalar_type() == at::kLong;
  a.start_expert = start_expert_id;
  a.end_expert = end_expert_id;
  a.num_tokens = s.num_tokens;
  a.topk = static_cast<int>(s.topk);
  a.hidden = s.hidden;
  a.scale_mode = s.mode == PreReorderMode::kCopy           ? PreReorderScale::kNone
                 : s.mode == PreReorderMode::kQuantPerToken ? PreReorderScale::kPerToken
                                                             : PreReorderScale::kPerTensor;
  a.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  check_launch(launch_pre_reorder(a, current_stream()), op);
  return out;
}

at::Tensor ep_post_reorder(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                           const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id) {
  const char* op = "ep_post_reorder";
  check_post_reorder_args(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id);
  return weighted_gather(op, down_output, topk_weights, src2dst, topk_ids, start_expert_id, end_expert_id);
}

}  // namespace cuda

// Public API: through the dispatcher, so the device of the inputs picks the implementation.
at::Tensor ep_pre_reorder(const at::Tensor& hidden_states, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id, const std::optional<at::Tensor>& scale,
                          std::optional<at::ScalarType> out_dtype) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::ep_pre_reorder", "")
                           .typed<decltype(ep_pre_reorder)>();
  return handle.call(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale, out_dtype);
}

at::Tensor ep_post_reorder(const at::Tensor& down_output, const at::Tensor& src2dst, const at::Tensor& topk_ids,
                           const at::Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::ep_post_reorder", "")
                           .typed<decltype(ep_post_reorder)>();
  return handle.call(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id);
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("ep_pre_reorder", &cuda::ep_pre_reorder);
  m.impl("ep_post_reorder", &cuda::ep_post_reorder);
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("ep_pre_reorder", &cpu::ep_pre_reorder);
  m.impl("ep_post_reorder", &cpu::ep_post_reorder);
}

}  // namespace moe_kernels
