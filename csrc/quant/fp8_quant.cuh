// FP8 (e4m3) quantization of rows: scaled_fp8_quant (y = x) and silu_and_mul_quant_fp8
// (y = act(gate, up), gated_act.h) share these kernels; they differ only in the Input policy that
// produces y, kVec values at a time, from one 16-byte (or narrower) load per input half-row.
//
// Scales, three ways:
// - static per-tensor: quantize_rows_kernel reads the given scale (one pass over x);
// - dynamic per-tensor: tensor_scale_kernel reduces amax per block and takes the maximum of the
//   per-block scales with an atomicMax on the float bits (positive floats order like their bits),
//   then quantize_rows_kernel (two passes over x, no host sync);
// - dynamic per-token: quantize_per_token_kernel, a row per warp or per team of warps, held in
//   registers while its amax is reduced (one pass over x; see the kernel).
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
// expert's bias), then load(row, v, y) produces kVec values of y, vector v of the row. load is
// fetch (the global loads of vector v into a Raw) then compute (Raw -> y): kernels that hold
// several vectors issue every fetch before the first compute, so that their loads are in flight
// together instead of one after another.

// y = x: row r of x [rows, cols].
template <typename T, int kVec>
struct PlainInput {
  const T* x;
  int64_t cols;
  using Row = const T*;
  using Raw = ElemPack<T, kVec>;
  static constexpr bool kCheapCompute = true;  // compute is a conversion
  static PlainInput make(const Fp8QuantArgs& a) { return {static_cast<const T*>(a.x), a.cols}; }
  __device__ __forceinline__ Row row(int64_t r) const { return x + r * cols; }
  __device__ __forceinline__ void fetch(Row row, int64_t v, Raw& raw) const {
    raw = reinterpret_cast<const Raw*>(row)[v];
  }
  __device__ __forceinline__ void compute(Row, int64_t, const Raw& raw, float (&y)[kVec]) const {
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = to_float(raw.v[j]);
  }
  __device__ __forceinline__ void load(Row row, int64_t v, float (&y)[kVec]) const {
    Raw raw;
    fetch(row, v, raw);
    compute(row, v, raw, y);
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
  static constexpr bool kCheapCompute = false;  // compute is the activation
  // The row's two packs of vector v: gate and up (concatenated), or the 2*kVec values holding
  // gate and up of its kVec columns (interleaved: lo, then hi).
  struct Raw {
    ElemPack<T, kVec> a;
    ElemPack<T, kVec> b;
  };
  __device__ __forceinline__ void fetch(const Row& row, int64_t v, Raw& raw) const {
    const auto* packs = reinterpret_cast<const ElemPack<T, kVec>*>(row.x);
    if constexpr (kInterleaved) {
      raw.a = packs[2 * v];
      raw.b = packs[2 * v + 1];
    } else {
      raw.a = packs[v];
      raw.b = reinterpret_cast<const ElemPack<T, kVec>*>(row.x + cols)[v];
    }
  }
  __device__ __forceinline__ void compute(const Row& row, int64_t v, const Raw& raw, float (&y)[kVec]) const {
    float g[kVec];
    float u[kVec];
    if constexpr (kInterleaved) {
      // gate at even, up at odd positions of the 2*kVec values.
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int i = 2 * j;  // position of gate j among the 2*kVec values
        g[j] = to_float(i < kVec ? raw.a.v[i] : raw.b.v[i - kVec]);
        u[j] = to_float(i + 1 < kVec ? raw.a.v[i + 1] : raw.b.v[i + 1 - kVec]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        g[j] = to_float(raw.a.v[j]);
        u[j] = to_float(raw.b.v[j]);
      }
    }
    if (row.bias != nullptr) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int64_t c = v * kVec + j;
        g[j] = fp8::add_rn(g[j], row.bias[gate_pos(kInterleaved, cols, c)]);
        u[j] = fp8::add_rn(u[j], row.bias[up_pos(kInterleaved, cols, c)]);
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = act(g[j], u[j]);
  }
  __device__ __forceinline__ void load(const Row& row, int64_t v, float (&y)[kVec]) const {
    Raw raw;
    fetch(row, v, raw);
    compute(row, v, raw, y);
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

// Dynamic per-token: quantize_per_token_kernel. A row belongs to a team of warps_per_row warps
// (1, 2, 4 or 8: the launcher takes the fewest that hold the row) inside a block of
// kTokenThreads; each thread holds up to token_items<Input>() vectors of its row in registers,
// vectors t, t + team size, ... (a warp's loads are contiguous). A thread issues the loads of all
// its vectors first (64 or 128 bytes in flight for a 16-byte vector width), then computes, then
// the team reduces the row's amax: warp shuffles only for a one-warp team, plus one barrier for a
// wider one; y is then quantized from the registers, so that every row is read once.
// Rows longer than a team holds (above 8192 gated or 16384 plain bf16 columns) are walked in
// chunks of that size, the last one held in registers. The earlier chunks' y go to shared memory
// when it fits (cache_chunks; Mixtral's 14336 gated columns: one 32 KiB chunk), else they are
// loaded and computed again after the reduction (an L2 hit for most rows).
constexpr int kTokenThreads = 256;
constexpr int kTokenMaxWarps = kTokenThreads / 32;

// What a thread holds: the loaded vectors themselves (Raw) when computing y from them is a mere
// conversion (PlainInput: half the registers of fp32 y for 16-bit inputs, so twice the vectors),
// else y in fp32 (the gated activation is computed once). Sized so that a thread stays near 128
// registers (two blocks an SM): the activations' arithmetic takes most of them.
template <typename Input>
constexpr bool kTokenHoldsRaw = Input::kCheapCompute;
template <typename Input>
constexpr int token_items() { return kTokenHoldsRaw<Input> ? 8 : 4; }

// Fetches the vectors v0 + i * stride (i < kItems) that lie below n: every load is issued before
// any value is used.
template <typename Input, int kItems>
__device__ __forceinline__ void fetch_items(const Input& in, const typename Input::Row& row, int n, int v0, int stride,
                                            typename Input::Raw (&raw)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (v0 + i * stride < n) in.fetch(row, v0 + i * stride, raw[i]);
  }
}

// Vector indices inside a row are ints (the launcher checks the bound): 32-bit index arithmetic
// leaves registers to the activations. Row offsets are 64-bit.
template <typename Input, int kVec>
__global__ void __launch_bounds__(kTokenThreads, 2)
    quantize_per_token_kernel(QuantParams<Input> p, int warps_per_row, bool cache_chunks) {
  constexpr int kItems = token_items<Input>();
  constexpr bool kHoldRaw = kTokenHoldsRaw<Input>;
  // One float per warp, twice: a row writes buffer k % 2 (k counts the block's rows) before its
  // barrier and reads it after; a warp can write that buffer again (row k + 2) only after every
  // warp has passed the barrier of row k + 1, hence finished reading. One barrier per row.
  __shared__ float warp_max[2][kTokenMaxWarps];
  // cache_chunks: y of chunks 0 .. last_chunk - 1, at ((c * kItems + i) * kVec + j) * team + t
  // (consecutive threads, consecutive banks); each thread reads back only what it wrote.
  extern __shared__ float chunk_cache[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int team = warp / warps_per_row;  // the block's row this thread works on
  const int team_threads = 32 * warps_per_row;
  const int t = threadIdx.x - team * team_threads;  // place in the team
  const int rows_per_block = kTokenMaxWarps / warps_per_row;
  const int n = static_cast<int>(p.vecs_per_row);
  const int chunk = team_threads * kItems;  // vectors a team holds
  const int last_chunk = n > 0 ? (n - 1) / chunk : 0;
  auto cached = [&](int c, int i, int j) -> float& {
    return chunk_cache[((c * kItems + i) * kVec + j) * team_threads + t];
  };
  int buffer = 0;
  // The loop bounds and warps_per_row are the block's, not the team's: every thread reaches every
  // barrier; teams past the last row only skip their loads and stores.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < p.rows;
       first += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t r = first + team;
    const bool valid = r < p.rows;
    const auto row = p.input.row(valid ? r : first);
    const int n_valid = valid ? n : 0;
    uint8_t* q_row = p.q + r * p.vecs_per_row * kVec;
    typename Input::Raw raw[kItems];
    float y[kHoldRaw ? 1 : kItems][kVec];
    // y of item i, from the registers or computed from its raw vector.
    auto item_y = [&](int i, int v, float (&out)[kVec]) {
      if constexpr (kHoldRaw) {
        p.input.compute(row, v, raw[i], out);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) out[j] = y[i][j];
      }
    };
    float amax = 0.0f;
    float inv_scale = 0.0f;
    // Steps 0..last_chunk reduce the amax of chunk s; the steps after quantize chunk
    // 2 * last_chunk + 1 - s, from the last one (still held) down. One loop, so that the
    // activation's code is emitted once.
    for (int s = 0; s <= 2 * last_chunk + 1; ++s) {
      const bool reducing = s <= last_chunk;
      const int c = reducing ? s : 2 * last_chunk + 1 - s;
      const int v0 = c * chunk + t;
      const bool from_cache = !reducing && c != last_chunk && cache_chunks;
      if (reducing || (c != last_chunk && !cache_chunks)) {
        fetch_items<Input, kItems>(p.input, row, n_valid, v0, team_threads, raw);
        if constexpr (!kHoldRaw) {
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            if (v0 + i * team_threads < n_valid) p.input.compute(row, v0 + i * team_threads, raw[i], y[i]);
          }
        }
      }
      if (!reducing) {
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int v = v0 + i * team_threads;
          if (v < n_valid) {
            float yi[kVec];
            if (from_cache) {
#pragma unroll
              for (int j = 0; j < kVec; ++j) yi[j] = cached(c, i, j);
            } else {
              item_y(i, v, yi);
            }
            store_e4m3<kVec>(q_row + static_cast<int64_t>(v) * kVec, yi, inv_scale);
          }
        }
        continue;
      }
      const bool to_cache = c != last_chunk && cache_chunks;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int v = v0 + i * team_threads;
        if (v < n_valid) {
          float yi[kVec];
          item_y(i, v, yi);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            amax = fmaxf(amax, fp8::amax_term(yi[j]));
            if (to_cache) cached(c, i, j) = yi[j];
          }
        }
      }
      if (c != last_chunk) continue;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
      if (warps_per_row > 1) {
        if (lane == 0) warp_max[buffer][warp] = amax;
        __syncthreads();
        amax = 0.0f;
        for (int w = team * warps_per_row; w < (team + 1) * warps_per_row; ++w) amax = fmaxf(amax, warp_max[buffer][w]);
        buffer ^= 1;
      }
      const float scale = fp8::scale_from_amax(amax);
      if (valid && t == 0) p.token_scale[r] = scale;
      inv_scale = fp8::inverse_scale(scale);
    }
  }
}

}  // namespace moe_kernels
