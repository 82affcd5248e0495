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

from typing import Optional, Tuple

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


def ep_record_bytes(hidden: int, dtype: torch.dtype, num_scales: int, topk: int) -> int:
    """Bytes of one dispatch record: ``[row: hidden elements of dtype | pad to 16 | num_scales fp32 |
    topk fp32 weights | topk int32 ids | pad to 16]`` (csrc/ep/record_layout.h)."""
    row = hidden * torch.empty((), dtype=dtype).element_size()
    meta_offset = (row + 15) // 16 * 16
    return (meta_offset + 4 * (num_scales + 2 * topk) + 15) // 16 * 16


def ep_dispatch_plan(topk_ids: Tensor, experts_per_rank: int, world_size: int,
                     capacity: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    """Where each (token, destination rank) record goes in the send buffer of an all-to-all dispatch.

    Rank d owns experts ``[d * experts_per_rank, (d + 1) * experts_per_rank)``; a token goes once to
    every rank that owns one of its choices (ids outside ``[0, world_size * experts_per_rank)``, e.g.
    -1, go nowhere). Records are grouped by rank, in token order inside a rank.

    Args:
        topk_ids: [T, K] int32 or int64.
        experts_per_rank: >= 1.
        world_size: 1 to 64 ranks.
        capacity: -1: variable splits (rank d's records follow those of ranks < d); >= 0: rank d's
            records are ``[d * capacity, (d + 1) * capacity)`` and those past the capacity are dropped.

    Returns:
        slots: [T, W] int32, the record of token t for rank d, or -1 (not wanted, or dropped).
        counts: [W] int32, tokens that want rank d (before the capacity: ``counts > capacity`` is
            the overflow).
        dropped: [1] int32, records dropped by the capacity (0 with variable splits).
    """
    return _ops.ep_dispatch_plan(topk_ids, experts_per_rank, world_size, capacity)


def ep_pack_records(x: Tensor, scales: Optional[Tensor], topk_weights: Tensor, topk_ids: Tensor, slots: Tensor,
                    counts: Tensor, num_records: int, experts_per_rank: int, capacity: int = -1) -> Tensor:
    """Builds the send buffer of a dispatch: for every ``slots[t, d] >= 0`` one record
    ``[x[t] | scales[t] | topk_weights[t] | topk_ids[t] as int32]`` (:func:`ep_record_bytes`).

    Args:
        x: [T, H] bfloat16, float16, float32 or float8_e4m3fn (rows are copied as bytes).
        scales: None, [T] (per token) or [T, G] (per group) float32.
        topk_weights: [T, K] float32; topk_ids: [T, K] int32 or int64.
        slots, counts: from :func:`ep_dispatch_plan`.
        num_records: rows of the buffer: ``counts.sum()`` with variable splits, ``W * capacity`` with
            a capacity. Slots outside ``[0, num_records)`` are skipped.
        experts_per_rank, capacity: as given to :func:`ep_dispatch_plan`.

    Returns:
        records: [num_records, record_bytes] uint8. With a capacity, the records that no token
        fills carry scale 1, weight 0 and, as every id, the first expert of rank ``(d + 1) % W``
        (never the destination's own): the receiver computes nothing for them. Their rows and the
        padding bytes are unspecified.
    """
    return _ops.ep_pack_records(x, scales, topk_weights, topk_ids, slots, counts, num_records, experts_per_rank,
                                capacity)


def ep_unpack_records(records: Tensor, hidden: int, dtype: torch.dtype, num_scales: int,
                      topk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Splits received records into contiguous tensors for the experts.

    Args:
        records: [N, ep_record_bytes(hidden, dtype, num_scales, topk)] uint8.

    Returns:
        x [N, hidden] dtype, scales [N, num_scales] float32, topk_weights [N, topk] float32,
        topk_ids [N, topk] int32.
    """
    return _ops.ep_unpack_records(records, hidden, dtype, num_scales, topk)


@torch.library.register_fake("moe_kernels::ep_pre_reorder")
def _(hidden_states, src2dst, topk_ids, start_expert_id, end_expert_id, scale=None, out_dtype=None):
    T, K = src2dst.shape
    dtype = hidden_states.dtype if out_dtype is None else out_dtype
    return hidden_states.new_empty((T * K, hidden_states.shape[1]), dtype=dtype)


@torch.library.register_fake("moe_kernels::ep_post_reorder")
def _(down_output, src2dst, topk_ids, topk_weights, start_expert_id, end_expert_id):
    return down_output.new_empty((src2dst.shape[0], down_output.shape[1]))


@torch.library.register_fake("moe_kernels::ep_dispatch_plan")
def _(topk_ids, experts_per_rank, world_size, capacity=-1):
    T = topk_ids.shape[0]
    return (topk_ids.new_empty((T, world_size), dtype=torch.int32), topk_ids.new_empty((world_size,), dtype=torch.int32),
            topk_ids.new_empty((1,), dtype=torch.int32))


@torch.library.register_fake("moe_kernels::ep_pack_records")
def _(x, scales, topk_weights, topk_ids, slots, counts, num_records, experts_per_rank, capacity=-1):
    G = 0 if scales is None else (1 if scales.dim() == 1 else scales.shape[1])
    return x.new_empty((num_records, ep_record_bytes(x.shape[1], x.dtype, G, topk_ids.shape[1])), dtype=torch.uint8)


@torch.library.register_fake("moe_kernels::ep_unpack_records")
def _(records, hidden, dtype, num_scales, topk):
    N = records.shape[0]
    return (records.new_empty((N, hidden), dtype=dtype), records.new_empty((N, num_scales), dtype=torch.float32),
            records.new_empty((N, topk), dtype=torch.float32), records.new_empty((N, topk), dtype=torch.int32))
