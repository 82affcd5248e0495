// Launcher of the routing-metadata sort (see sort_tokens.cuh).
#include "permute/launchers.h"
#include "permute/sort_tokens.cuh"

namespace moe_kernels {

cudaError_t launch_sort_tokens(const SortTokensArgs& a, cudaStream_t stream) {
  SortParams p{a.topk_ids, a.expert_map, a.num_tokens * a.topk, a.num_experts, a.num_local_experts,
               a.align_block_size, a.num_rows, a.expert_offsets, a.inv_permuted_idx, a.permuted_idx};
  const size_t smem = sizeof(int32_t) * kSortWarps * a.num_local_experts;
  auto kernel = a.ids_int64 ? sort_tokens_kernel<int64_t> : sort_tokens_kernel<int32_t>;
  if (smem > 48 * 1024) {  // above the default dynamic shared-memory limit: opt in
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<1, kSortThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moe_kernels
