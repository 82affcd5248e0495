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
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    // The (row, column) of each accumulator of this thread, as DefaultEpilogueArray finds them.
    Tensor coords = make_identity_tensor(make_shape(get<0>(problem_shape_mnkl), get<1>(problem_shape_mnkl)));
    Tensor tile_coords = local_tile(coords, take<0, 2>(blk_shape_mnk), make_coord(m_coord, n_coord));
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(tile_coords);
    const TileArgs tile{get<0>(problem_shape_mnkl), get<1>(problem_shape_mnkl), static_cast<int>(l_coord)};
    switch (params_.activation) {  // uniform across the launch: no divergence
      case GatedActivation::kGelu: write_tile(act::GeluMul{}, accumulators, tCcD, tile); break;
      case GatedActivation::kSwigluOai:
        write_tile(act::SwigluOai{params_.swiglu_alpha, params_.swiglu_limit}, accumulators, tCcD, tile);
        break;
      default: write_tile(act::SiluMul{}, accumulators, tCcD, tile); break;
    }
  }

 private:
  struct TileArgs {
    int M;  // rows of this expert
    int N;  // interleaved gate/up columns (the output has N / 2)
    int e;  // the expert
  };

  // The accumulator fragment of sm90 wgmma: ((2, 2, J), MMA_M, MMA_N) values per thread, J blocks
  // of 8 columns. Value (c, h, j) of an atom is row r + 8h, column 8j + 2q + c, where q = lane % 4
  // and r is the same for the quad's four lanes: the quad holds 8 whole columns of its two rows.
  template <class FrgLayout>
  static constexpr int kBlocks = cute::size<0, 2>(FrgLayout{});

  // Why the bytes go through the quad before the stores: a thread's output bytes of a row are the
  // columns 4j + q (j = 0..J-1), one byte every 4; stored as they are, each warp store writes 8
  // rows x 4 bytes, and on an H100 the fused GEMM1 wrote 76% more L2 sectors than it needed. Four
  // words per thread (16 columns each: bytes j = 4g..4g+3) are transposed across the quad by two
  // butterfly shuffles, then the bytes inside each word: lane q then holds 16 consecutive columns
  // 16 (4G + q) .. +15, one 16-byte store, and the quad writes 64 consecutive bytes of the row.
  CUTLASS_DEVICE static void quad_transpose(uint32_t (&x)[4], int q) {
    CUTLASS_PRAGMA_UNROLL
    for (int s = 1; s <= 2; s <<= 1) {  // swap bit s of the lane with bit s of the word index
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < 4; ++k) {
        if (k & s) continue;
        const bool high = (q & s) != 0;
        const uint32_t sent = high ? x[k] : x[k | s];
        const uint32_t got = __shfl_xor_sync(0xffffffffu, sent, s);
        if (high) x[k] = got; else x[k | s] = got;
      }
    }
    // Now x[k] holds lane k's bytes j = 4g..4g+3 (columns 16g + 4i + k, i = 0..3) of this lane's
    // group g: byte i of each word makes output word i (columns 16g + 4i .. 16g + 4i + 3).
    const uint32_t lo0 = __byte_perm(x[0], x[1], 0x0040), hi0 = __byte_perm(x[2], x[3], 0x0040);
    const uint32_t lo1 = __byte_perm(x[0], x[1], 0x0051), hi1 = __byte_perm(x[2], x[3], 0x0051);
    const uint32_t lo2 = __byte_perm(x[0], x[1], 0x0062), hi2 = __byte_perm(x[2], x[3], 0x0062);
    const uint32_t lo3 = __byte_perm(x[0], x[1], 0x0073), hi3 = __byte_perm(x[2], x[3], 0x0073);
    x[0] = __byte_perm(lo0, hi0, 0x5410);
    x[1] = __byte_perm(lo1, hi1, 0x5410);
    x[2] = __byte_perm(lo2, hi2, 0x5410);
    x[3] = __byte_perm(lo3, hi3, 0x5410);
  }

  // Global stores without a "memory" clobber: nothing in this kernel reads the output, so the
  // scale loads of the next rows may move above them.
  CUTLASS_DEVICE static void store_16(uint8_t* p, const uint32_t (&x)[4]) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(x[0]), "r"(x[1]), "r"(x[2]), "r"(x[3]));
  }
  CUTLASS_DEVICE static void store_1(uint8_t* p, uint32_t byte) {
    asm volatile("st.global.b8 [%0], %1;" ::"l"(p), "r"(byte));
  }

  template <class Act, class Accumulators, class Coords>
  CUTLASS_DEVICE void write_tile(Act act, Accumulators const& acc, Coords const& tCcD, TileArgs const& t) const {
    using namespace cute;
    using Layout = typename Accumulators::layout_type;
    constexpr int J = kBlocks<Layout>;
    constexpr int kM = size<1>(Layout{});
    constexpr int kN = size<2>(Layout{});
    static_assert(size<0, 0>(Layout{}) == 2 && size<0, 1>(Layout{}) == 2, "the wgmma accumulator layout");
    static_assert(J % 16 == 0, "the quad transpose stores 4 groups of 4 blocks at a time");
    const int q = threadIdx.x % 4;  // the lane within its quad (the accumulator rows' four lanes)
    const float* __restrict__ a_scale = params_.ptr_a_scale[t.e];
    const float* __restrict__ b_scale = params_.ptr_b_scale[t.e];
    const float* __restrict__ bias = params_.ptr_bias != nullptr ? params_.ptr_bias[t.e] : nullptr;
    uint8_t* __restrict__ out = params_.ptr_out[t.e];
    const int64_t out_cols = t.N / 2;
    // Every 16-byte chunk lies inside the row or past its end, and row starts are 16-byte aligned
    // (the output is allocated by the op, its expert blocks N / 2 bytes per row apart).
    const bool whole_chunks = t.N % 32 == 0;
    const float inv_scale = fp8::inverse_scale(__ldg(params_.out_scale));
    const float a_one = __ldg(a_scale);
    const float b_one = __ldg(b_scale);
    const cutlass::NumericConverter<cutlass::bfloat16_t, float, cutlass::FloatRoundStyle::round_to_nearest> to_bf16;
    // Rows and columns outside the problem are clamped into it, so that every load is valid and
    // none waits on a branch; their values are computed and not stored.
    auto clamp_row = [&](int m) { return m < t.M ? m : t.M - 1; };
    auto clamp_col = [&](int n) { return n < t.N ? n : t.N - 2; };
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int nn = 0; nn < kN; ++nn) {
        int rows[2];
        float a[2];
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          rows[h] = get<0>(tCcD(make_coord(make_coord(0, h, 0), mm, nn)));
          a[h] = params_.a_per_token ? __ldg(a_scale + clamp_row(rows[h])) : a_one;
        }
        // Each row's bytes, four blocks to a word: word g of row h holds blocks 4g..4g+3.
        uint32_t words[2][J / 4] = {};
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < J; ++j) {
          const int n = clamp_col(get<1>(tCcD(make_coord(make_coord(0, 0, j), mm, nn))));  // gate column
          const float b_gate = params_.b_per_channel ? __ldg(b_scale + n) : b_one;
          const float b_up = params_.b_per_channel ? __ldg(b_scale + n + 1) : b_one;
          const float bias_gate = bias != nullptr ? __ldg(bias + n) : 0.0f;
          const float bias_up = bias != nullptr ? __ldg(bias + n + 1) : 0.0f;
          CUTLASS_PRAGMA_UNROLL
          for (int h = 0; h < 2; ++h) {
            // The unfused path's value: bf16(a_scale * (b_scale * acc)), then the bias in fp32.
            float gate = static_cast<float>(to_bf16(a[h] * (b_gate * acc(make_coord(make_coord(0, h, j), mm, nn)))));
            float up = static_cast<float>(to_bf16(a[h] * (b_up * acc(make_coord(make_coord(1, h, j), mm, nn)))));
            if (bias != nullptr) {
              gate = fp8::add_rn(gate, bias_gate);
              up = fp8::add_rn(up, bias_up);
            }
            const uint32_t byte =
                __nv_cvt_float_to_fp8(fp8::mul_rn(act(gate, up), inv_scale), __NV_SATFINITE, __NV_E4M3);
            words[h][j / 4] |= byte << (8 * (j % 4));
          }
        }
        // The tile's first output column: its first gate column, less this lane's offset, halved.
        const int col0 = (get<1>(tCcD(make_coord(make_coord(0, 0, 0), mm, nn))) - 2 * q) / 2;
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          uint8_t* row = out + static_cast<int64_t>(rows[h]) * out_cols;
          const bool row_in = rows[h] < t.M;
          if (whole_chunks) {
            CUTLASS_PRAGMA_UNROLL
            for (int G = 0; G < J / 16; ++G) {
              uint32_t x[4] = {words[h][4 * G], words[h][4 * G + 1], words[h][4 * G + 2], words[h][4 * G + 3]};
              quad_transpose(x, q);  // every lane, in or out of the problem: the shuffles need all
              const int col = col0 + 16 * (4 * G + q);
              if (row_in && col < out_cols) store_16(row + col, x);
            }
          } else {
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < J; ++j) {
              const int col = col0 + 4 * j + q;
              if (row_in && col < out_cols) store_1(row + col, (words[h][j / 4] >> (8 * (j % 4))) & 0xffu);
            }
          }
        }
      }
    }
  }

  Params params_;
};

}  // namespace grouped_gemm_fp8
}  // namespace moe_kernels
