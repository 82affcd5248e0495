// What the per-channel and the block-scaled grouped GEMMs share: carving the per-expert argument
// arrays out of one scratch buffer, and the launch sequence (the argument kernel writes them on the
// device, then CUTLASS's can_implement / initialize / run on the caller's stream).
//
// A kernel type K provides: Scratch (pointers to its per-expert arrays) with for_each(f) visiting
// each of them, Gemm (CUTLASS's device adapter), make_arguments(args, scratch) and
// launch_args(args, scratch, stream).
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cutlass/cutlass.h>

#include "gemm/launchers.h"

namespace moe_kernels::grouped_gemm_launch {

constexpr size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// Points each array of s at its place in base (E entries each, 256-byte aligned, in the order
// for_each visits them) and returns the bytes used; with base == nullptr it only measures.
template <class K>
size_t layout(void* base, int E, typename K::Scratch* s) {
  size_t used = 0;
  s->for_each([&](auto*& field) {
    using Entry = std::remove_pointer_t<std::remove_reference_t<decltype(field)>>;
    field = reinterpret_cast<Entry*>(reinterpret_cast<uintptr_t>(base) + used);
    used += align256(sizeof(Entry) * E);
  });
  return used;
}

template <class K>
size_t scratch_bytes(int E) {
  typename K::Scratch s{};
  return layout<K>(nullptr, E, &s);
}

template <class K, class Args = GroupedGemmFp8Args>
size_t workspace_bytes(int sm_count) {
  Args a{};
  a.sm_count = sm_count;
  a.num_experts = 1;
  typename K::Scratch s{};
  return K::Gemm::get_workspace_size(K::make_arguments(a, s));
}

template <class K, class Args>
const char* launch(const Args& a, cudaStream_t stream) {
  if (a.num_experts == 0) return "";
  typename K::Scratch s{};
  layout<K>(a.scratch, a.num_experts, &s);
  K::launch_args(a, s, stream);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  typename K::Gemm gemm;
  const auto args = K::make_arguments(a, s);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement these arguments";
  if (gemm.initialize(args, a.workspace, stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS run failed";
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  return "";
}

}  // namespace moe_kernels::grouped_gemm_launch

// The three entry points of configuration `name` (declared in grouped_gemm_fp8.cpp), for the
// kernel type GroupedGemmFp8_##name defined just before.
#define MOE_KERNELS_GROUPED_GEMM_FP8_ENTRY_POINTS(name)                                                   \
  namespace moe_kernels {                                                                                 \
  size_t grouped_gemm_fp8_##name##_scratch_bytes(int E) {                                                 \
    return grouped_gemm_launch::scratch_bytes<GroupedGemmFp8_##name>(E);                                   \
  }                                                                                                       \
  size_t grouped_gemm_fp8_##name##_workspace_bytes(int sms) {                                             \
    return grouped_gemm_launch::workspace_bytes<GroupedGemmFp8_##name>(sms);                               \
  }                                                                                                       \
  const char* launch_grouped_gemm_fp8_##name(const GroupedGemmFp8Args& a, cudaStream_t stream) {          \
    return grouped_gemm_launch::launch<GroupedGemmFp8_##name>(a, stream);                                 \
  }                                                                                                       \
  }  // namespace moe_kernels
