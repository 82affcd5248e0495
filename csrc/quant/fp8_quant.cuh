// FP8 (e4m3) quantization of rows: scaled_fp8_quant (y = x) and silu_and_mul_quant_fp8
// (y = act(gate, up), gated_act.h) share these kernels; they differ only in the Input policy that
// produces y, kVec values at a time, from one 16-byte (or narrower) load per input half-row.
//
// Scales, three ways:
// - static per-tensor: quantize_rows_kernel reads the given scale (one pass over x);
// - dynamic per-tensor: tensor_scale_kernel reduces amax per block and takes the maximum of the
//   per-block scales with an atomicMax on the float bits (positive floats order like their bits),
//   then quantize_rows_kernel (two passes over x, no host sync);
// - dynamic per-token: quantize_per_token_kernel, one block per row: y is computed once, kept in
//   shared memory (kCacheRow, when the row fits) while the block reduces its amax, then quantized
//   (one pass over x); longer rows recompute y from x in the second pass (an L2 hit).
//
// Arithmetic: fp8_math.h, shared with the CPU reference.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include "common/float_convert.cuh"
#include "quant/fp8_math.h"
#include "quant/gated_act.h"
#include "quant/launchers.h"

namespace moe_kernels {

constexpr int kQuantThreads = 128;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) ElemPack {
  T v[kVec];
};

// Input policies: row(r) resolves what a row needs once (its address; for the gated input, its
// expert's bias), then load(row, v, y) produces kVec values of y, vector v of the row.

// y = x: row r of x [rows, cols].
template <typename T, int kVec>
struct PlainInput {
  const T* x;
  int64_t cols;
  using Row = const T*;
  static PlainInput make(const Fp8QuantArgs& a) { return {static_cast<const T*>(a.x), a.cols}; }
  __device__ __forceinline__ Row row(int64_t r) const { return x + r * cols; }
  __device__ __forceinline__ void load(Row row, int64_t v, float (&y)[kVec]) const {
    const ElemPack<T, kVec> p = reinterpret_cast<const ElemPack<T, kVec>*>(row)[v];
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = to_float(p.v[j]);
  }
};

