// Moves each token's row to its K rows of the expert-grouped layout.
//
// Scatter by token rather than gather by output row: each source row is read from memory once and
// written K times (T*H*(1+K) bytes instead of up to 2*T*K*H when the K re-reads miss L2). Rows are
// copied as opaque bytes, so one kernel serves every element type, fp8 included.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/limits.h"

namespace moe_kernels {

constexpr int kPermuteThreads = 128;

struct PermuteRowsParams {
  const uint8_t* src;
  uint8_t* dst;
  int64_t row_bytes;
  int64_t num_tokens;
  int topk;
  const int32_t* inv_permuted_idx;
  int64_t num_rows;
};

// Grid: x walks tokens, y splits the row into slices of kPermuteThreads vectors (small T still
// fills the GPU). Each thread loads one vector of its token's row and stores it K times.
template <int kVecBytes>
__global__ void __launch_bounds__(kPermuteThreads) permute_rows_kernel(PermuteRowsParams p) {
  using Vec = ByteVec<kVecBytes>;
  __shared__ int32_t rows[kMaxTopK];
  const int64_t vecs_per_row = p.row_bytes / kVecBytes;
  const int64_t v = static_cast<int64_t>(blockIdx.y) * kPermuteThreads + threadIdx.x;
  wait_for_prerequisite_grid();  // launched as a dependent of the sort: its rows must be final
  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < p.topk) {
      const int32_t r = p.inv_permuted_idx[t * p.topk + threadIdx.x];
      rows[threadIdx.x] = (r >= 0 && r < p.num_rows) ? r : -1;  // never write outside [0, M)
    }
    __syncthreads();
    if (v < vecs_per_row) {
      const Vec value = reinterpret_cast<const Vec*>(p.src + t * p.row_bytes)[v];
      for (int k = 0; k < p.topk; ++k) {
        const int32_t r = rows[k];
        if (r >= 0) reinterpret_cast<Vec*>(p.dst + r * p.row_bytes)[v] = value;
      }
    }
    __syncthreads();  // rows[] is reused by the next token
  }
}

// Zeroes the alignment padding rows (permuted_idx -1 below the rows in use), so that block-tiled
// consumers read finite values there. Rows past expert_offsets[E_local] are left untouched.
template <int kVecBytes>
__global__ void __launch_bounds__(kPermuteThreads) zero_padding_rows_kernel(
    uint8_t* dst, int64_t row_bytes, const int32_t* permuted_idx, const int64_t* expert_offsets,
    int num_local_experts) {
  using Vec = ByteVec<kVecBytes>;
  const int64_t used = expert_offsets[num_local_experts];
  const int64_t vecs_per_row = row_bytes / kVecBytes;
  for (int64_t r = blockIdx.x; r < used; r += gridDim.x) {
    if (permuted_idx[r] >= 0) continue;
    Vec* row = reinterpret_cast<Vec*>(dst + r * row_bytes);
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += kPermuteThreads) row[v] = Vec{};
  }
}

}  // namespace moe_kernels
