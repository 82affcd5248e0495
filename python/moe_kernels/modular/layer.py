"""MoELayer: Router -> PrepareFinalize.prepare -> Experts -> PrepareFinalize.finalize."""

from typing import Optional

from torch import Tensor

from .experts import Experts
from .prepare_finalize import PrepareFinalize
from .router import Router


class MoELayer:
    """Composes the three parts; none knows about the others.

    shared_experts (optional callable x -> [T,H]) runs beside the routed experts on every token and
    is added to their output (the unfused form; moe_fused_gate's fused shared-expert slots are the
    other way to have them).
    """

    def __init__(self, router: Router, prepare_finalize: PrepareFinalize, experts: Experts,
                 shared_experts: Optional[callable] = None):
        self.router = router
        self.prepare_finalize = prepare_finalize
        self.experts = experts
        self.shared_experts = shared_experts

    def __call__(self, hidden_states: Tensor, router_logits: Tensor) -> Tensor:
        topk_weights, topk_ids = self.router(router_logits)
        return self.forward_routed(hidden_states, topk_weights, topk_ids)

    def forward_routed(self, hidden_states: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        d = self.prepare_finalize.prepare(hidden_states, topk_weights, topk_ids)
        # x_scale only when the rows arrive quantized: Experts written before it existed keep working.
        extra = {} if d.x_scale is None else {"x_scale": d.x_scale}
        y = self.experts(d.x, d.topk_weights, d.topk_ids, d.expert_map, d.num_local_experts, **extra)
        out = self.prepare_finalize.finalize(y, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out
