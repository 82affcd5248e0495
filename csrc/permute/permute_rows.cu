// Launcher of the row scatter of moe_permute (see permute_rows.cuh).
#include <algorithm>

#include "permute/launchers.h"
#include "permute/permute_rows.cuh"

namespace moe_kernels {
namespace {

// Enough blocks to fill the GPU several times over; each loops over its share of tokens.
constexpr int64_t kMaxPermuteBlocks = 132 * 32;

template <int kVecBytes>
cudaError_t launch_with_width(const PermuteRowsArgs& a, cudaStream_t stream) {
  const bool has_data = a.row_bytes > 0 || a.scales_per_row > 0;
  if (a.num_tokens > 0 && has_data) {
    PermuteRowsParams p{static_cast<const uint8_t*>(a.hidden_states),
                        static_cast<uint8_t*>(a.permuted),
                        a.row_bytes,
                        a.num_tokens,
                        a.topk,
                        a.inv_permuted_idx,
                        a.num_rows,
                        a.scales,
                        a.permuted_scales,
                        a.scales_per_row};
    const int64_t slices = std::max<int64_t>(1, ceil_div(a.row_bytes / kVecBytes, kPermuteThreads));
    const dim3 blocks(static_cast<unsigned>(std::min(a.num_tokens, std::max<int64_t>(1, kMaxPermuteBlocks / slices))),
                      static_cast<unsigned>(slices));
    // A programmatic dependent of the sort kernel just queued on this stream (see cuda_utils.cuh).
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = blocks;
    config.blockDim = dim3(kPermuteThreads);
    config.stream = stream;
    config.attrs = &attr;
    config.numAttrs = 1;
    cudaError_t err = cudaLaunchKernelEx(&config, permute_rows_kernel<kVecBytes>, p);
    if (err != cudaSuccess) return err;
  }
  if (a.zero_padding_rows && a.num_rows > 0 && has_data) {
    const int blocks = static_cast<int>(std::min(a.num_rows, kMaxPermuteBlocks));
    zero_padding_rows_kernel<kVecBytes><<<blocks, kPermuteThreads, 0, stream>>>(
        static_cast<uint8_t*>(a.permuted), a.row_bytes, a.permuted_idx, a.expert_offsets, a.num_local_experts,
        a.permuted_scales, a.scales_per_row);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_permute_rows(const PermuteRowsArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.hidden_states, a.permuted};
  switch (pick_vec_bytes(a.row_bytes, ptrs, 2)) {
    case 16: return launch_with_width<16>(a, stream);
    case 8: return launch_with_width<8>(a, stream);
    case 4: return launch_with_width<4>(a, stream);
    case 2: return launch_with_width<2>(a, stream);
    default: return launch_with_width<1>(a, stream);
  }
}

}  // namespace moe_kernels
