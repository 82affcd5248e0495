// The FP8 grouped GEMM of the MoE experts, as a template over one CUTLASS 3.x configuration for
// sm90a (ptr-array, TMA, warp-specialized, FP8 fast accumulation), bf16 output, a per-expert alpha
// in the epilogue. Each configuration is instantiated in its own .cu file (grouped_gemm_fp8_*.cu).
// The per-expert pointers, strides and problem sizes are written by a small kernel from
// expert_offsets, so nothing is read on the host (graph-capturable, no sync).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "gemm/launchers.h"

namespace moe_kernels {
namespace grouped_gemm_fp8 {

using namespace cute;

// One configuration: tile (M, N, K), cluster, kernel and epilogue schedules.
template <class TileShape_, class ClusterShape_, class KernelSchedule_, class EpilogueSchedule_>
struct Config {
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using KernelSchedule = KernelSchedule_;
  using EpilogueSchedule = EpilogueSchedule_;
};

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M_e, N, K) per expert
using ElementA = cutlass::float_e4m3_t;
using ElementB = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using ElementAccumulator = float;
using LayoutA = cutlass::layout::RowMajor;     // activations [M, K]
using LayoutB = cutlass::layout::ColumnMajor;  // weights [N, K] row-major = K-major B
using LayoutD = cutlass::layout::RowMajor;     // output [M, N]
constexpr int kAlignA = 16;                    // 16 bytes of e4m3: K must be a multiple of 16
constexpr int kAlignB = 16;
constexpr int kAlignD = 8;                     // 16 bytes of bf16: N must be a multiple of 8

constexpr size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// Writes expert e's problem size, pointers, strides and alpha (one thread per expert).
template <class K>
__global__ void build_grouped_args_kernel(GroupedGemmFp8Args a, typename K::Scratch s) {
  using UnderlyingShape = typename K::UnderlyingShape;
  using StrideA = typename K::StrideA;
  using StrideB = typename K::StrideB;
  using StrideD = typename K::StrideD;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= a.num_experts) return;
  const int64_t row0 = a.expert_offsets[e];
  const int m = static_cast<int>(a.expert_offsets[e + 1] - row0);
  s.problem_sizes[e] = UnderlyingShape{m, a.n, a.k};
  s.ptr_a[e] = static_cast<const ElementA*>(a.a) + row0 * a.k;
  s.ptr_b[e] = static_cast<const ElementB*>(a.b) + static_cast<int64_t>(e) * a.n * a.k;
  s.ptr_d[e] = static_cast<ElementD*>(a.out) + row0 * a.n;
  s.stride_a[e] = cutlass::make_cute_packed_stride(StrideA{}, {m, a.k, 1});
  s.stride_b[e] = cutlass::make_cute_packed_stride(StrideB{}, {a.n, a.k, 1});
  s.stride_d[e] = cutlass::make_cute_packed_stride(StrideD{}, {m, a.n, 1});
  s.alpha[e] = a.a_scale[0] * a.b_scale[e];
  s.ptr_alpha[e] = s.alpha + e;
}

// The kernel of one configuration, its scratch layout and its launch.
template <class Cfg>
struct Kernel {
using TileShape = typename Cfg::TileShape;
using ClusterShape = typename Cfg::ClusterShape;
using KernelSchedule = typename Cfg::KernelSchedule;
using EpilogueSchedule = typename Cfg::EpilogueSchedule;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
    void, LayoutD*, kAlignD,  // no C operand: D = alpha * acc
    ElementD, LayoutD*, kAlignD, EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAccumulator>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA*, kAlignA, ElementB, LayoutB*, kAlignB,
    ElementAccumulator, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

using StrideA = typename GemmKernel::InternalStrideA;
using StrideB = typename GemmKernel::InternalStrideB;
using StrideD = typename GemmKernel::InternalStrideD;
using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;

// The per-expert arrays CUTLASS reads, carved from one scratch buffer.
struct Scratch {
  UnderlyingShape* problem_sizes;
  const ElementA** ptr_a;
  const ElementB** ptr_b;
  ElementD** ptr_d;
  StrideA* stride_a;
  StrideB* stride_b;
  StrideD* stride_d;
  float* alpha;
  const float** ptr_alpha;
};

static Scratch carve(void* base, int E) {
  auto* p = static_cast<char*>(base);
  Scratch s;
  auto take = [&](auto*& field, size_t elem) {
    field = reinterpret_cast<std::remove_reference_t<decltype(field)>>(p);
    p += align256(elem * E);
  };
  take(s.problem_sizes, sizeof(UnderlyingShape));
  take(s.ptr_a, sizeof(void*));
  take(s.ptr_b, sizeof(void*));
  take(s.ptr_d, sizeof(void*));
  take(s.stride_a, sizeof(StrideA));
  take(s.stride_b, sizeof(StrideB));
  take(s.stride_d, sizeof(StrideD));
  take(s.alpha, sizeof(float));
  take(s.ptr_alpha, sizeof(void*));
  return s;
}

static typename Gemm::Arguments make_arguments(const GroupedGemmFp8Args& a, const Scratch& s) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  hw.sm_count = a.sm_count;
  typename Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion;
  fusion.alpha = 0.f;
  fusion.beta = 0.f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = s.ptr_alpha;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {_0{}, _0{}, 1};  // one alpha per expert
  fusion.dBeta = {_0{}, _0{}, 0};
  args = typename Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {a.num_experts, s.problem_sizes, nullptr},  // sizes live on the device only
      {s.ptr_a, s.stride_a, s.ptr_b, s.stride_b},
      {fusion, nullptr, s.stride_d, s.ptr_d, s.stride_d},
      hw};
  return args;
}

static size_t scratch_bytes(int E) {
  return align256(sizeof(UnderlyingShape) * E) + 3 * align256(sizeof(void*) * E) + align256(sizeof(StrideA) * E) +
         align256(sizeof(StrideB) * E) + align256(sizeof(StrideD) * E) + align256(sizeof(float) * E) +
         align256(sizeof(void*) * E);
}

static size_t workspace_bytes(int sm_count) {
  GroupedGemmFp8Args a{};
  a.sm_count = sm_count;
  a.num_experts = 1;
  Scratch s{};
  return Gemm::get_workspace_size(make_arguments(a, s));
}

static const char* launch(const GroupedGemmFp8Args& a, cudaStream_t stream) {
  if (a.num_experts == 0) return "";
  const Scratch s = carve(a.scratch, a.num_experts);
  build_grouped_args_kernel<Kernel><<<(a.num_experts + 127) / 128, 128, 0, stream>>>(a, s);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  Gemm gemm;
  const auto args = make_arguments(a, s);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement these arguments";
  if (gemm.initialize(args, a.workspace, stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS run failed";
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  return "";
}
};  // struct Kernel

}  // namespace grouped_gemm_fp8
}  // namespace moe_kernels