// y = act(gate + bias_gate, up + bias_up) (gated_act.h): row r of x [rows, 2*cols] holds gate in
// its first cols columns and up in the last cols (vLLM's w13 output), or, kInterleaved, gate and
// up alternating (gpt-oss). The bias, when given, is the row's expert's [2*cols] fp32 row.
template <typename T, int kVec, typename Act, bool kInterleaved>
struct GatedInput {
  const T* x;
  int64_t cols;
  Act act;
  const float* bias;              // [num_experts, 2*cols] or nullptr
  const int64_t* expert_offsets;  // [num_experts + 1]
  int64_t num_experts;
  struct Row {
    const T* x;
    const float* bias;  // nullptr: no bias for this row
  };
  static GatedInput make(const Fp8QuantArgs& a) {
    return {static_cast<const T*>(a.x), a.cols, Act::make(a.act), a.act.bias, a.act.expert_offsets,
            a.act.num_experts};
  }
  __device__ __forceinline__ Row row(int64_t r) const {
    const float* b = nullptr;
    if (bias != nullptr) {
      const int64_t e = row_expert(expert_offsets, num_experts, r);
      if (e >= 0) b = bias + e * 2 * cols;
    }
    return {x + r * 2 * cols, b};
  }
  __device__ __forceinline__ void load(const Row& row, int64_t v, float (&y)[kVec]) const {
    float g[kVec];
    float u[kVec];
    if constexpr (kInterleaved) {
      // 2*kVec consecutive values (two packs): gate at even, up at odd positions.
      const auto* packs = reinterpret_cast<const ElemPack<T, kVec>*>(row.x);
      const ElemPack<T, kVec> lo = packs[2 * v];
      const ElemPack<T, kVec> hi = packs[2 * v + 1];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int i = 2 * j;  // position of gate j among the 2*kVec values
        g[j] = to_float(i < kVec ? lo.v[i] : hi.v[i - kVec]);
        u[j] = to_float(i + 1 < kVec ? lo.v[i + 1] : hi.v[i + 1 - kVec]);
      }
    } else {
      const ElemPack<T, kVec> gp = reinterpret_cast<const ElemPack<T, kVec>*>(row.x)[v];
      const ElemPack<T, kVec> up = reinterpret_cast<const ElemPack<T, kVec>*>(row.x + cols)[v];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        g[j] = to_float(gp.v[j]);
        u[j] = to_float(up.v[j]);
      }
    }
    if (row.bias != nullptr) {
      // The bias of these values, in the row's order: packs of kVec floats (the launcher keeps
      // the bias aligned to them), not one scalar load per value.
      float bg[kVec];
      float bu[kVec];
      if constexpr (kInterleaved) {
        const auto* packs = reinterpret_cast<const ElemPack<float, kVec>*>(row.bias);
        const ElemPack<float, kVec> lo = packs[2 * v];
        const ElemPack<float, kVec> hi = packs[2 * v + 1];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int i = 2 * j;
          bg[j] = i < kVec ? lo.v[i] : hi.v[i - kVec];
          bu[j] = i + 1 < kVec ? lo.v[i + 1] : hi.v[i + 1 - kVec];
        }
      } else {
        const ElemPack<float, kVec> gp = reinterpret_cast<const ElemPack<float, kVec>*>(row.bias)[v];
        const ElemPack<float, kVec> up = reinterpret_cast<const ElemPack<float, kVec>*>(row.bias + cols)[v];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          bg[j] = gp.v[j];
          bu[j] = up.v[j];
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        g[j] = fp8::add_rn(g[j], bg[j]);
        u[j] = fp8::add_rn(u[j], bu[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = act(g[j], u[j]);
  }
};

// Stores kVec scaled values as e4m3 (saturated, round to nearest even) with one kVec-byte access.
template <int kVec>
__device__ __forceinline__ void store_scaled_e4m3(uint8_t* dst, const float (&s)[kVec]) {
  if constexpr (kVec == 1) {
    *dst = __nv_cvt_float_to_fp8(s[0], __NV_SATFINITE, __NV_E4M3);
  } else {
    // Pairs convert in one instruction; the first element of a pair lands in the low byte.
    uint16_t pairs[kVec / 2];
#pragma unroll
    for (int j = 0; j < kVec / 2; ++j)
      pairs[j] = __nv_cvt_float2_to_fp8x2(make_float2(s[2 * j], s[2 * j + 1]), __NV_SATFINITE, __NV_E4M3);
    if constexpr (kVec == 2) {
      *reinterpret_cast<uint16_t*>(dst) = pairs[0];
    } else if constexpr (kVec == 4) {
      *reinterpret_cast<uint32_t*>(dst) = pairs[0] | (static_cast<uint32_t>(pairs[1]) << 16);
    } else {
      static_assert(kVec == 8, "kVec must be 1, 2, 4 or 8");
      *reinterpret_cast<uint2*>(dst) = make_uint2(pairs[0] | (static_cast<uint32_t>(pairs[1]) << 16),
                                                  pairs[2] | (static_cast<uint32_t>(pairs[3]) << 16));
    }
  }
}

// Stores kVec values quantized with a per-tensor or per-token scale: y * (1 / scale).
template <int kVec>
__device__ __forceinline__ void store_e4m3(uint8_t* dst, const float (&y)[kVec], float inv_scale) {
  float s[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) s[j] = fp8::mul_rn(y[j], inv_scale);
  store_scaled_e4m3<kVec>(dst, s);
}

// The maximum of v over the block (NaN ignored); every thread gets it. `warp_max` holds one float
// per warp; the call ends with a barrier, so the caller may reuse it right away.
__device__ __forceinline__ float block_max(float v, float* warp_max) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) warp_max[warp] = v;
  __syncthreads();
  float m = 0.0f;
#pragma unroll
  for (int w = 0; w < kQuantThreads / 32; ++w) m = fmaxf(m, warp_max[w]);
  __syncthreads();
  return m;
}

template <typename Input>
struct QuantParams {
  Input input;
  int64_t rows;
  int64_t vecs_per_row;        // cols / kVec
  uint8_t* q;                  // [rows, cols], e4m3 bytes
  const float* scale;          // per-tensor modes: [1], read after the producer wrote it
  float* scale_copy;           // static mode: the op's scale output (a copy of *scale), else nullptr
  float* token_scale;          // per-token mode: [rows]
};

