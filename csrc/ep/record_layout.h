// The byte layout of one expert-parallel dispatch record, shared by the pack and unpack kernels,
// their CPU references and the Python wrappers (moe_kernels.ops.ep.ep_record_bytes computes the
// same numbers). Plain C++: no torch, no CUDA.
//
//   [ row: H elements (H * element bytes) | pad to 16 | scales: G fp32 | weights: K fp32 | ids: K int32 | pad to 16 ]
//
// The row starts the record, so 16-byte vector accesses stay aligned whenever the row length
// allows; the metadata is one run of 4-byte words (G + 2K of them) that one thread per word moves.
// Records are 16-byte multiples, so every record of a buffer starts 16-byte aligned.
#pragma once

#include <cstdint>

namespace moe_kernels {

// Ranks of one dispatch: destinations of a token are a 64-bit mask.
constexpr int kMaxEpRanks = 64;

struct RecordLayout {
  int64_t row_bytes;     // H * element size
  int64_t meta_offset;   // first metadata word: round_up(row_bytes, 16)
  int num_scales;        // G: 0 (no scales), 1 (per token) or H / group size
  int topk;              // K
  int64_t record_bytes;  // round_up(meta_offset + 4 * (G + 2K), 16)

  int meta_words() const { return num_scales + 2 * topk; }
  int64_t scales_offset() const { return meta_offset; }
  int64_t weights_offset() const { return meta_offset + 4 * num_scales; }
  int64_t ids_offset() const { return meta_offset + 4 * (num_scales + topk); }
};

inline RecordLayout make_record_layout(int64_t hidden, int64_t element_bytes, int num_scales, int topk) {
  auto round16 = [](int64_t n) { return (n + 15) / 16 * 16; };
  RecordLayout l{};
  l.row_bytes = hidden * element_bytes;
  l.meta_offset = round16(l.row_bytes);
  l.num_scales = num_scales;
  l.topk = topk;
  l.record_bytes = round16(l.meta_offset + 4 * int64_t{num_scales + 2 * topk});
  return l;
}

}  // namespace moe_kernels
