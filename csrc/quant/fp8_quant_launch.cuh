// The launch logic shared by scaled_fp8_quant.cu and silu_and_mul_quant.cu: element type and
// vector width dispatch, then the kernels of the scale mode (see fp8_quant.cuh).
#pragma once

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "quant/fp8_quant.cuh"
#include "quant/group_quant.cuh"
#include "quant/launchers.h"

namespace moe_kernels {

// Enough blocks to fill the GPU several times over; each loops over its share of rows.
constexpr int64_t kMaxQuantBlocks = 132 * 16;

// A per-token row is kept in shared memory (as fp32) up to this size (10240 columns), under the
// 48 KiB a block may use without opting in; longer rows are recomputed from x in the second pass.
constexpr int64_t kMaxCachedRowBytes = 40 * 1024;

template <typename In, int kVec>
cudaError_t launch_group_quant(const In& input, const Fp8QuantArgs& a, cudaStream_t stream) {
  const int64_t groups_per_row = a.cols / a.group_size;
  const int64_t vecs_per_group = a.group_size / kVec;
  if (a.rows == 0 || groups_per_row == 0) return cudaSuccess;
  int lanes = 1;
  while (lanes < 32 && lanes < vecs_per_group) lanes *= 2;
  GroupQuantParams<In> p{input,
                         a.rows,
                         groups_per_row,
                         vecs_per_group,
                         lanes,
                         a.q,
                         a.scale,
                         a.scales_column_major ? 1 : groups_per_row,
                         a.scales_column_major ? a.rows : 1};
  const int64_t blocks = ceil_div(a.rows * groups_per_row * lanes, kQuantThreads);
  const int grid = static_cast<int>(std::clamp<int64_t>(blocks, 1, kMaxQuantBlocks));
  quantize_per_group_kernel<In, kVec><<<grid, kQuantThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <template <typename, int> class Input, typename T, int kVec>
cudaError_t launch_quant_typed(const Fp8QuantArgs& a, cudaStream_t stream) {
  using In = Input<T, kVec>;
  QuantParams<In> p{In::make(a), a.rows, a.cols / kVec, a.q, nullptr, nullptr, nullptr};
  // Per-tensor kernels walk rows x vectors as one flat space; per-token ones take a row per block.
  const int64_t flat_blocks = ceil_div(a.rows * p.vecs_per_row, kQuantThreads);
  const int grid = static_cast<int>(std::clamp<int64_t>(flat_blocks, 1, kMaxQuantBlocks));
  const int token_grid = static_cast<int>(std::clamp<int64_t>(a.rows, 1, kMaxQuantBlocks));
  switch (a.mode) {
    case QuantScaleMode::kStaticPerTensor:
      // Launched even for rows = 0: the kernel also writes the scale output.
      p.scale = a.static_scale;
      p.scale_copy = a.scale;
      quantize_rows_kernel<In, kVec><<<grid, kQuantThreads, 0, stream>>>(p);
      break;
    case QuantScaleMode::kDynamicPerTensor: {
      const cudaError_t err = cudaMemsetAsync(a.scale, 0, sizeof(float), stream);
      if (err != cudaSuccess) return err;
      tensor_scale_kernel<In, kVec><<<grid, kQuantThreads, 0, stream>>>(p, a.scale);
      p.scale = a.scale;
      quantize_rows_kernel<In, kVec><<<grid, kQuantThreads, 0, stream>>>(p);
      break;
    }
    case QuantScaleMode::kDynamicPerToken: {
      if (a.rows == 0) return cudaSuccess;
      p.token_scale = a.scale;
      const int64_t row_bytes = a.cols * static_cast<int64_t>(sizeof(float));
      if (row_bytes <= kMaxCachedRowBytes) {
        quantize_per_token_kernel<In, kVec, true><<<token_grid, kQuantThreads, row_bytes, stream>>>(p);
      } else {
        quantize_per_token_kernel<In, kVec, false><<<token_grid, kQuantThreads, 0, stream>>>(p);
      }
      break;
    }
    case QuantScaleMode::kDynamicPerGroup:
      return launch_group_quant<In, kVec>(p.input, a, stream);
  }
  return cudaGetLastError();
}

// 16-byte loads when the row length and the base address allow, else the widest that fits
// (odd column counts take the scalar path).
template <template <typename, int> class Input, typename T>
cudaError_t launch_quant_with_width(const Fp8QuantArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.x};
  // Per group, a vector must not straddle two groups: its width divides the group's bytes.
  const int64_t unit = a.mode == QuantScaleMode::kDynamicPerGroup ? a.group_size : a.cols;
  const int vec_bytes = pick_vec_bytes(unit * static_cast<int64_t>(sizeof(T)), ptrs, 1);
  int vec = std::max<int>(1, vec_bytes / static_cast<int>(sizeof(T)));
  // The activation's fp32 bias is read in packs of vec floats: its address must allow them too
  // (rows and column offsets do, as cols is a multiple of vec).
  while (vec > 1 && a.act.bias != nullptr &&
         reinterpret_cast<uintptr_t>(a.act.bias) % (vec * sizeof(float)) != 0)
    vec /= 2;
  constexpr int kMaxVec = 16 / sizeof(T);
  if (vec >= kMaxVec) return launch_quant_typed<Input, T, kMaxVec>(a, stream);
  if constexpr (kMaxVec > 4) {
    if (vec >= 4) return launch_quant_typed<Input, T, 4>(a, stream);
  }
  if (vec >= 2) return launch_quant_typed<Input, T, 2>(a, stream);
  return launch_quant_typed<Input, T, 1>(a, stream);
}

template <template <typename, int> class Input>
cudaError_t launch_quant(const Fp8QuantArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return launch_quant_with_width<Input, float>(a, stream);
    case DType::kFloat16: return launch_quant_with_width<Input, __half>(a, stream);
    case DType::kBFloat16: return launch_quant_with_width<Input, __nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moe_kernels