// Dynamic per-tensor, pass 1: scale = max over blocks of scale_from_amax(block amax), into
// *scale, which the launcher zeroed. Every block, even one with no rows, contributes (at least
// kMinScale), so that rows = 0 still yields a valid scale.
// Calls f(r, v) for every (row, vector) of rows x vecs_per_row, spread over the whole grid as one
// flat index space, so that rows shorter than a block (Qwen3's 1536 columns are 192 vectors for
// 128 threads) leave no lanes idle. The division happens once per thread; each grid-stride step
// then adds the stride's whole rows and remaining vectors.
template <typename F>
__device__ __forceinline__ void for_each_row_vector(int64_t rows, int64_t vecs_per_row, F&& f) {
  if (vecs_per_row == 0) return;  // rows of no columns: nothing to visit (and no division by 0)
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride_rows = stride / vecs_per_row;
  const int64_t stride_vecs = stride - stride_rows * vecs_per_row;
  int64_t r = first / vecs_per_row;
  int64_t v = first - r * vecs_per_row;
  while (r < rows) {
    f(r, v);
    r += stride_rows;
    v += stride_vecs;
    if (v >= vecs_per_row) {
      v -= vecs_per_row;
      ++r;
    }
  }
}

// Dynamic per-tensor, pass 1: scale = max over blocks of scale_from_amax(block amax), into
// *scale, which the launcher zeroed. Every block, even one with no rows, contributes (at least
// kMinScale), so that rows = 0 still yields a valid scale.
template <typename Input, int kVec>
__global__ void __launch_bounds__(kQuantThreads) tensor_scale_kernel(QuantParams<Input> p, float* scale) {
  __shared__ float warp_max[kQuantThreads / 32];
  float amax = 0.0f;
  for_each_row_vector(p.rows, p.vecs_per_row, [&](int64_t r, int64_t v) {
    float y[kVec];
    p.input.load(p.input.row(r), v, y);
#pragma unroll
    for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, fp8::amax_term(y[j]));
  });
  amax = block_max(amax, warp_max);
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(scale), __float_as_int(fp8::scale_from_amax(amax)));
}

// Per-tensor quantization with the scale in *p.scale (given, or computed by tensor_scale_kernel).
template <typename Input, int kVec>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(QuantParams<Input> p) {
  const float scale = *p.scale;
  if (p.scale_copy != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *p.scale_copy = scale;
  const float inv_scale = fp8::inverse_scale(scale);
  for_each_row_vector(p.rows, p.vecs_per_row, [&](int64_t r, int64_t v) {
    float y[kVec];
    p.input.load(p.input.row(r), v, y);
    store_e4m3<kVec>(p.q + (r * p.vecs_per_row + v) * kVec, y, inv_scale);
  });
}

// Dynamic per-token: one block per row. With kCacheRow, y goes to shared memory (component-major,
// cache[j * vecs_per_row + v], so that a warp's accesses fall in distinct banks) and is read back
// by the same thread after the reduction; without, it is recomputed from x.
template <typename Input, int kVec, bool kCacheRow>
__global__ void __launch_bounds__(kQuantThreads) quantize_per_token_kernel(QuantParams<Input> p) {
  __shared__ float warp_max[kQuantThreads / 32];
  extern __shared__ float cache[];  // [kVec * vecs_per_row] floats when kCacheRow
  const int64_t n = p.vecs_per_row;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const auto row = p.input.row(r);
    float amax = 0.0f;
    for (int64_t v = threadIdx.x; v < n; v += kQuantThreads) {
      float y[kVec];
      p.input.load(row, v, y);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        amax = fmaxf(amax, fp8::amax_term(y[j]));
        if constexpr (kCacheRow) cache[j * n + v] = y[j];
      }
    }
    const float scale = fp8::scale_from_amax(block_max(amax, warp_max));
    if (threadIdx.x == 0) p.token_scale[r] = scale;
    const float inv_scale = fp8::inverse_scale(scale);
    uint8_t* q_row = p.q + r * n * kVec;
    for (int64_t v = threadIdx.x; v < n; v += kQuantThreads) {
      float y[kVec];
      if constexpr (kCacheRow) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) y[j] = cache[j * n + v];
      } else {
        p.input.load(row, v, y);
      }
      store_e4m3<kVec>(q_row + v * kVec, y, inv_scale);
    }
    // The next row overwrites only this thread's own cache slots, read above by this thread:
    // no barrier needed (block_max's barriers order warp_max).
  }
}

}  // namespace moe_kernels
