// GEMM1's epilogue with the gated activation and the fp8 quantization of its output fused in: the
// [M, 2I] bf16 intermediate of the unfused layer is never written. A CUTLASS 3.x collective
// epilogue for the ptr-array (grouped) sm90 kernels without shared memory (the shape of CUTLASS's
// DefaultEpilogueArray, used through Sm90TmaWarpSpecializedAdapter): each consumer thread writes
// straight from its accumulator registers.
//
// Why it needs interleaved gate/up weight rows: in the wgmma accumulator layout a thread holds the
// values of columns (n, n + 1), n even, of a row in consecutive registers. With gate at even and
// up at odd rows of w1 (gpt-oss's gate_up_proj, or any w13 interleaved once at load time), those
// are the gate and up values of output column n / 2, so the activation needs no data exchange.
//
// Per value, the operations of the unfused path in its order, so that the bytes are the same:
//   h = bf16(a_scale * (b_scale * acc))           (the GEMM's scale epilogue, rounded to bf16)
//   g, u = h[n] (+ bias[n]), h[n+1] (+ bias[n+1])  (fp32 additions)
//   y = act(g, u)                                  (quant/gated_act.h, the same functors)
//   q = e4m3(y * (1 / out_scale))                  (static per-tensor scale, saturating)
// Only a static output scale: a per-token or per-group scale would need the row's or the group's
// maximum over columns that other threads and other tiles hold.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/numeric_conversion.h>

#include "quant/fp8_math.h"
#include "quant/gated_act.h"

namespace moe_kernels {
namespace grouped_gemm_fp8 {

// What the epilogue reads per expert (pointer arrays indexed by the group, written on the device
// by the argument kernel) and per launch.
struct GatedQuantEpilogueArguments {
  uint8_t** ptr_out = nullptr;           // [E] -> first row of expert e in out [M, N/2] e4m3
  const float** ptr_a_scale = nullptr;   // [E] -> a_scale of e's first row, or the one value
  const float** ptr_b_scale = nullptr;   // [E] -> e's [N] channel scales, or its one value
  const float** ptr_bias = nullptr;      // [E] -> e's [N] fp32 bias; nullptr: no bias
  const float* out_scale = nullptr;      // [1] static output scale
  bool a_per_token = false;
  bool b_per_channel = false;
  GatedActivation activation = GatedActivation::kSilu;
  float swiglu_alpha = 1.702f;
  float swiglu_limit = 7.0f;
};

class GatedQuantEpilogueArray {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  // No C operand; D is the e4m3 output, written by this class (the strides are the kernel's
  // required types, unused: the output's row stride is N / 2).
  using ElementC = void;
  using ElementD = cutlass::float_e4m3_t;
  using InternalStrideC = cute::Stride<int64_t, cute::_1, cute::_0>;
  using InternalStrideD = InternalStrideC;
  using StrideC = InternalStrideC*;
  using StrideD = InternalStrideD*;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  using ThreadEpilogueOp = void;  // a name the device adapter requires; the operations are below
  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;
  using Arguments = GatedQuantEpilogueArguments;
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_out != nullptr && args.out_scale != nullptr;
  }

  CUTLASS_HOST_DEVICE explicit GatedQuantEpilogueArray(Params const& params) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    const int e = static_cast<int>(l_coord);
    // The (row, column) of each accumulator of this thread, as DefaultEpilogueArray finds them.
    Tensor coords = make_identity_tensor(make_shape(M, N));
    Tensor tile_coords = local_tile(coords, take<0, 2>(blk_shape_mnk), make_coord(m_coord, n_coord));
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(tile_coords);
    static_assert(size(FrgLayout{}) % 2 == 0, "accumulators come in (gate, up) column pairs");

    const float* __restrict__ a_scale = params_.ptr_a_scale[e];
    const float* __restrict__ b_scale = params_.ptr_b_scale[e];
    const float* __restrict__ bias = params_.ptr_bias != nullptr ? params_.ptr_bias[e] : nullptr;
    uint8_t* __restrict__ out = params_.ptr_out[e];
    const int64_t out_cols = N / 2;
    const float inv_scale = fp8::inverse_scale(__ldg(params_.out_scale));
    const cutlass::NumericConverter<cutlass::bfloat16_t, float, cutlass::FloatRoundStyle::round_to_nearest> to_bf16;
    // The unfused path's value: bf16(a_scale * (b_scale * acc)), then the bias in fp32. Read-only
    // loads (__ldg) of a few distinct addresses per thread, all L1 hits after the first tile.
    auto value = [&](float acc, int m, int n) {
      const float b = __ldg(b_scale + (params_.b_per_channel ? n : 0));
      const float a = __ldg(a_scale + (params_.a_per_token ? m : 0));
      float h = static_cast<float>(to_bf16(a * (b * acc)));
      if (bias != nullptr) h = fp8::add_rn(h, __ldg(bias + n));
      return h;
    };
    constexpr int kPairs = decltype(size(accumulators))::value / 2;
    // All bytes first, then all stores: a byte store may alias any load (char aliasing), so
    // interleaving them would serialize every load behind the previous store.
    auto store = [&](auto act) {
      // The e4m3 bytes packed four to a register (a byte array would live in local memory).
      uint32_t packed[(kPairs + 3) / 4] = {};
      CUTLASS_PRAGMA_UNROLL
      for (int p = 0; p < kPairs; ++p) {
        const int m = get<0>(tCcD(2 * p));
        const int n = get<1>(tCcD(2 * p));  // even: the gate column; n + 1 is its up column
        // Clamped into the problem so that every load is valid and none waits on a branch; values
        // outside are computed and not stored.
        const int mc = m < M ? m : M - 1;
        const int nc = n < N ? n : N - 2;
        const float y = act(value(accumulators(2 * p), mc, nc), value(accumulators(2 * p + 1), mc, nc + 1));
        const uint32_t byte = __nv_cvt_float_to_fp8(fp8::mul_rn(y, inv_scale), __NV_SATFINITE, __NV_E4M3);
        packed[p / 4] |= byte << (8 * (p % 4));
      }
      CUTLASS_PRAGMA_UNROLL
      for (int p = 0; p < kPairs; ++p) {
        const int m = get<0>(tCcD(2 * p));
        const int n = get<1>(tCcD(2 * p));
        if (m < M && n < N) out[m * out_cols + n / 2] = static_cast<uint8_t>(packed[p / 4] >> (8 * (p % 4)));
      }
    };
    switch (params_.activation) {  // uniform across the launch: no divergence
      case GatedActivation::kGelu: store(act::GeluMul{}); break;
      case GatedActivation::kSwigluOai: store(act::SwigluOai{params_.swiglu_alpha, params_.swiglu_limit}); break;
      default: store(act::SiluMul{}); break;
    }
  }

 private:
  Params params_;
};

}  // namespace grouped_gemm_fp8
}  // namespace moe_kernels
