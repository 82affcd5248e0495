"""MoELayer: Router -> PrepareFinalize.prepare -> Experts -> PrepareFinalize.finalize, as a module."""

from typing import Callable, Optional

from torch import Tensor, nn


class MoELayer(nn.Module):
    """Composes the three parts; none knows about the others.

    Args:
        router: router logits -> (topk_weights, topk_ids): a Router module (FusedGateRouter, which
            may hold the gate weight), any callable, or None (call ``forward_routed`` then).
        prepare_finalize: SingleGpu, AllToAll, or any object with prepare/finalize.
        experts: an Experts module (TorchExperts, CutlassFp8Experts, CutlassMxfp4Experts,
            CutlassW4A8Experts) or a callable with their signature.
        shared_experts: optional callable (a module, e.g. the model's shared MLP) x -> [T,H], run
            beside the routed experts on every token and added to their output (the unfused form;
            moe_fused_gate's fused shared-expert slots are the other way to have them).

    Modules among them are submodules: the layer's state_dict holds ``router.*``, ``experts.*``
    (``experts.w13_weight``, ...) and ``shared_experts.*``; ``.to(device)`` moves them all.
    """

    def __init__(self, router, prepare_finalize, experts, shared_experts: Optional[Callable] = None):
        super().__init__()
        self.router = router
        self.prepare_finalize = prepare_finalize
        self.experts = experts
        self.shared_experts = shared_experts

    def forward(self, hidden_states: Tensor, router_logits: Optional[Tensor] = None) -> Tensor:
        """hidden_states [T, H] (or [..., H]: flattened and restored, as HF models call their MoE
        blocks); router_logits [T, E], or None when the router holds the gate weight (it then computes
        the logits from the hidden states). Returns hidden_states' shape."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if router_logits is None:
            gate = getattr(self.router, "gate_logits", None)
            if gate is None:
                raise ValueError("MoELayer: router_logits is required unless the router holds the gate weight "
                                 "(FusedGateRouter(weight=...) or FusedGateRouter.from_checkpoint)")
            router_logits = gate(x)
        else:
            router_logits = router_logits.reshape(-1, router_logits.shape[-1])
        topk_weights, topk_ids = self.router(router_logits)
        return self.forward_routed(x, topk_weights, topk_ids).reshape(shape)

    def forward_routed(self, hidden_states: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        """The layer after the router: hidden_states [T, H] with their top-k weights and ids."""
        pipelined = getattr(self.prepare_finalize, "forward_pipelined", None)
        if pipelined is not None:  # ChunkedAllToAll: the exchange overlapped with the experts (chunked.py)
            return pipelined(self.experts, hidden_states, topk_weights, topk_ids, shared_experts=self.shared_experts)
        d = self.prepare_finalize.prepare(hidden_states, topk_weights, topk_ids)
        # x_scale only when the rows arrive quantized: Experts written before it existed keep working.
        extra = {} if d.x_scale is None else {"x_scale": d.x_scale}
        y = self.experts(d.x, d.topk_weights, d.topk_ids, d.expert_map, d.num_local_experts, **extra)
        out = self.prepare_finalize.finalize(y, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out

    def extra_repr(self) -> str:
        parts = []
        E = getattr(self.prepare_finalize, "num_experts", None)
        if E is not None:
            parts.append(f"E={E}")
        K = getattr(self.router, "topk", None)
        if K is not None:
            parts.append(f"K={K}")
        for key, attr in (("H", "hidden_size"), ("I", "intermediate_size"), ("format", "weight_format"),
                          ("activation", "activation")):
            v = getattr(self.experts, attr, None)
            if v is not None:
                parts.append(f"{key}={v}")
        return ", ".join(parts)
