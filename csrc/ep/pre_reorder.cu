// Launcher of ep_pre_reorder (see pre_reorder.cuh): the Mover (copy, or fp8 quantization with a
// per-tensor or per-token scale), the vector width and the id type are chosen here.
#include <algorithm>

#include "ep/launchers.h"
#include "ep/pre_reorder.cuh"

namespace moe_kernels {
namespace {

// Up to four waves of blocks at full occupancy (16 blocks of 128 threads per SM, 132 SMs); each
// loops over its share of tokens. More resident threads than moe_permute's row scatter: a rank
// stores about one row per row it loads (K/ranks local choices per token, vs K for moe_permute), so
// the kernel is bound by load latency and needs every load in flight that the SMs can hold.
constexpr int64_t kMaxPreReorderBlocks = 132 * 16 * 4;

template <typename Mover>
cudaError_t launch_mover(const PreReorderArgs& a, Mover mover, int64_t vecs_per_row, int64_t dst_row_bytes,
                         cudaStream_t stream) {
  const int64_t slices = ceil_div(vecs_per_row, kPreReorderThreads);
  const dim3 blocks(
      static_cast<unsigned>(std::min(a.num_tokens, std::max<int64_t>(1, kMaxPreReorderBlocks / slices))),
      static_cast<unsigned>(slices));
  auto params = [&](auto id_type) {
    using IdT = decltype(id_type);
    return PreReorderParams<IdT>{static_cast<uint8_t*>(a.out), dst_row_bytes, vecs_per_row, a.src2dst,
                                 static_cast<const IdT*>(a.topk_ids), a.start_expert, a.end_expert,
                                 a.num_tokens, a.topk, a.num_tokens * a.topk};
  };
  if (a.ids_int64) {
    pre_reorder_kernel<<<blocks, kPreReorderThreads, 0, stream>>>(params(int64_t{}), mover);
  } else {
    pre_reorder_kernel<<<blocks, kPreReorderThreads, 0, stream>>>(params(int32_t{}), mover);
  }
  return cudaGetLastError();
}

template <int kVecBytes>
cudaError_t launch_copy(const PreReorderArgs& a, int64_t row_bytes, cudaStream_t stream) {
  CopyMover<kVecBytes> mover{static_cast<const uint8_t*>(a.hidden_states), row_bytes};
  return launch_mover(a, mover, row_bytes / kVecBytes, row_bytes, stream);
}

template <typename T, int kVec>
cudaError_t launch_quantize(const PreReorderArgs& a, cudaStream_t stream) {
  const T* src = static_cast<const T*>(a.hidden_states);
  // Output rows are e4m3: one byte per element.
  if (a.scale_mode == PreReorderScale::kPerToken) {
    return launch_mover(a, QuantizeMover<T, kVec, true>{src, a.hidden, a.scale}, a.hidden / kVec, a.hidden, stream);
  }
  return launch_mover(a, QuantizeMover<T, kVec, false>{src, a.hidden, a.scale}, a.hidden / kVec, a.hidden, stream);
}

// 16-byte loads when the row length and the base addresses allow (the e4m3 stores are then
// 16 / sizeof(T) bytes wide), else the widest that fits; odd H takes the scalar path.
template <typename T>
cudaError_t launch_quantize_with_width(const PreReorderArgs& a, cudaStream_t stream) {
  const void* src[] = {a.hidden_states};
  const void* dst[] = {a.out};
  const int src_vec = pick_vec_bytes(a.hidden * static_cast<int64_t>(sizeof(T)), src, 1) / static_cast<int>(sizeof(T));
  const int dst_vec = pick_vec_bytes(a.hidden, dst, 1);
  const int vec = std::max(1, std::min(src_vec, dst_vec));
  constexpr int kMaxVec = 16 / sizeof(T);
  if (vec >= kMaxVec) return launch_quantize<T, kMaxVec>(a, stream);
  if constexpr (kMaxVec > 4) {
    if (vec >= 4) return launch_quantize<T, 4>(a, stream);
  }
  if (vec >= 2) return launch_quantize<T, 2>(a, stream);
  return launch_quantize<T, 1>(a, stream);
}

}  // namespace

cudaError_t launch_pre_reorder(const PreReorderArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.hidden == 0) return cudaSuccess;
  if (a.scale_mode == PreReorderScale::kNone) {
    const int64_t row_bytes = a.hidden * dtype_size(a.dtype);
    const void* ptrs[] = {a.hidden_states, a.out};
    switch (pick_vec_bytes(row_bytes, ptrs, 2)) {
      case 16: return launch_copy<16>(a, row_bytes, stream);
      case 8: return launch_copy<8>(a, row_bytes, stream);
      case 4: return launch_copy<4>(a, row_bytes, stream);
      case 2: return launch_copy<2>(a, row_bytes, stream);
      default: return launch_copy<1>(a, row_bytes, stream);
    }
  }
  switch (a.dtype) {
    case DType::kFloat32: return launch_quantize_with_width<float>(a, stream);
    case DType::kFloat16: return launch_quantize_with_width<__half>(a, stream);
    case DType::kBFloat16: return launch_quantize_with_width<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moe_kernels
