// The block-scaled FP8 grouped GEMM (DeepSeek-V3 / Qwen3-FP8 checkpoints), as a template over one
// CUTLASS 3.x configuration for sm90a: ptr-array, TMA, warp-specialized, with the scales applied in
// the mainloop. Each configuration is instantiated in its own .cu file
// (grouped_gemm_fp8_block_<name>.cu) through MOE_KERNELS_GROUPED_GEMM_FP8_BLOCKWISE_DEFINE.
//
// Scale granularity: activations one fp32 per row per 128 columns of K (a_scale [M, K/128]),
// weights one fp32 per 128x128 block (b_scale [E, N/128, K/128], the checkpoints'
// weight_scale_inv). Block scaling cannot live in the epilogue: each 128-wide K block's partial
// sum is multiplied by a_scale(row, kb) * b_scale(col/128, kb) before it joins the fp32
// accumulator (CUTLASS's "FP8 blockwise" mainloop promotes the wgmma accumulator every K block).
//
// Both scale tensors are K-major (row-major as the quantizer and the checkpoint write them): expert
// e's activation scales start at row expert_offsets[e] of a_scale and need no repacking, whatever
// the number of rows per expert. The mainloop loads scales with cp.async, one float per row per K
// block, from L2 (the tile's 128 rows read 128 scattered floats per 16 KiB of A: cheap).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "gemm/grouped_gemm_launch.cuh"
#include "gemm/launchers.h"

namespace moe_kernels {
namespace grouped_gemm_fp8_blockwise {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M_e, N, K) per expert
using ElementFp8 = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using ElementAccumulator = float;
using LayoutA = cutlass::layout::RowMajor;     // activations [M_e, K], K-major
using LayoutB = cutlass::layout::ColumnMajor;  // weights [N, K] row-major = K-major B
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignFp8 = 16;  // 16 bytes of e4m3
constexpr int kAlignD = 8;     // 16 bytes of bf16

constexpr int kScaleBlock = 128;  // the checkpoints' block edge (weights) and group size (activations)
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kScaleBlock, kScaleBlock, cute::GMMA::Major::K,
                                                              cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

// Writes expert e's problem size, operand and scale pointers, strides and scale layouts.
template <class K>
__global__ void build_blockwise_args_kernel(GroupedGemmFp8Args a, typename K::Scratch s) {
  using UnderlyingShape = typename K::UnderlyingShape;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= a.num_experts) return;
  // Clamped as in the per-channel GEMM: offsets not from moe_permute can give wrong rows, never an
  // access outside a, a_scale or out.
  const int64_t row0 = min(max(a.expert_offsets[e], int64_t{0}), a.m);
  const int m = static_cast<int>(min(max(a.expert_offsets[e + 1], row0), a.m) - row0);
  const int64_t k_blocks = a.k / kScaleBlock;
  const int64_t n_blocks = a.n / kScaleBlock;
  s.problem_sizes[e] = UnderlyingShape{m, a.n, a.k};
  s.ptr_a[e] = static_cast<const ElementFp8*>(a.a) + row0 * a.k;
  s.ptr_b[e] = static_cast<const ElementFp8*>(a.b) + static_cast<int64_t>(e) * a.n * a.k;
  s.ptr_d[e] = static_cast<ElementD*>(a.out) + row0 * a.n;
  s.stride_a[e] = cutlass::make_cute_packed_stride(typename K::StrideA{}, {m, a.k, 1});
  s.stride_b[e] = cutlass::make_cute_packed_stride(typename K::StrideB{}, {a.n, a.k, 1});
  s.stride_d[e] = cutlass::make_cute_packed_stride(typename K::StrideD{}, {m, a.n, 1});
  s.ptr_sfa[e] = a.a_scale + row0 * k_blocks;
  s.ptr_sfb[e] = a.b_scale + static_cast<int64_t>(e) * n_blocks * k_blocks;
  s.layout_sfa[e] = ScaleConfig::tile_atom_to_shape_SFA(make_shape(m, a.n, a.k, 1));
  s.layout_sfb[e] = ScaleConfig::tile_atom_to_shape_SFB(make_shape(m, a.n, a.k, 1));
}

template <class TileShape_, class ClusterShape_, class KernelSchedule_, class EpilogueSchedule_>
struct Kernel {
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;

  // No C operand and alpha = 1: the scales are already in the accumulator.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator, void, LayoutD*,
      kAlignD, ElementD, LayoutD*, kAlignD, EpilogueSchedule_>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementFp8, cute::tuple<LayoutA*, LayoutSFA*>, kAlignFp8,
      ElementFp8, cute::tuple<LayoutB*, LayoutSFB*>, kAlignFp8, ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule_>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;

  // The per-expert arrays CUTLASS reads, carved from one scratch buffer (grouped_gemm_launch.cuh).
  struct Scratch {
    UnderlyingShape* problem_sizes;
    const ElementFp8** ptr_a;
    const ElementFp8** ptr_b;
    ElementD** ptr_d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    const float** ptr_sfa;
    const float** ptr_sfb;
    LayoutSFA* layout_sfa;
    LayoutSFB* layout_sfb;
    template <class F>
    void for_each(F&& f) {
      f(problem_sizes), f(ptr_a), f(ptr_b), f(ptr_d), f(stride_a), f(stride_b), f(stride_d), f(ptr_sfa), f(ptr_sfb),
          f(layout_sfa), f(layout_sfb);
    }
  };

  static typename Gemm::Arguments make_arguments(const GroupedGemmFp8Args& a, const Scratch& s) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = a.sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {a.num_experts, s.problem_sizes, nullptr},  // sizes live on the device only
        {s.ptr_a, s.stride_a, s.ptr_b, s.stride_b, s.ptr_sfa, s.layout_sfa, s.ptr_sfb, s.layout_sfb},
        {{}, nullptr, s.stride_d, s.ptr_d, s.stride_d},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }

  static void launch_args(const GroupedGemmFp8Args& a, const Scratch& s, cudaStream_t stream) {
    build_blockwise_args_kernel<Kernel><<<(a.num_experts + 127) / 128, 128, 0, stream>>>(a, s);
  }
};

}  // namespace grouped_gemm_fp8_blockwise
}  // namespace moe_kernels

// Instantiates one block-scaled configuration and its three entry points (declared in
// grouped_gemm_fp8.cpp): grouped_gemm_fp8_<name>_scratch_bytes, _workspace_bytes and
// launch_grouped_gemm_fp8_<name>.
#define MOE_KERNELS_GROUPED_GEMM_FP8_BLOCKWISE_DEFINE(name, TILE_M, TILE_N, TILE_K, CLUSTER_M, CLUSTER_N, KERNEL,   \
                                                      EPILOGUE)                                                   \
  namespace moe_kernels {                                                                                         \
  using GroupedGemmFp8_##name = grouped_gemm_fp8_blockwise::Kernel<                                               \
      cute::Shape<cute::Int<TILE_M>, cute::Int<TILE_N>, cute::Int<TILE_K>>,                                      \
      cute::Shape<cute::Int<CLUSTER_M>, cute::Int<CLUSTER_N>, cute::_1>, KERNEL, EPILOGUE>;                       \
  }                                                                                                               \
  MOE_KERNELS_GROUPED_GEMM_FP8_ENTRY_POINTS(name)
