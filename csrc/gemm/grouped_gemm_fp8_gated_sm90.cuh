// GEMM1 of the FP8 expert layer with the gated activation and the output's fp8 quantization in its
// epilogue (gated_quant_epilogue.cuh): out [M, N/2] e4m3 from a [M, K] e4m3 and interleaved
// gate/up weights b [E, N, K]. The mainloop is the per-channel grouped GEMM's (same tile, cluster
// and schedule as its 128x256x128 cooperative configuration, so the same accumulators); only the
// epilogue differs. Each configuration in its own .cu file (grouped_gemm_fp8_gated_<name>.cu)
// through MOE_KERNELS_GATED_GEMM_DEFINE below; the choice: grouped_gemm_fp8_gated.cpp.
#pragma once
#include "gemm/gated_quant_epilogue.cuh"
#include "gemm/grouped_gemm_fp8_sm90.cuh"

namespace moe_kernels {
namespace grouped_gemm_fp8 {

// Expert e's problem size, operand pointers and strides, and the epilogue's per-expert pointers
// (one thread per expert), as build_grouped_args_kernel does for the bf16-output GEMM.
template <class K>
__global__ void build_gated_args_kernel(GroupedGemmFp8GatedArgs a, typename K::Scratch s) {
  using UnderlyingShape = typename K::UnderlyingShape;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= a.num_experts) return;
  // Clamped as in build_grouped_args_kernel: offsets that do not come from moe_permute can give
  // wrong rows but never an access outside a or out.
  const int64_t row0 = min(max(a.expert_offsets[e], int64_t{0}), a.m);
  const int m = static_cast<int>(min(max(a.expert_offsets[e + 1], row0), a.m) - row0);
  s.problem_sizes[e] = UnderlyingShape{m, a.n, a.k};
  s.ptr_a[e] = static_cast<const ElementFp8*>(a.a) + row0 * a.k;
  s.ptr_b[e] = static_cast<const ElementFp8*>(a.b) + static_cast<int64_t>(e) * a.n * a.k;
  s.stride_a[e] = cutlass::make_cute_packed_stride(typename K::StrideA{}, {m, a.k, 1});
  s.stride_b[e] = cutlass::make_cute_packed_stride(typename K::StrideB{}, {a.n, a.k, 1});
  s.ptr_out[e] = static_cast<uint8_t*>(a.out) + row0 * (a.n / 2);
  s.ptr_a_scale[e] = a.a_scale + (a.a_per_token ? row0 : 0);
  s.ptr_b_scale[e] = a.b_scale + (a.b_per_channel ? static_cast<int64_t>(e) * a.n : e);
  s.ptr_bias[e] = a.bias != nullptr ? a.bias + static_cast<int64_t>(e) * a.n : nullptr;
}

template <class Cfg>
struct GatedKernel {
  using TileShape = typename Cfg::TileShape;
  using ClusterShape = typename Cfg::ClusterShape;
  static_assert(!Cfg::kSwapAB, "the epilogue pairs accumulator columns: the weights' N must be the tile's N");
  using CollectiveEpilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<GatedQuantEpilogueArray>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementFp8, LayoutA*, kAlignFp8, ElementFp8, LayoutB*,
      kAlignFp8, ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;

  struct Scratch {
    UnderlyingShape* problem_sizes;
    const ElementFp8** ptr_a;
    const ElementFp8** ptr_b;
    StrideA* stride_a;
    StrideB* stride_b;
    uint8_t** ptr_out;
    const float** ptr_a_scale;
    const float** ptr_b_scale;
    const float** ptr_bias;
    template <class F>
    void for_each(F&& f) {
      f(problem_sizes), f(ptr_a), f(ptr_b), f(stride_a), f(stride_b), f(ptr_out), f(ptr_a_scale), f(ptr_b_scale),
          f(ptr_bias);
    }
  };

  static typename Gemm::Arguments make_arguments(const GroupedGemmFp8GatedArgs& a, const Scratch& s) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = a.sm_count;
    GatedQuantEpilogueArguments epilogue{s.ptr_out,
                                         s.ptr_a_scale,
                                         s.ptr_b_scale,
                                         a.bias != nullptr ? s.ptr_bias : nullptr,
                                         a.out_scale,
                                         a.a_per_token,
                                         a.b_per_channel,
                                         static_cast<GatedActivation>(a.activation),
                                         a.swiglu_alpha,
                                         a.swiglu_limit};
    return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                    {a.num_experts, s.problem_sizes, nullptr},  // sizes live on the device only
                                    {s.ptr_a, s.stride_a, s.ptr_b, s.stride_b},
                                    epilogue,
                                    hw};
  }

  static void launch_args(const GroupedGemmFp8GatedArgs& a, const Scratch& s, cudaStream_t stream) {
    build_gated_args_kernel<GatedKernel><<<(a.num_experts + 127) / 128, 128, 0, stream>>>(a, s);
  }
};

}  // namespace grouped_gemm_fp8
}  // namespace moe_kernels

// Instantiates one configuration of the fused GEMM1 and its entry points (declared in
// grouped_gemm_fp8_gated.cpp): grouped_gemm_fp8_gated_<name>_scratch_bytes, _workspace_bytes and
// launch_grouped_gemm_fp8_gated_<name>.
#define MOE_KERNELS_GATED_GEMM_DEFINE(name, TILE_M, TILE_N, TILE_K, CLUSTER_M, CLUSTER_N, KERNEL)              \
  namespace moe_kernels {                                                                                   \
  using GatedGemm_##name = grouped_gemm_fp8::GatedKernel<grouped_gemm_fp8::Config<                          \
      cute::Shape<cute::Int<TILE_M>, cute::Int<TILE_N>, cute::Int<TILE_K>>,                                \
      cute::Shape<cute::Int<CLUSTER_M>, cute::Int<CLUSTER_N>, cute::_1>, KERNEL,                           \
      cutlass::epilogue::PtrArrayNoSmemWarpSpecialized>>;                                                   \
  size_t grouped_gemm_fp8_gated_##name##_scratch_bytes(int E) {                                             \
    return grouped_gemm_launch::scratch_bytes<GatedGemm_##name>(E);                                          \
  }                                                                                                         \
  size_t grouped_gemm_fp8_gated_##name##_workspace_bytes(int sms) {                                         \
    return grouped_gemm_launch::workspace_bytes<GatedGemm_##name, GroupedGemmFp8GatedArgs>(sms);             \
  }                                                                                                         \
  const char* launch_grouped_gemm_fp8_gated_##name(const GroupedGemmFp8GatedArgs& a, cudaStream_t stream) { \
    return grouped_gemm_launch::launch<GatedGemm_##name>(a, stream);                                         \
  }                                                                                                         \
  }  // namespace moe_kernels
