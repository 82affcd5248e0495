"""Routers: router logits [T, E] -> (topk_weights [T, K] f32, topk_ids [T, K] int32), as modules that
may also hold the gate (the linear layer hidden states -> logits)."""

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as _ckpt

_DEPRECATED = object()


class Router(nn.Module):
    """Base of the router modules. forward(router_logits) -> (topk_weights, topk_ids); a router
    holding a gate weight also computes the logits (``gate_logits``), so that the layer can be called
    with the hidden states alone. Any callable logits -> (weights, ids) works as a router too."""

    def gate_logits(self, hidden_states: Tensor) -> Tensor:
        raise ValueError(f"{type(self).__name__} holds no gate weight: pass router_logits to the layer")


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class FusedGateRouter(Router):
    """DeepSeek-style grouped top-k (and plain top-k with one group) through moe_fused_gate.

    Args mirror the op's (see moe_kernels.moe_fused_gate): topk, num_expert_group, topk_group,
    scoring_func ("softmax" or "sigmoid"), renormalize, routed_scaling_factor,
    apply_routed_scaling_factor_on_output; and

        e_score_correction_bias: optional [E] fp32, DeepSeek-V3's selection bias (the op's ``bias``).
        weight: optional gate [E, H]; linear_bias: optional [E] (gpt-oss's router has one). With a
            weight, the layer can be called with the hidden states only: logits = x @ weight.T +
            linear_bias, computed in fp32.

    Registered under the checkpoints' names (``mlp.gate.*`` of DeepSeek/Qwen, ``mlp.router.*`` of
    gpt-oss, vLLM's too): ``weight``, ``bias`` (the linear's), ``e_score_correction_bias``.

    gpt-oss (top-4, softmax over the four chosen logits) is ``topk=4, scoring_func="softmax",
    renormalize=True``: the softmax renormalized over the chosen experts equals the softmax of their logits.

    Deprecated: ``bias=`` (the keyword, or the 6th positional argument, of the dataclass this class
    was until this release) still sets e_score_correction_bias, with a DeprecationWarning; ``bias``
    now names the gate's linear bias, as in the checkpoints.
    """

    def __init__(self, topk: int, num_expert_group: int = 1, topk_group: int = 1, scoring_func: str = "softmax",
                 renormalize: bool = True, bias=_DEPRECATED, routed_scaling_factor: float = 1.0,
                 apply_routed_scaling_factor_on_output: bool = False, *,
                 e_score_correction_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                 linear_bias: Optional[Tensor] = None):
        super().__init__()
        if bias is not _DEPRECATED:
            warnings.warn("FusedGateRouter(bias=...) is deprecated (removed in the next release): pass "
                          "e_score_correction_bias=... (the name DeepSeek-V3 checkpoints and vLLM use); `bias` "
                          "now names the gate's linear bias", DeprecationWarning, stacklevel=2)
            if e_score_correction_bias is not None and bias is not None:
                raise ValueError("FusedGateRouter: pass e_score_correction_bias or the deprecated bias, not both")
            if bias is not None:
                e_score_correction_bias = bias
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"FusedGateRouter: scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
        if linear_bias is not None and weight is None:
            raise ValueError("FusedGateRouter: linear_bias needs the gate weight")
        if weight is not None and weight.dim() != 2:
            raise ValueError(f"FusedGateRouter: weight must be [E, H], got {tuple(weight.shape)}")
        E = None if weight is None else weight.shape[0]
        for name, t in (("linear_bias", linear_bias), ("e_score_correction_bias", e_score_correction_bias)):
            if t is not None and (t.dim() != 1 or (E is not None and t.shape[0] != E)):
                raise ValueError(f"FusedGateRouter: {name} must be [E]{'' if E is None else f' = [{E}]'}, "
                                 f"got {tuple(t.shape)}")
        self.topk, self.num_expert_group, self.topk_group = topk, num_expert_group, topk_group
        self.scoring_func, self.renormalize = scoring_func, renormalize
        self.routed_scaling_factor = routed_scaling_factor
        self.apply_routed_scaling_factor_on_output = apply_routed_scaling_factor_on_output
        self.weight = None if weight is None else _frozen(weight)
        self.bias = None if linear_bias is None else _frozen(linear_bias)
        self.e_score_correction_bias = None if e_score_correction_bias is None else _frozen(e_score_correction_bias)

    @classmethod
    def from_checkpoint(cls, tensors, prefix: str, *, topk: int, **kwargs) -> "FusedGateRouter":
        """The router of ``{prefix}weight`` [E, H] with the optional ``{prefix}bias`` [E] (gpt-oss's
        ``mlp.router.``) and ``{prefix}e_score_correction_bias`` [E] (DeepSeek-V3's ``mlp.gate.``);
        the routing settings (topk, groups, scoring...) come from the model's config, as kwargs."""
        src, prefix = _ckpt._Source(tensors), _ckpt._norm_prefix(prefix)
        who = "FusedGateRouter.from_checkpoint"
        opt = (lambda n: src.get(prefix + n, who) if src.has(prefix + n) else None)
        return cls(topk, weight=src.get(prefix + "weight", who), linear_bias=opt("bias"),
                   e_score_correction_bias=opt("e_score_correction_bias"), **kwargs)

    @property
    def num_experts(self) -> Optional[int]:
        for t in (self.weight, self.e_score_correction_bias):
            if t is not None:
                return t.shape[0]
        return None

    def gate_logits(self, hidden_states: Tensor) -> Tensor:
        if self.weight is None:
            return super().gate_logits(hidden_states)
        b = None if self.bias is None else self.bias.float()
        return F.linear(hidden_states.float(), self.weight.float(), b)

    def forward(self, router_logits: Tensor) -> Tuple[Tensor, Tensor]:
        bias = self.e_score_correction_bias
        return torch.ops.moe_kernels.moe_fused_gate(
            router_logits, None if bias is None else bias.float(), self.num_expert_group, self.topk_group, self.topk,
            self.scoring_func, self.renormalize, 0, self.routed_scaling_factor,
            self.apply_routed_scaling_factor_on_output)

    def extra_repr(self) -> str:
        s = f"topk={self.topk}, scoring_func={self.scoring_func}"
        if self.num_expert_group > 1:
            s += f", num_expert_group={self.num_expert_group}, topk_group={self.topk_group}"
        if not self.renormalize:
            s += ", renormalize=False"
        if self.routed_scaling_factor != 1.0:
            s += f", routed_scaling_factor={self.routed_scaling_factor:g}"
            if self.apply_routed_scaling_factor_on_output:
                s += " (on output)"
        if self.weight is not None:
            s += f", gate=[{self.weight.shape[0]}, {self.weight.shape[1]}]{' +bias' if self.bias is not None else ''}"
        if self.e_score_correction_bias is not None:
            s += ", e_score_correction_bias"
        return s
