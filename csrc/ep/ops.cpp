// Torch glue of the ep ops: checks, allocation, the launch on the current stream, and the
// registration of the CUDA and CPU implementations. The public C++ API (include/moe_kernels/ep.h)
// calls through the dispatcher. ep_post_reorder launches the weighted gather of permute/ (the
// kernel of moe_unpermute) with its expert-range filter. The dispatch ops (plan, pack, unpack) build
// and split the packed buffers of moe_kernels.modular.AllToAll.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> ep_dispatch_plan(const at::Tensor& topk_ids, int64_t experts_per_rank,
                                                                int64_t world_size, int64_t capacity) {
  check_dispatch_plan_args(topk_ids, experts_per_rank, world_size, capacity);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const int64_t T = topk_ids.size(0);
  auto slots = at::empty({T, world_size}, topk_ids.options().dtype(at::kInt));
  auto counts = at::empty({world_size}, topk_ids.options().dtype(at::kInt));
  auto dropped = at::empty({1}, topk_ids.options().dtype(at::kInt));
  DispatchPlanArgs a{};
  a.topk_ids = topk_ids.data_ptr();
  a.ids_int64 = topk_ids.scalar_type() == at::kLong;
  a.num_tokens = T;
  a.topk = static_cast<int>(topk_ids.size(1));
  a.experts_per_rank = experts_per_rank;
  a.world_size = static_cast<int>(world_size);
  a.capacity = capacity;
  a.slots = slots.data_ptr<int32_t>();
  a.counts = counts.data_ptr<int32_t>();
  a.dropped = dropped.data_ptr<int32_t>();
  check_launch(launch_dispatch_plan(a, current_stream()), "ep_dispatch_plan");
  return {slots, counts, dropped};
}

at::Tensor ep_pack_records(const at::Tensor& x, const std::optional<at::Tensor>& scales,
                           const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& slots,
                           const at::Tensor& counts, int64_t num_records, int64_t experts_per_rank, int64_t capacity) {
  const RecordLayout l = check_pack_records_args(x, scales, topk_weights, topk_ids, slots, counts, num_records,
                                                 experts_per_rank, capacity);
  const c10::cuda::CUDAGuard guard(x.device());
  // Padding bytes and the rows of unfilled fixed-capacity records stay unwritten: nobody reads them.
  auto records = at::empty({num_records, l.record_bytes}, x.options().dtype(at::kByte));
  PackRecordsArgs a{};
  a.rows = x.data_ptr();
  a.scales = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  a.weights = topk_weights.data_ptr<float>();
  a.topk_ids = topk_ids.data_ptr();
  a.ids_int64 = topk_ids.scalar_type() == at::kLong;
  a.slots = slots.data_ptr<int32_t>();
  a.counts = counts.data_ptr<int32_t>();
  a.records = records.data_ptr();
  a.num_records = num_records;
  a.layout = l;
  a.num_tokens = x.size(0);
  a.world_size = static_cast<int>(slots.size(1));
  a.capacity = capacity;
  a.experts_per_rank = experts_per_rank;
  check_launch(launch_pack_records(a, current_stream()), "ep_pack_records");
  return records;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_unpack_records(const at::Tensor& records, int64_t hidden,
                                                                             at::ScalarType dtype, int64_t num_scales,
                                                                             int64_t topk) {
  const RecordLayout l = check_unpack_records_args(records, hidden, dtype, num_scales, topk);
  const c10::cuda::CUDAGuard guard(records.device());
  const int64_t N = records.size(0);
  auto x = at::empty({N, hidden}, records.options().dtype(dtype));
  auto scales = at::empty({N, num_scales}, records.options().dtype(at::kFloat));
  auto weights = at::empty({N, topk}, records.options().dtype(at::kFloat));
  auto ids = at::empty({N, topk}, records.options().dtype(at::kInt));
  UnpackRecordsArgs a{};
  a.records = records.data_ptr();
  a.num_records = N;
  a.layout = l;
  a.rows = x.data_ptr();
  a.scales = scales.data_ptr<float>();
  a.weights = weights.data_ptr<float>();
  a.ids = ids.data_ptr<int32_t>();
  check_launch(launch_unpack_records(a, current_stream()), "ep_unpack_records");
  return {x, scales, weights, ids};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> ep_dispatch_plan(const at::Tensor& topk_ids, int64_t experts_per_rank,
                                                                int64_t world_size, int64_t capacity) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::ep_dispatch_plan", "")
                           .typed<decltype(ep_dispatch_plan)>();
  return handle.call(topk_ids, experts_per_rank, world_size, capacity);
}

at::Tensor ep_pack_records(const at::Tensor& x, const std::optional<at::Tensor>& scales,
                           const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& slots,
                           const at::Tensor& counts, int64_t num_records, int64_t experts_per_rank, int64_t capacity) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::ep_pack_records", "")
                           .typed<decltype(ep_pack_records)>();
  return handle.call(x, scales, topk_weights, topk_ids, slots, counts, num_records, experts_per_rank, capacity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_unpack_records(const at::Tensor& records, int64_t hidden,
                                                                             at::ScalarType dtype, int64_t num_scales,
                                                                             int64_t topk) {
  static auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::ep_unpack_records", "")
                           .typed<decltype(ep_unpack_records)>();
  return handle.call(records, hidden, dtype, num_scales, topk);
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("ep_pre_reorder", &cuda::ep_pre_reorder);
  m.impl("ep_post_reorder", &cuda::ep_post_reorder);
  m.impl("ep_dispatch_plan", &cuda::ep_dispatch_plan);
  m.impl("ep_pack_records", &cuda::ep_pack_records);
  m.impl("ep_unpack_records", &cuda::ep_unpack_records);
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("ep_pre_reorder", &cpu::ep_pre_reorder);
  m.impl("ep_post_reorder", &cpu::ep_post_reorder);
  m.impl("ep_dispatch_plan", &cpu::ep_dispatch_plan);
  m.impl("ep_pack_records", &cpu::ep_pack_records);
  m.impl("ep_unpack_records", &cpu::ep_unpack_records);
}

}  // namespace moe_kernels
