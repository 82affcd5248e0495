// Launcher of the routing-metadata sort (see sort_tokens.cuh).
#include <algorithm>

#include "common/cuda_utils.cuh"
#include "permute/launchers.h"
#include "permute/sort_tokens.cuh"

namespace moe_kernels {
namespace {

// Few choices: one block of 16 warps, each walking at most one batch (16 * 32 * kSortBatch).
constexpr int64_t kSmallSort = 4096;

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;  // above the default dynamic limit: opt in
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <typename IdT, int kWarps>
cudaError_t launch(SortParams p, int blocks, void* workspace, cudaStream_t stream) {
  const size_t smem = sizeof(int32_t) * kWarps * p.num_local_experts;
  cudaError_t err = allow_smem(sort_place_kernel<IdT, kWarps>, smem);
  if (err != cudaSuccess) return err;
  if (blocks > 1) {
    err = allow_smem(sort_count_kernel<IdT, kWarps>, smem);
    if (err != cudaSuccess) return err;
    p.block_counts = static_cast<int32_t*>(workspace);
    sort_count_kernel<IdT, kWarps><<<blocks, kWarps * 32, smem, stream>>>(p);
  }
  sort_place_kernel<IdT, kWarps><<<blocks, kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename IdT>
cudaError_t launch_for_ids(const SortParams& p, int blocks, void* workspace, cudaStream_t stream) {
  if (p.num_choices <= kSmallSort) return launch<IdT, 16>(p, 1, workspace, stream);
  return launch<IdT, 32>(p, blocks, workspace, stream);
}

}  // namespace

int64_t sort_tokens_workspace_ints(int64_t num_choices, int num_local_experts) {
  const int64_t blocks = ceil_div(num_choices, kSortChunk);
  return blocks > 1 ? blocks * num_local_experts : 0;
}

cudaError_t launch_sort_tokens(const SortTokensArgs& a, void* workspace, cudaStream_t stream) {
  const int64_t choices = a.num_tokens * a.topk;
  const int64_t blocks = choices == 0 ? 1 : ceil_div(choices, kSortChunk);
  SortParams p{a.topk_ids,  a.expert_map, choices,           a.num_experts,      a.num_local_experts,
               a.align_block_size, a.num_rows, blocks > 1 ? kSortChunk : std::max<int64_t>(choices, 1),
               nullptr,     a.expert_offsets, a.inv_permuted_idx, a.permuted_idx};
  const int grid = static_cast<int>(blocks);
  return a.ids_int64 ? launch_for_ids<int64_t>(p, grid, workspace, stream)
                     : launch_for_ids<int32_t>(p, grid, workspace, stream);
}

}  // namespace moe_kernels
