"""Routers: router logits [T, E] -> (topk_weights [T, K] f32, topk_ids [T, K] int32)."""

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import torch
from torch import Tensor


class Router(Protocol):
    def __call__(self, router_logits: Tensor) -> Tuple[Tensor, Tensor]: ...


@dataclass
class FusedGateRouter:
    """DeepSeek-style grouped top-k (and plain top-k with one group) through moe_fused_gate.

    Fields mirror the op's arguments; see moe_kernels.moe_fused_gate for their meaning.
    """

    topk: int
    num_expert_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"
    renormalize: bool = True
    bias: Optional[Tensor] = None
    routed_scaling_factor: float = 1.0
    apply_routed_scaling_factor_on_output: bool = False

    def __call__(self, router_logits: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.ops.moe_kernels.moe_fused_gate(
            router_logits, self.bias, self.num_expert_group, self.topk_group, self.topk, self.scoring_func,
            self.renormalize, 0, self.routed_scaling_factor, self.apply_routed_scaling_factor_on_output)
