"""The roofline of a GEMM or layer row: the least time the work can take on this device.

roof_us = max(bytes read / read ceiling + bytes written / copy ceiling, FLOPs / compute peak)

- Bytes read: the weights (and their scales and biases) of the experts the row's routing touches
  (distinct experts, counted from the routing used), plus the activations in (and, for a layer,
  the routing: topk weights and ids). An expert that receives no row is never read by a grouped
  GEMM, so counting all E would overstate the floor at decode sizes.
- Bytes written: the activations out.
- FLOPs: 2*M*N*K per GEMM (M = T*K routed rows), against the peak of the MMA the kernel issues
  (FP8 for e4m3 activations, bf16 for bf16 activations).

Each byte is counted against the ceiling of its kind: weights are only read, and a read stream runs
faster than a copy (which the copy ceiling measures as read + write): counting reads at the copy
ceiling put decode rows above 1.0 of the roofline. The ceilings are measured in the same run
(harness.CEILINGS); the functions here only count, so that the counting is testable without a GPU.
Intermediates (GEMM1's output, the permuted rows) are not counted: the roofline is the floor of an
ideal fused layer, which is what issue 22 holds the layer to.
"""

from dataclasses import dataclass
from typing import Optional

import torch

BLOCK = 128  # block-scaled FP8: 128x128 weight blocks, 1x128 activation groups
MX_GROUP = 32  # MXFP4: one E8M0 scale per 32 weights along K
W4A8_GROUP = 128  # INT4 x FP8: one fp32 scale per 128 weights along K


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per weight element and per-expert scale bytes of a [N, K] weight."""

    name: str
    elem_bytes: float  # 1 (e4m3), 0.5 (4-bit), 2 (bf16)
    scale: str  # "expert" (one fp32), "channel" (fp32 per row), "block" (fp32 per 128x128),
    #             "mx" (uint8 per 1x32), "group128" (fp32 per 1x128), "none"

    def scale_bytes(self, N: int, K: int) -> float:
        if self.scale == "expert":
            return 4
        if self.scale == "channel":
            return 4 * N
        if self.scale == "block":
            return 4 * _ceil_div(N, BLOCK) * _ceil_div(K, BLOCK)
        if self.scale == "mx":
            return N * _ceil_div(K, MX_GROUP)
        if self.scale == "group128":
            return 4 * N * _ceil_div(K, W4A8_GROUP)
        return 0

    def bytes(self, N: int, K: int) -> float:
        """One expert's [N, K] weight with its scales."""
        return N * K * self.elem_bytes + self.scale_bytes(N, K)


FP8_TENSOR = WeightFormat("fp8", 1, "expert")
FP8_CHANNEL = WeightFormat("fp8_channel", 1, "channel")
FP8_BLOCK = WeightFormat("fp8_block", 1, "block")
MXFP4 = WeightFormat("mxfp4", 0.5, "mx")
W4A8 = WeightFormat("int4", 0.5, "group128")
BF16 = WeightFormat("bf16", 2, "none")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def touched_experts(topk_ids: torch.Tensor, num_experts: int, expert_map: Optional[torch.Tensor] = None) -> int:
    """Distinct experts the routing sends at least one token to (ids outside [0, E) and, with
    expert_map, experts mapped to -1 are not computed here, so not counted). Syncs the host: call it
    while setting a row up, never inside a timed call."""
    ids = topk_ids.reshape(-1).long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    if expert_map is not None:
        ids = ids[expert_map.to(ids.device)[ids] >= 0]
    return int(torch.unique(ids).numel())


def experts_with_rows(expert_offsets: torch.Tensor) -> int:
    """Experts that own at least one row of a grouped GEMM (expert_offsets [E + 1])."""
    return int((expert_offsets[1:] > expert_offsets[:-1]).sum())


@dataclass(frozen=True)
class Traffic:
    """What a call must move and compute at least."""

    read: float  # bytes
    written: float  # bytes
    flops: float

    def roof_s(self, read_Bps: float, copy_Bps: float, flops_per_s: float) -> float:
        """The roofline time: the byte time (reads at the read ceiling, writes at the copy ceiling)
        or the FLOP time, whichever is larger."""
        return max(self.read / read_Bps + self.written / copy_Bps, self.flops / flops_per_s)


def grouped_gemm(M: int, N: int, K: int, touched: int, weight: WeightFormat, a_bytes: float = 1,
                 a_scale_bytes: float = 0, out_bytes: float = 2) -> Traffic:
    """A grouped GEMM out[M, N] = a[M, K] @ b[e, N, K]^T over `touched` experts: reads a (a_bytes
    per element plus a_scale_bytes in all) and the touched experts' weights with their scales;
    writes out (bf16 by default)."""
    read = M * K * a_bytes + a_scale_bytes + touched * weight.bytes(N, K)
    return Traffic(read=read, written=M * N * out_bytes, flops=2 * M * N * K)


def moe_layer(T: int, K: int, H: int, I: int, touched: int, weight: WeightFormat, x_bytes: float = 2,
              out_bytes: float = 2, biases: bool = False) -> Traffic:
    """A whole expert layer of T tokens, top-K: reads x [T, H], the routing (fp32 weights and int32
    ids [T, K]) and the touched experts' w1 [2I, H] and w2 [H, I] with their scales (and fp32
    biases [2I] and [H] with `biases`); writes out [T, H]. FLOPs of GEMM1 and GEMM2 on M = T*K rows:
    2*M*2I*H + 2*M*H*I = 6*M*H*I."""
    per_expert = weight.bytes(2 * I, H) + weight.bytes(H, I) + (4 * (2 * I + H) if biases else 0)
    read = T * H * x_bytes + T * K * (4 + 4) + touched * per_expert
    return Traffic(read=read, written=T * H * out_bytes, flops=6 * T * K * H * I)
