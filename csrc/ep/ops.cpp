// Torch glue of the ep ops: checks, allocation, the launch on the current stream, and the
// registration of the CUDA and CPU implementations (stable ABI, see common/stable_glue.h). ep_post_reorder launches the weighted gather of permute/ (the
// kernel of moe_unpermute) with its expert-range filter. The dispatch ops (plan, pack, unpack) build
// and split the packed buffers of moe_kernels.modular.AllToAll.

#include "common/stable_glue.h"
#include "ep/checks.h"
#include "ep/cpu_reference.h"
#include "ep/launchers.h"
#include "permute/weighted_gather_glue.h"

namespace moe_kernels {
namespace cuda {

Tensor ep_pre_reorder(const Tensor& hidden_states, const Tensor& src2dst, const Tensor& topk_ids,
                          int64_t start_expert_id, int64_t end_expert_id, const std::optional<Tensor>& scale,
                          std::optional<ScalarType> out_dtype) {
  const char* op = "ep_pre_reorder";
  const PreReorderShape s =
      check_pre_reorder_args(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale, out_dtype);
  const CudaDeviceScope scope(hidden_states);
  // Rows that no local choice maps to are left unwritten: writing them would cost bandwidth for
  // rows that the experts of this rank never read (SGLang leaves them too).
  auto out = empty_on({s.num_tokens * s.topk, s.hidden}, s.out_dtype, hidden_states);
  PreReorderArgs a{};
  a.hidden_states = hidden_states.data_ptr();
  a.dtype = to_dtype(hidden_states.scalar_type());
  a.src2dst = ptr<int32_t>(src2dst);
  a.topk_ids = topk_ids.data_ptr();
  a.ids_int64 = topk_ids.scalar_type() == kLong;
  a.start_expert = start_expert_id;
  a.end_expert = end_expert_id;
  a.num_tokens = s.num_tokens;
  a.topk = static_cast<int>(s.topk);
  a.hidden = s.hidden;
  a.scale_mode = s.mode == PreReorderMode::kCopy           ? PreReorderScale::kNone
                 : s.mode == PreReorderMode::kQuantPerToken ? PreReorderScale::kPerToken
                                                             : PreReorderScale::kPerTensor;
  a.scale = scale.has_value() ? ptr<float>(*scale) : nullptr;
  a.out = out.data_ptr();
  check_launch(launch_pre_reorder(a, current_stream(hidden_states)), op);
  return out;
}

Tensor ep_post_reorder(const Tensor& down_output, const Tensor& src2dst, const Tensor& topk_ids,
                           const Tensor& topk_weights, int64_t start_expert_id, int64_t end_expert_id) {
  const char* op = "ep_post_reorder";
  check_post_reorder_args(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id);
  return weighted_gather(op, down_output, topk_weights, src2dst, topk_ids, start_expert_id, end_expert_id);
}

std::tuple<Tensor, Tensor, Tensor> ep_dispatch_plan(const Tensor& topk_ids, int64_t experts_per_rank,
                                                                int64_t world_size, int64_t capacity) {
  check_dispatch_plan_args(topk_ids, experts_per_rank, world_size, capacity);
  const CudaDeviceScope scope(topk_ids);
  const int64_t T = topk_ids.size(0);
  auto slots = empty_on({T, world_size}, kInt, topk_ids);
  auto counts = empty_on({world_size}, kInt, topk_ids);
  auto dropped = empty_on({1}, kInt, topk_ids);
  DispatchPlanArgs a{};
  a.topk_ids = topk_ids.data_ptr();
  a.ids_int64 = topk_ids.scalar_type() == kLong;
  a.num_tokens = T;
  a.topk = static_cast<int>(topk_ids.size(1));
  a.experts_per_rank = experts_per_rank;
  a.world_size = static_cast<int>(world_size);
  a.capacity = capacity;
  a.slots = ptr<int32_t>(slots);
  a.counts = ptr<int32_t>(counts);
  a.dropped = ptr<int32_t>(dropped);
  check_launch(launch_dispatch_plan(a, current_stream(topk_ids)), "ep_dispatch_plan");
  return {slots, counts, dropped};
}

Tensor ep_pack_records(const Tensor& x, const std::optional<Tensor>& scales,
                           const Tensor& topk_weights, const Tensor& topk_ids, const Tensor& slots,
                           const Tensor& counts, int64_t num_records, int64_t experts_per_rank, int64_t capacity) {
  const RecordLayout l = check_pack_records_args(x, scales, topk_weights, topk_ids, slots, counts, num_records,
                                                 experts_per_rank, capacity);
  const CudaDeviceScope scope(x);
  // Padding bytes and the rows of unfilled fixed-capacity records stay unwritten: nobody reads them.
  auto records = empty_on({num_records, l.record_bytes}, kByte, x);
  PackRecordsArgs a{};
  a.rows = x.data_ptr();
  a.scales = scales.has_value() ? ptr<float>(*scales) : nullptr;
  a.weights = ptr<float>(topk_weights);
  a.topk_ids = topk_ids.data_ptr();
  a.ids_int64 = topk_ids.scalar_type() == kLong;
  a.slots = ptr<int32_t>(slots);
  a.counts = ptr<int32_t>(counts);
  a.records = records.data_ptr();
  a.num_records = num_records;
  a.layout = l;
  a.num_tokens = x.size(0);
  a.world_size = static_cast<int>(slots.size(1));
  a.capacity = capacity;
  a.experts_per_rank = experts_per_rank;
  check_launch(launch_pack_records(a, current_stream(x)), "ep_pack_records");
  return records;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ep_unpack_records(const Tensor& records, int64_t hidden,
                                                                             ScalarType dtype, int64_t num_scales,
                                                                             int64_t topk) {
  const RecordLayout l = check_unpack_records_args(records, hidden, dtype, num_scales, topk);
  const CudaDeviceScope scope(records);
  const int64_t N = records.size(0);
  auto x = empty_on({N, hidden}, dtype, records);
  auto scales = empty_on({N, num_scales}, kFloat, records);
  auto weights = empty_on({N, topk}, kFloat, records);
  auto ids = empty_on({N, topk}, kInt, records);
  UnpackRecordsArgs a{};
  a.records = records.data_ptr();
  a.num_records = N;
  a.layout = l;
  a.rows = x.data_ptr();
  a.scales = ptr<float>(scales);
  a.weights = ptr<float>(weights);
  a.ids = ptr<int32_t>(ids);
  check_launch(launch_unpack_records(a, current_stream(records)), "ep_unpack_records");
  return {x, scales, weights, ids};
}

}  // namespace cuda

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("ep_pre_reorder", TORCH_BOX(&cuda::ep_pre_reorder));
  m.impl("ep_post_reorder", TORCH_BOX(&cuda::ep_post_reorder));
  m.impl("ep_dispatch_plan", TORCH_BOX(&cuda::ep_dispatch_plan));
  m.impl("ep_pack_records", TORCH_BOX(&cuda::ep_pack_records));
  m.impl("ep_unpack_records", TORCH_BOX(&cuda::ep_unpack_records));
}

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("ep_pre_reorder", TORCH_BOX(&cpu::ep_pre_reorder));
  m.impl("ep_post_reorder", TORCH_BOX(&cpu::ep_post_reorder));
  m.impl("ep_dispatch_plan", TORCH_BOX(&cpu::ep_dispatch_plan));
  m.impl("ep_pack_records", TORCH_BOX(&cpu::ep_pack_records));
  m.impl("ep_unpack_records", TORCH_BOX(&cpu::ep_unpack_records));
}

}  // namespace moe_kernels
