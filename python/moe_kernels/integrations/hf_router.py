"""Opt-in: HF routers of DeepSeek-V3, Qwen3-MoE and Mixtral computed by moe_fused_gate.

Each replacement returns what the HF router returns, (router_logits, top_k_weights, top_k_index),
with the same dtypes (ids int64, as HF's experts' one_hot needs; weights in the dtype HF gives),
the same ids and the same weights up to fp32 rounding. Only the selection differs in order for
DeepSeek-V3, whose HF router takes an unsorted top-k (the experts' sum does not depend on it).
"""

from types import MethodType
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.routing import moe_fused_gate


def _qwen3_forward(self, hidden_states: Tensor):
    # Qwen3MoeTopKRouter: softmax over all experts in fp32, top-k, optional renormalization, the
    # weights cast back to the logits' dtype.
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = moe_fused_gate(router_logits, None, 1, 1, self.top_k, scoring_func="softmax",
                                  renormalize=bool(self.norm_topk_prob))
    return router_logits, weights.to(router_logits.dtype), ids.long()


def _mixtral_forward(self, hidden_states: Tensor):
    # MixtralTopKRouter: softmax in fp32, top-k, always renormalized, weights kept in fp32.
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = moe_fused_gate(router_logits, None, 1, 1, self.top_k, scoring_func="softmax", renormalize=True)
    return router_logits, weights, ids.long()


def _deepseek_v3_forward(self, hidden_states: Tensor):
    # DeepseekV3TopkRouter: fp32 logits, sigmoid, e_score_correction_bias for the choice only,
    # groups scored by their top-2 sum, top-k inside the kept groups, optional renormalization,
    # then always times routed_scaling_factor.
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = moe_fused_gate(router_logits, self.e_score_correction_bias.float(), self.num_group,
                                  self.topk_group, self.top_k, scoring_func="sigmoid",
                                  renormalize=bool(self.norm_topk_prob),
                                  routed_scaling_factor=float(self.routed_scaling_factor),
                                  apply_routed_scaling_factor_on_output=True)
    return router_logits, weights, ids.long()


#: HF router class name -> the forward that replaces it.
FUSED_ROUTERS: Dict[str, Callable] = {
    "Qwen3MoeTopKRouter": _qwen3_forward,
    "MixtralTopKRouter": _mixtral_forward,
    "DeepseekV3TopkRouter": _deepseek_v3_forward,
}


def use_fused_router(model: torch.nn.Module) -> List[str]:
    """Replaces the forward of every router of a supported class (see ``FUSED_ROUTERS``) in model
    by moe_fused_gate; idempotent. Returns the names of the routers replaced; raises ValueError if
    the model has none (so that a typo or an unsupported model does not pass silently)."""
    replaced = []
    for name, module in model.named_modules():
        forward = FUSED_ROUTERS.get(type(module).__name__)
        if forward is not None:
            # An instance attribute: nn.Module.__call__ looks up self.forward, so it takes
            # precedence over the class's forward; `del module.forward` restores HF's.
            module.forward = MethodType(forward, module)
            replaced.append(name)
    if not replaced:
        raise ValueError(f"use_fused_router: {type(model).__name__} has no router of a supported class "
                         f"({', '.join(FUSED_ROUTERS)})")
    return replaced


def restore_router(model: torch.nn.Module) -> None:
    """Undoes use_fused_router: HF's own router forwards again."""
    for module in model.modules():
        if type(module).__name__ in FUSED_ROUTERS and "forward" in module.__dict__:
            del module.forward
