"""Token permutation for MoE: routing metadata, permute, weighted unpermute, GEMM problem sizes.

Layout: the rows of the permuted tensor are grouped by local expert in ascending order and, inside
an expert, kept in (token, k) order. ``expert_offsets[e]`` is the first row of expert e and
``expert_offsets[-1]`` the number of rows in use. Shapes never depend on tensor data, so that
torch.compile and CUDA graphs see static shapes: with expert parallelism the number of local
experts is an argument.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

_ops = torch.ops.moe_kernels


def permuted_rows(num_tokens: int, topk: int, num_local_experts: int, align_block_size: int) -> int:
    """M, the row count of the permuted layout: T*K, or with alignment a static upper bound."""
    choices = num_tokens * topk
    if align_block_size <= 0:
        return choices
    a = align_block_size
    return (choices + num_local_experts * (a - 1) + a - 1) // a * a


def _local_experts(num_experts: int, expert_map: Optional[Tensor], num_local_experts: int) -> int:
    return num_experts if expert_map is None else num_local_experts


def moe_sort_tokens(
    topk_ids: Tensor,
    num_experts: int,
    expert_map: Optional[Tensor] = None,
    num_local_experts: int = -1,
    align_block_size: int = 0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Routing metadata of moe_permute, without moving data.

    Args:
        topk_ids: [T, K] int32 or int64, expert of each (token, k) in [0, num_experts).
        num_experts: E, the global expert count.
        expert_map: optional [E] int32, local index of each global expert or -1 (not on this rank);
            choices routed to -1 are dropped.
        num_local_experts: E_local; required with expert_map, else -1 (= E).
        align_block_size: pad each expert's rows to a multiple of it (0: no padding).

    Returns:
        expert_offsets: [E_local + 1] int64, first row of each expert; last entry = rows in use.
        inv_permuted_idx: [T, K] int32, the row of (t, k), or -1 if dropped.
        permuted_idx: [M] int32, flat source index t*K + k of each row; -1 for padding/unused rows.

    On CUDA, ids outside [0, E) (or mapped outside [0, E_local)) are dropped, since checking data
    would need a host sync; the CPU implementation raises on them.
    """
    return _ops.moe_sort_tokens(topk_ids, num_experts, expert_map, num_local_experts, align_block_size)


