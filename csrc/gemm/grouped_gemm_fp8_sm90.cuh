// The FP8 grouped GEMM of the MoE experts, as a template over one CUTLASS 3.x configuration for
// sm90a (ptr-array, TMA, warp-specialized, FP8 fast accumulation), bf16 output. Each configuration
// is instantiated in its own .cu file (grouped_gemm_fp8_<name>.cu) through
// MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE at the end of this file.
//
// Scales live in the epilogue as an epilogue visitor tree: D = bf16(a_scale * (b_scale * acc)),
// a_scale a column broadcast (one value per output row = token, or one per tensor) and b_scale a
// row broadcast (one value per output column = channel of expert e, or one per expert). Both are
// "dynamic" broadcasts: one compiled kernel serves scalar and vector scales, chosen by a stride flag
// at run time, so per-token / per-channel scales cost no second pass over the output.
//
// The per-expert pointers, strides, problem sizes and scale pointers are written by a small kernel
// from expert_offsets, so nothing is read on the host (graph-capturable, no sync).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "gemm/grouped_gemm_launch.cuh"
#include "gemm/launchers.h"

namespace moe_kernels {
namespace grouped_gemm_fp8 {

using namespace cute;

// One configuration: tile (M, N, K), cluster, kernel and epilogue schedules, and whether the
// operands are swapped. Swap-AB computes out^T = b[e] @ a[rows of e]^T: the weights' N (a hidden or
// intermediate size, thousands) fills the tile's M side and the few rows of a decode batch the
// small N side (a 16- or 32-wide tile instead of 64 rows of padding).
template <class TileShape_, class ClusterShape_, class KernelSchedule_, class EpilogueSchedule_, bool kSwapAB_ = false>
struct Config {
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using KernelSchedule = KernelSchedule_;
  using EpilogueSchedule = EpilogueSchedule_;
  static constexpr bool kSwapAB = kSwapAB_;
};

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M_e, N, K) per expert
using ElementFp8 = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using ElementAccumulator = float;
// Both operands are K-major: CUTLASS's row-major A and column-major B. Unswapped, A = activations
// [M_e, K] and B = weights [N, K]; swapped, A = weights and B = activations. The output [M_e, N]
// row-major is, for the swapped problem, an [N, M_e] column-major D.
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
constexpr int kAlignFp8 = 16;                  // 16 bytes of e4m3: K must be a multiple of 16
constexpr int kAlignD = 8;                     // 16 bytes of bf16: N must be a multiple of 8

// The epilogue visitor tree of a tile shape: col_scale(row) * (row_scale(col) * acc), rounded to
// bf16. Unswapped, the column broadcast holds the per-token a_scale and the row broadcast the
// per-channel b_scale; swapped, the reverse. Pointer-array broadcasts (float*): one scale pointer
// per expert; the bool strides pick vector or scalar per launch. Alignment 1: expert e's
// per-token scales start at any row offset.
template <class TileShape>
struct ScaleEpilogue {
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using ColScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float*, float, Stride<bool, _0, int64_t>, 1>;
  using RowScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float*, float, Stride<_0, bool, int64_t>, 1>;
  using TimesRow = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, RowScale,
      cutlass::epilogue::fusion::Sm90AccFetch>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementD, float, kRound>, ColScale, TimesRow>;

  // Tree arguments nest like the tree: {ColScale, {RowScale, AccFetch, multiply}, multiply}.
  static typename Tree::Arguments arguments(const float** col, bool col_is_vector, const float** row,
                                            bool row_is_vector) {
    return {{col, 0.f, {col_is_vector, _0{}, 0}}, {{row, 0.f, {_0{}, row_is_vector, 0}}, {}, {}}, {}};
  }
};

// Writes expert e's problem size, pointers, strides and scale pointers (one thread per expert).
template <class K>
__global__ void build_grouped_args_kernel(GroupedGemmFp8Args a, typename K::Scratch s) {
  using UnderlyingShape = typename K::UnderlyingShape;
  using StrideA = typename K::StrideA;
  using StrideB = typename K::StrideB;
  using StrideD = typename K::StrideD;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= a.num_experts) return;
  // Offsets are clamped into [0, M] and made non-decreasing here, so that offsets that do not come
  // from moe_permute (past M, decreasing) can give wrong rows but never an access outside a or out.
  const int64_t row0 = min(max(a.expert_offsets[e], int64_t{0}), a.m);
  const int m = static_cast<int>(min(max(a.expert_offsets[e + 1], row0), a.m) - row0);
  const auto* rows = static_cast<const ElementFp8*>(a.a) + row0 * a.k;
  const auto* weights = static_cast<const ElementFp8*>(a.b) + static_cast<int64_t>(e) * a.n * a.k;
  // CUTLASS's (M, N) of this expert: (rows, channels), or (channels, rows) when swapped.
  const int pm = K::kSwapAB ? a.n : m;
  const int pn = K::kSwapAB ? m : a.n;
  s.problem_sizes[e] = UnderlyingShape{pm, pn, a.k};
  s.ptr_a[e] = K::kSwapAB ? weights : rows;
  s.ptr_b[e] = K::kSwapAB ? rows : weights;
  s.ptr_d[e] = static_cast<ElementD*>(a.out) + row0 * a.n;
  s.stride_a[e] = cutlass::make_cute_packed_stride(StrideA{}, {pm, a.k, 1});
  s.stride_b[e] = cutlass::make_cute_packed_stride(StrideB{}, {pn, a.k, 1});
  s.stride_d[e] = cutlass::make_cute_packed_stride(StrideD{}, {pm, pn, 1});
  s.ptr_a_scale[e] = a.a_scale + (a.a_per_token ? row0 : 0);
  s.ptr_b_scale[e] = a.b_scale + (a.b_per_channel ? static_cast<int64_t>(e) * a.n : e);
}

