// Small device helpers shared by the kernels. CUDA headers only: kernels stay readable and
// reusable without torch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace moe_kernels {

// A vector of kBytes bytes, moved with one load/store instruction (16 bytes = 128-bit accesses).
template <int kBytes> struct alignas(kBytes) ByteVec { uint8_t b[kBytes]; };
template <> struct alignas(16) ByteVec<16> { uint4 v; };
template <> struct alignas(8) ByteVec<8> { uint2 v; };
template <> struct alignas(4) ByteVec<4> { uint32_t v; };
template <> struct alignas(2) ByteVec<2> { uint16_t v; };
template <> struct alignas(1) ByteVec<1> { uint8_t v; };

// Largest power-of-two access width (<= 16 bytes) that divides the row pitch and every base
// address, so that rows of any length (H = 2056, H odd) keep a correct, vectorized tail-free path.
inline int pick_vec_bytes(int64_t row_bytes, const void* const* ptrs, int num_ptrs) {
  int vec = 16;
  while (vec > 1) {
    bool ok = row_bytes % vec == 0;
    for (int i = 0; i < num_ptrs && ok; ++i) ok = reinterpret_cast<uintptr_t>(ptrs[i]) % vec == 0;
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace moe_kernels

namespace moe_kernels {

// Programmatic dependent launch (sm_90): a kernel launched with the programmatic-serialization
// attribute may start while the previous kernel on the stream is still running; it must wait at
// wait_for_prerequisite_grid() before reading that kernel's outputs. The previous kernel calls
// allow_dependent_grid() once the dependent may be scheduled. This hides a launch latency
// between back-to-back small kernels (the sort and the row scatter of moe_permute).
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

}  // namespace moe_kernels