def moe_permute(
    hidden_states: Tensor,
    topk_ids: Tensor,
    num_experts: int,
    expert_map: Optional[Tensor] = None,
    num_local_experts: int = -1,
    align_block_size: int = 0,
    scales: Optional[Tensor] = None,
) -> Union[Tuple[Tensor, Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """Groups the token rows by expert: row of (t, k) is ``permuted[inv_permuted_idx[t, k]]``.

    Args:
        hidden_states: [T, H] bfloat16, float16, float32 or float8_e4m3fn, contiguous.
        topk_ids, num_experts, expert_map, num_local_experts, align_block_size: as moe_sort_tokens.
        scales: optional float32 scales of the rows of quantized hidden_states, moved with them in
            the same kernel pass: [T] or [T, 1] (per token) or [T, G] (per group of columns, e.g.
            the [T, H/128] of per_token_group_quant_fp8), contiguous.

    Returns:
        Four tensors without scales, five with them:

        permuted: [M, H], dtype of hidden_states; M = T*K, or with align_block_size = a,
            round_up(T*K + E_local*(a-1), a). Alignment padding rows are zero; rows at and past
            expert_offsets[-1] are left unwritten.
        expert_offsets, inv_permuted_idx, permuted_idx: as moe_sort_tokens.
        permuted_scales (only when scales is given): [M, G] float32 (G = 1 per token), row r
            holding the scales of permuted's row r; like permuted's rows, padding rows are zero and
            rows at and past expert_offsets[-1] are left unwritten. (The op itself always returns
            five tensors, the fifth an empty [0] float32 tensor without scales.)
    """
    out = _ops.moe_permute(hidden_states, topk_ids, num_experts, expert_map, num_local_experts, align_block_size,
                           scales)
    return out if scales is not None else out[:4]


def moe_unpermute(permuted: Tensor, topk_weights: Tensor, inv_permuted_idx: Tensor, bias: Optional[Tensor] = None,
                  expert_offsets: Optional[Tensor] = None) -> Tensor:
    """Weighted sum of each token's expert outputs: the top-k combine, optionally adding each
    expert's output bias first.

    ``out[t] = sum over k with r = inv_permuted_idx[t,k] >= 0 of topk_weights[t,k] * (permuted[r] + bias[e(r)])``,
    accumulated in fp32 in k order and written once; a token with no kept row gets zeros. The bias
    term is there only when ``bias`` is given: ``e(r)`` is the expert owning row r,
    ``expert_offsets[e] <= r < expert_offsets[e+1]`` (a row past ``expert_offsets[-1]`` gets no
    bias), and the bias is added in fp32 before the weight multiplies (gpt-oss's down-projection
    bias; cutlass_moe_fp8's ``w2_bias``).

    Args:
        permuted: [M, H] bfloat16, float16 or float32.
        topk_weights: [T, K] float32 or permuted's dtype.
        inv_permuted_idx: [T, K] int32 from moe_permute / moe_sort_tokens.
        bias: optional [E, H] float32, contiguous, on permuted's device.
        expert_offsets: [E + 1] int64 (moe_permute's), required with bias and only with it.

    Returns:
        out: [T, H], permuted's dtype.
    """
    return _ops.moe_unpermute(permuted, topk_weights, inv_permuted_idx, bias, expert_offsets)


def compute_problem_sizes(expert_offsets: Tensor, n: int, k: int, swap_ab: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-expert shapes of the two grouped GEMMs of an MoE layer, computed on the device.

    With M_e = expert_offsets[e+1] - expert_offsets[e] (hidden size k, intermediate size n):
    GEMM1 is (M_e, 2n, k) and GEMM2 is (M_e, k, n); swap_ab gives the transposed problems
    (2n, M_e, k) and (k, M_e, n), for kernels that put the weights in the A slot at small M_e.

    Args:
        expert_offsets: [E_local + 1] int64.
    Returns:
        problem_sizes1, problem_sizes2: [E_local, 3] int32 each.
    """
    return _ops.compute_problem_sizes(expert_offsets, n, k, swap_ab)


@torch.library.register_fake("moe_kernels::moe_sort_tokens")
def _(topk_ids, num_experts, expert_map=None, num_local_experts=-1, align_block_size=0):
    T, K = topk_ids.shape
    local = _local_experts(num_experts, expert_map, num_local_experts)
    rows = permuted_rows(T, K, local, align_block_size)
    return (
        topk_ids.new_empty((local + 1,), dtype=torch.int64),
        topk_ids.new_empty((T, K), dtype=torch.int32),
        topk_ids.new_empty((rows,), dtype=torch.int32),
    )


@torch.library.register_fake("moe_kernels::moe_permute")
def _(hidden_states, topk_ids, num_experts, expert_map=None, num_local_experts=-1, align_block_size=0, scales=None):
    T, K = topk_ids.shape
    local = _local_experts(num_experts, expert_map, num_local_experts)
    rows = permuted_rows(T, K, local, align_block_size)
    if scales is None:
        permuted_scales = hidden_states.new_empty((0,), dtype=torch.float32)
    else:
        G = 1 if scales.dim() == 1 else scales.shape[1]
        permuted_scales = hidden_states.new_empty((rows, G), dtype=torch.float32)
    return (
        hidden_states.new_empty((rows, hidden_states.shape[1])),
        topk_ids.new_empty((local + 1,), dtype=torch.int64),
        topk_ids.new_empty((T, K), dtype=torch.int32),
        topk_ids.new_empty((rows,), dtype=torch.int32),
        permuted_scales,
    )


@torch.library.register_fake("moe_kernels::moe_unpermute")
def _(permuted, topk_weights, inv_permuted_idx, bias=None, expert_offsets=None):
    return permuted.new_empty((inv_permuted_idx.shape[0], permuted.shape[1]))


@torch.library.register_fake("moe_kernels::compute_problem_sizes")
def _(expert_offsets, n, k, swap_ab=False):
    E = expert_offsets.shape[0] - 1
    return (
        expert_offsets.new_empty((E, 3), dtype=torch.int32),
        expert_offsets.new_empty((E, 3), dtype=torch.int32),
    )
