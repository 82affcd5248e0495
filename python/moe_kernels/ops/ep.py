"""Expert-parallel reorder, as SGLang's EP MoE: every rank sees all T tokens and computes only its
experts ``[start_expert_id, end_expert_id]`` (inclusive). ``ep_pre_reorder`` scatters the rows of
the local choices into the expert-grouped layout (optionally quantizing to fp8 e4m3 on the way);
``ep_post_reorder`` gathers the expert outputs back with the top-k weights. Summing the
post_reorder outputs of all ranks (an all-reduce) gives the whole MoE output.

``src2dst`` [T, K] int32 is the row of each choice in the grouped layout, e.g. the
``inv_permuted_idx`` of :func:`moe_kernels.moe_sort_tokens` (over all experts, or with an
expert_map keeping this rank's experts). Rows of kept choices must be distinct (they are, from
moe_sort_tokens). No kernel reads or writes outside its tensors on any data: a kept choice whose row
lies outside the tensor is skipped, on CUDA and CPU alike.

Expert ids are only compared with the range: the number of experts is not an argument, so ids
outside ``[0, E)`` are not detected; a negative id (e.g. -1 for a padded slot) is never local.
"""

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.moe_kernels


def ep_pre_reorder(
    hidden_states: Tensor,
    src2dst: Tensor,
    topk_ids: Tensor,
    start_expert_id: int,
    end_expert_id: int,
    scale: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Copies row t of hidden_states to row ``src2dst[t, k]`` for every k whose expert
    ``topk_ids[t, k]`` lies in ``[start_expert_id, end_expert_id]``.

    Args:
        hidden_states: [T, H] bfloat16, float16, float32 (or float8_e4m3fn, copied as is), contiguous.
        src2dst: [T, K] int32, rows in [0, T*K); other values are skipped.
        topk_ids: [T, K] int32 or int64.
        start_expert_id, end_expert_id: this rank's experts, inclusive; 0 <= start <= end.
        scale: float32, with out_dtype=float8_e4m3fn only: [1] per tensor, or [T] (or [T, 1]) per token.
        out_dtype: None (hidden_states' dtype: a plain copy) or torch.float8_e4m3fn (quantize:
            ``e4m3(clamp(x / scale, -448, 448))``, the division in fp32, rounding to nearest even).

    Returns:
        out: [T*K, H], out_dtype. Rows that no local choice maps to are left unwritten (their
        contents are unspecified, as in SGLang: this rank's experts never read them).
    """
    return _ops.ep_pre_reorder(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale, out_dtype)


def ep_post_reorder(
    down_output: Tensor,
    src2dst: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    start_expert_id: int,
    end_expert_id: int,
) -> Tensor:
    """This rank's share of the top-k combine.

    ``out[t] = sum over k with start <= topk_ids[t,k] <= end of topk_weights[t,k] * down_output[src2dst[t,k]]``,
    accumulated in fp32 in k order and written once (the kernel of moe_unpermute with an expert-range
    filter); a token with no local choice gets zeros.

    Args:
        down_output: [R, H] bfloat16, float16 or float32 (R = T*K from ep_pre_reorder's layout; rows
            src2dst outside [0, R) are skipped).
        src2dst: [T, K] int32.
        topk_ids: [T, K] int32 or int64.
        topk_weights: [T, K] float32 or down_output's dtype.
        start_expert_id, end_expert_id: this rank's experts, inclusive; 0 <= start <= end.

    Returns:
        out: [T, H], down_output's dtype.
    """
    return _ops.ep_post_reorder(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id)


@torch.library.register_fake("moe_kernels::ep_pre_reorder")
def _(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale=None, out_dtype=None):
    T, K = src2dst.shape
    dtype = hidden_states.dtype if out_dtype is None else out_dtype
    return hidden_states.new_empty((T * K, hidden_states.shape[1]), dtype=dtype)


@torch.library.register_fake("moe_kernels::ep_post_reorder")
def _(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id):
    return down_output.new_empty((src2dst.shape[0], down_output.shape[1]))