// The kernel of one configuration, its scratch layout and its launch.
template <class Cfg>
struct Kernel {
using TileShape = typename Cfg::TileShape;
using ClusterShape = typename Cfg::ClusterShape;
using KernelSchedule = typename Cfg::KernelSchedule;
using EpilogueSchedule = typename Cfg::EpilogueSchedule;
static constexpr bool kSwapAB = Cfg::kSwapAB;
using LayoutD = cute::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
using Epilogue = ScaleEpilogue<TileShape>;
using Fusion = typename Epilogue::Tree;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
    void, LayoutD*, kAlignD,  // no C operand
    ElementD, LayoutD*, kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementFp8, LayoutA*, kAlignFp8, ElementFp8, LayoutB*, kAlignFp8,
    ElementAccumulator, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

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
  const float** ptr_a_scale;
  const float** ptr_b_scale;
  template <class F>
  void for_each(F&& f) {
    f(problem_sizes), f(ptr_a), f(ptr_b), f(ptr_d), f(stride_a), f(stride_b), f(stride_d), f(ptr_a_scale),
        f(ptr_b_scale);
  }
};

static typename Gemm::Arguments make_arguments(const GroupedGemmFp8Args& a, const Scratch& s) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  hw.sm_count = a.sm_count;
  const auto fusion = kSwapAB ? Epilogue::arguments(s.ptr_b_scale, a.b_per_channel, s.ptr_a_scale, a.a_per_token)
                              : Epilogue::arguments(s.ptr_a_scale, a.a_per_token, s.ptr_b_scale, a.b_per_channel);
  return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {a.num_experts, s.problem_sizes, nullptr},  // sizes live on the device only
                                  {s.ptr_a, s.stride_a, s.ptr_b, s.stride_b},
                                  {fusion, nullptr, s.stride_d, s.ptr_d, s.stride_d},
                                  hw};
}

static void launch_args(const GroupedGemmFp8Args& a, const Scratch& s, cudaStream_t stream) {
  build_grouped_args_kernel<Kernel><<<(a.num_experts + 127) / 128, 128, 0, stream>>>(a, s);
}
};  // struct Kernel

}  // namespace grouped_gemm_fp8
}  // namespace moe_kernels

// Instantiates one configuration (tile and cluster sizes of the CUTLASS problem: with SWAP_AB the
// tile's M side runs over the weights' N) and its three entry points (declared in grouped_gemm_fp8.cpp):
// grouped_gemm_fp8_<name>_scratch_bytes, _workspace_bytes and launch_grouped_gemm_fp8_<name>.
#define MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(name, TILE_M, TILE_N, TILE_K, CLUSTER_M, CLUSTER_N, KERNEL, EPILOGUE, SWAP_AB) \
  namespace moe_kernels {                                                                                 \
  using GroupedGemmFp8_##name = grouped_gemm_fp8::Kernel<grouped_gemm_fp8::Config<                        \
      cute::Shape<cute::Int<TILE_M>, cute::Int<TILE_N>, cute::Int<TILE_K>>,                              \
      cute::Shape<cute::Int<CLUSTER_M>, cute::Int<CLUSTER_N>, cute::_1>, KERNEL, EPILOGUE, SWAP_AB>>;     \
  }                                                                                                       \
  MOE_KERNELS_GROUPED_GEMM_FP8_ENTRY_POINTS(name)
