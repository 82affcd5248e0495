// Launcher of the weighted gather shared by moe_unpermute and ep_post_reorder.
#include <algorithm>

#include "permute/launchers.h"
#include "permute/weighted_gather.cuh"

namespace moe_kernels {
namespace {

constexpr int64_t kMaxGatherBlocks = 132 * 32;  // blocks in flight: enough to fill the GPU many times

template <typename T, typename W, int kVec>
cudaError_t launch_typed(const WeightedGatherArgs& a, cudaStream_t stream) {
  WeightedGatherParams<T, W> p{static_cast<const T*>(a.rows), static_cast<const W*>(a.topk_weights), a.index,
                               static_cast<T*>(a.out), a.num_tokens, a.topk, a.hidden, a.num_rows,
                               a.bias, a.expert_offsets, a.num_experts};
  const int64_t slices = ceil_div(a.hidden / kVec, kGatherThreads);
  const dim3 blocks(static_cast<unsigned>(std::min(a.num_tokens, std::max<int64_t>(1, kMaxGatherBlocks / slices))),
                    static_cast<unsigned>(slices));
  if (a.topk_ids == nullptr) {
    weighted_gather_kernel<T, W, kVec><<<blocks, kGatherThreads, 0, stream>>>(p, KeepMapped{});
  } else if (a.ids_int64) {
    KeepExpertRange<int64_t> keep{static_cast<const int64_t*>(a.topk_ids), a.start_expert, a.end_expert};
    weighted_gather_kernel<T, W, kVec><<<blocks, kGatherThreads, 0, stream>>>(p, keep);
  } else {
    KeepExpertRange<int32_t> keep{static_cast<const int32_t*>(a.topk_ids), a.start_expert, a.end_expert};
    weighted_gather_kernel<T, W, kVec><<<blocks, kGatherThreads, 0, stream>>>(p, keep);
  }
  return cudaGetLastError();
}

// 16-byte accesses when the row pitch and base addresses allow, else the widest that fits.
template <typename T, typename W>
cudaError_t launch_with_width(const WeightedGatherArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.rows, a.out};
  const int vec_bytes = pick_vec_bytes(a.hidden * static_cast<int64_t>(sizeof(T)), ptrs, 2);
  const int vec = std::max<int>(1, vec_bytes / static_cast<int>(sizeof(T)));
  constexpr int kMaxVec = 16 / sizeof(T);
  if (vec >= kMaxVec) return launch_typed<T, W, kMaxVec>(a, stream);
  if constexpr (kMaxVec >= 4) {
    if (vec >= 2) return launch_typed<T, W, 2>(a, stream);
  }
  return launch_typed<T, W, 1>(a, stream);
}

template <typename T>
cudaError_t launch_with_weights(const WeightedGatherArgs& a, cudaStream_t stream) {
  if (a.weights_fp32) return launch_with_width<T, float>(a, stream);
  return launch_with_width<T, T>(a, stream);
}

}  // namespace

cudaError_t launch_weighted_gather(const WeightedGatherArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.hidden == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return launch_with_weights<float>(a, stream);
    case DType::kFloat16: return launch_with_weights<__half>(a, stream);
    case DType::kBFloat16: return launch_with_weights<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moe_kernels
