"""The MoE router: DeepSeek-style grouped top-k with fused shared experts (and, with one group and
no bias, the plain top-k of Mixtral and Qwen3)."""

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.moe_kernels


def moe_fused_gate(
    scores: Tensor,
    bias: Optional[Tensor],
    num_expert_group: int,
    topk_group: int,
    topk: int,
    scoring_func: str = "sigmoid",
    renormalize: bool = True,
    num_fused_shared_experts: int = 0,
    routed_scaling_factor: float = 1.0,
    apply_routed_scaling_factor_on_output: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Router logits -> top-k expert weights and ids, in one kernel.

    s = sigmoid(scores) or softmax(scores) (fp32 math); choice = s + bias (or s without a bias).
    The E experts form num_expert_group groups of E/G; a group scores the sum of its two best choices
    with a bias (DeepSeek-V3) or its best choice without (DeepSeek-V2). The topk_group best groups are
    kept and the topk best choices among their experts taken. Weights are s of those experts,
    renormalized to sum 1 if asked, times routed_scaling_factor if
    apply_routed_scaling_factor_on_output. Ties go to the lower index (GPU and CPU alike).

    Non-finite scores: NaN ranks as -inf in every selection, so the ids are always topk distinct
    experts in [0, E): those with numbers first by value, then the others by lowest index (groups
    likewise). Sigmoid maps +-inf to 1 and 0. A softmax row with a NaN or +inf score is NaN
    throughout (as torch.softmax), so that token gets the lowest ids of its kept groups; a token
    whose chosen s is NaN gets NaN weights. Other tokens are unaffected.

    Fused shared experts: num_fused_shared_experts slots follow, with ids E, E+1, ... and the weight
    that makes the fused layer equal rsf * sum(routed) + shared: 1 when the scaling is applied here,
    1/rsf when the caller scales the whole output by rsf. They take no part in renormalization.

    Args:
        scores: [T, E] float32, float16 or bfloat16, E <= 1024.
        bias: [E] float32 or scores' dtype (DeepSeek-V3's e_score_correction_bias), or None.
    Returns:
        topk_weights: [T, topk + num_fused_shared_experts] float32.
        topk_ids: [T, topk + num_fused_shared_experts] int32.
    """
    return _ops.moe_fused_gate(scores, bias, num_expert_group, topk_group, topk, scoring_func, renormalize,
                               num_fused_shared_experts, routed_scaling_factor,
                               apply_routed_scaling_factor_on_output)


@torch.library.register_fake("moe_kernels::moe_fused_gate")
def _(scores, bias, num_expert_group, topk_group, topk, scoring_func="sigmoid", renormalize=True,
      num_fused_shared_experts=0, routed_scaling_factor=1.0, apply_routed_scaling_factor_on_output=False):
    width = topk + num_fused_shared_experts
    return (scores.new_empty((scores.shape[0], width), dtype=torch.float32),
            scores.new_empty((scores.shape[0], width), dtype=torch.int32))
