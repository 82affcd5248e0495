// Moves each token's row to its K rows of the expert-grouped layout, and with it the row's
// scales (per token or per group of columns, fp32), in the same pass.
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
  const float* src_scales;   // [num_tokens, scales_per_row] or nullptr
  float* dst_scales;         // [num_rows, scales_per_row]
  int64_t scales_per_row;    // 0: no scales
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
    // The first slice's block also moves the token's scales (H/128 floats per row in block mode).
    if (blockIdx.y == 0) {
      for (int64_t i = threadIdx.x; i < p.scales_per_row; i += kPermuteThreads) {
        const float s = p.src_scales[t * p.scales_per_row + i];
        for (int k = 0; k < p.topk; ++k) {
          const int32_t r = rows[k];
          if (r >= 0) p.dst_scales[r * p.scales_per_row + i] = s;
        }
      }
    }
    __syncthreads();  // rows[] is reused by the next token
  }
}

// Zeroes the alignment padding rows (permuted_idx -1 below the rows in use) and their scales, so
// that block-tiled consumers read finite values there. Rows past expert_offsets[E_local] are left
// untouched.
template <int kVecBytes>
__global__ void __launch_bounds__(kPermuteThreads) zero_padding_rows_kernel(
    uint8_t* dst, int64_t row_bytes, const int32_t* permuted_idx, const int64_t* expert_offsets,
    int num_local_experts, float* dst_scales, int64_t scales_per_row) {
  using Vec = ByteVec<kVecBytes>;
  const int64_t used = expert_offsets[num_local_experts];
  const int64_t vecs_per_row = row_bytes / kVecBytes;
  for (int64_t r = blockIdx.x; r < used; r += gridDim.x) {
    if (permuted_idx[r] >= 0) continue;
    Vec* row = reinterpret_cast<Vec*>(dst + r * row_bytes);
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += kPermuteThreads) row[v] = Vec{};
    for (int64_t i = threadIdx.x; i < scales_per_row; i += kPermuteThreads) dst_scales[r * scales_per_row + i] = 0.0f;
  }
}

}  // namespace moe_kernels
