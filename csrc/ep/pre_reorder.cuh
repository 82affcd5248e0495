// ep_pre_reorder: scatters each token's row to the rows src2dst[t,k] of its choices whose expert
// lies in this rank's range [start, end], optionally quantizing to fp8 e4m3 on the way.
//
// Scatter by token (as permute_rows.cuh): the row is read once and written to each kept row, and a
// token with no local choice is not read at all (with 8 ranks about a third of the tokens). One
// kernel body serves the plain copy and the quantization; they differ in the Mover policy that
// turns one vector of the source row into one vector of the output row.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/float_convert.cuh"
#include "common/limits.h"
#include "quant/fp8_math.h"

namespace moe_kernels {

constexpr int kPreReorderThreads = 128;

template <typename IdT>
struct PreReorderParams {
  uint8_t* dst;                // [T*K, H] in the Mover's output type
  int64_t dst_row_bytes;
  int64_t vecs_per_row;        // H / (elements per vector)
  const int32_t* src2dst;      // [T, K]
  const IdT* topk_ids;         // [T, K]
  int64_t start_expert;
  int64_t end_expert;          // inclusive
  int64_t num_tokens;
  int topk;
  int64_t num_rows;            // T*K: rows outside [0, num_rows) are never written
};

// Plain copy: rows move as opaque bytes, kVecBytes per access (any element type, fp8 included).
template <int kVecBytes>
struct CopyMover {
  using Out = ByteVec<kVecBytes>;
  const uint8_t* src;
  int64_t src_row_bytes;
  __device__ __forceinline__ float token_scale(int64_t) const { return 0.0f; }
  __device__ __forceinline__ Out load(int64_t t, int64_t v, float) const {
    return reinterpret_cast<const Out*>(src + t * src_row_bytes)[v];
  }
};

// Quantization to e4m3: kVec elements of T in, kVec bytes out. q = e4m3(saturate(x / scale)),
// the division in fp32 (IEEE, as the CPU reference), the rounding to nearest even. The scale is
// scale[0] (per tensor) or scale[t] (kPerToken).
template <typename T, int kVec, bool kPerToken>
struct QuantizeMover {
  using Out = ByteVec<kVec>;
  struct alignas(sizeof(T) * kVec) In { T v[kVec]; };
  const T* src;
  int64_t hidden;
  const float* scale;
  __device__ __forceinline__ float token_scale(int64_t t) const { return scale[kPerToken ? t : 0]; }
  __device__ __forceinline__ Out load(int64_t t, int64_t v, float s) const {
    const In x = reinterpret_cast<const In*>(src + t * hidden)[v];
    float y[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = fp8::div_rn(to_float(x.v[j]), s);
    Out out;
    if constexpr (kVec == 1) {
      out.v = __nv_cvt_float_to_fp8(y[0], __NV_SATFINITE, __NV_E4M3);
    } else {
      // Pairs convert in one instruction; the first element of a pair lands in the low byte.
      uint32_t pairs[kVec / 2];
#pragma unroll
      for (int j = 0; j < kVec / 2; ++j)
        pairs[j] = __nv_cvt_float2_to_fp8x2(make_float2(y[2 * j], y[2 * j + 1]), __NV_SATFINITE, __NV_E4M3);
      if constexpr (kVec == 2) {
        out.v = static_cast<uint16_t>(pairs[0]);
      } else if constexpr (kVec == 4) {
        out.v = pairs[0] | (pairs[1] << 16);
      } else {
        static_assert(kVec == 8, "kVec must be 1, 2, 4 or 8");
        out.v = make_uint2(pairs[0] | (pairs[1] << 16), pairs[2] | (pairs[3] << 16));
      }
    }
    return out;
  }
};

// Grid: x walks tokens, y splits the row into slices of kPreReorderThreads vectors (small T still
// fills the GPU). Per token, warp 0 compacts the kept choices' rows into shared memory; then each
// thread converts one vector of the row once and stores it to every kept row.
template <typename Mover, typename IdT>
__global__ void __launch_bounds__(kPreReorderThreads) pre_reorder_kernel(PreReorderParams<IdT> p, Mover mover) {
  using Out = typename Mover::Out;
  __shared__ int32_t rows[kMaxTopK];
  __shared__ int num_kept;
  const int64_t v = static_cast<int64_t>(blockIdx.y) * kPreReorderThreads + threadIdx.x;
  const int lane = threadIdx.x % 32;

  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < 32) {
      int n = 0;
      for (int k0 = 0; k0 < p.topk; k0 += 32) {
        const int k = k0 + lane;
        bool kept = false;
        int32_t r = -1;
        if (k < p.topk) {
          const int64_t flat = t * p.topk + k;
          const IdT e = p.topk_ids[flat];
          r = p.src2dst[flat];
          // Rows outside [0, T*K) are skipped: nothing is written out of bounds on bad indices.
          kept = e >= p.start_expert && e <= p.end_expert && r >= 0 && r < p.num_rows;
        }
        const unsigned ballot = __ballot_sync(0xffffffffu, kept);
        if (kept) rows[n + __popc(ballot & ((1u << lane) - 1u))] = r;
        n += __popc(ballot);
      }
      if (lane == 0) num_kept = n;
    }
    __syncthreads();
    const int n = num_kept;
    if (n > 0 && v < p.vecs_per_row) {  // a token with no local choice is not read
      const Out value = mover.load(t, v, mover.token_scale(t));
      for (int k = 0; k < n; ++k) reinterpret_cast<Out*>(p.dst + rows[k] * p.dst_row_bytes)[v] = value;
    }
    __syncthreads();  // rows[] and num_kept are reused by the next token
  }
}

}  // namespace moe_kernels
