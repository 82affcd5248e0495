"""The unquantized "moe_kernels" experts forward for HF transformers' experts modules.

An HF experts module (decorated with ``use_experts_implementation``) holds its weights as 3-D
parameters and declares their layout in attributes that the decorator sets:

- ``has_gate``: ``gate_up_proj`` [E, 2I, H] (gated) or ``up_proj`` [E, I, H] (not gated);
  ``down_proj`` [E, H, I].
- ``is_transposed``: the same weights stored as [E, H, 2I] / [E, I, H] (``x @ w`` instead of
  ``x @ w.T``).
- ``has_bias``: ``gate_up_proj_bias`` (or ``up_proj_bias``) [E, 2I] and ``down_proj_bias`` [E, H].
- ``is_concatenated``: gate and up as two halves, or interleaved. Only the module's own
  ``_apply_gate`` reads that split, and it is called here as it is by HF's own implementations.
- ``has_post_expert_norm``: ``post_expert_norm`` applied to each expert's output.
- ``_is_expert_parallel``: ids equal to ``num_experts`` are sentinels of other ranks' experts.

Everything a module declares is honoured: the GEMMs follow the layout, the bias is added per row's
expert, and the gate / activation are the module's own functions, so any activation works.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.permute import moe_permute, moe_unpermute


class ExpertsLayout(NamedTuple):
    """What an HF experts module declares about its weights (defaults: HF's defaults). A
    NamedTuple: torch.compile traces its construction without a graph break."""

    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True
    has_post_expert_norm: bool = False
    expert_parallel: bool = False

    @staticmethod
    def of(module: torch.nn.Module) -> "ExpertsLayout":
        # getattr with HF's defaults: transformers 5.x releases added these attributes one by one.
        return ExpertsLayout(
            has_gate=getattr(module, "has_gate", True),
            has_bias=getattr(module, "has_bias", False),
            is_transposed=getattr(module, "is_transposed", False),
            is_concatenated=getattr(module, "is_concatenated", True),
            has_post_expert_norm=getattr(module, "has_post_expert_norm", False),
            expert_parallel=getattr(module, "_is_expert_parallel", False),
        )


def up_weights(module: torch.nn.Module, layout: ExpertsLayout) -> Tuple[Tensor, Optional[Tensor]]:
    """The first projection's weight and bias (gate_up_proj, or up_proj when not gated)."""
    name = "gate_up_proj" if layout.has_gate else "up_proj"
    return getattr(module, name), (getattr(module, name + "_bias") if layout.has_bias else None)


def routing_space(module: torch.nn.Module, layout: ExpertsLayout, device) -> Tuple[int, Optional[Tensor], int]:
    """(num_experts, expert_map, num_local_experts) for moe_permute.

    Under HF's expert parallelism the module holds its rank's E experts and the router's choices of
    other ranks' experts arrive as the sentinel id E (with weight 0): a map of E + 1 entries whose
    last is -1 drops them, so they cost no GEMM rows.
    """
    E = module.num_experts
    if not layout.expert_parallel:
        return E, None, -1
    expert_map = torch.arange(E + 1, dtype=torch.int32, device=device)
    expert_map[E] = -1
    return E + 1, expert_map, E


def _use_torch_grouped_mm(a: Tensor, w: Tensor) -> bool:
    """torch._grouped_mm (CUTLASS, CUDA only) takes bf16 operands whose strides are multiples of 16
    bytes: a [M, K] row-major and b [E, K, N] row- or column-major (w or its transposed view, from a
    contiguous w: both K and N must then be multiples of 8)."""
    if not (a.is_cuda and a.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and w.is_contiguous()):
        return False
    aligned = 16 // a.element_size()
    return w.shape[1] % aligned == 0 and w.shape[2] % aligned == 0


def grouped_linear(x: Tensor, w: Tensor, expert_offsets: Tensor, transposed: bool,
                   bias: Optional[Tensor] = None) -> Tensor:
    """Rows of expert e (``expert_offsets[e]:expert_offsets[e+1]`` of x [M, K]) times its weight:
    ``x @ w[e].T`` for w [E, N, K], ``x @ w[e]`` when ``transposed`` (w [E, K, N]); plus bias[e]
    [E, N] if given. Returns [M, N] in x's dtype; rows past ``expert_offsets[-1]`` are unspecified.

    On CUDA with bf16: torch._grouped_mm, offsets on the device (no host sync, graph-capturable).
    Otherwise (CPU, other dtypes): one matmul per expert, the offsets read on the host (a sync on
    CUDA), in the dtype of the weights, as HF's eager loop computes.
    """
    b = w if transposed else w.transpose(-2, -1)  # [E, K, N]
    if _use_torch_grouped_mm(x, w):
        grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # F.grouped_mm from torch 2.10
        out = grouped_mm(x, b, offs=expert_offsets[1:].to(torch.int32))
    else:
        out = x.new_zeros((x.shape[0], b.shape[2]))
        offsets = expert_offsets.tolist()
        for e in range(w.shape[0]):
            start, end = offsets[e], offsets[e + 1]
            if end > start:
                out[start:end] = x[start:end] @ w[e] if transposed else F.linear(x[start:end], w[e])
    if bias is not None:
        out = out + bias[row_experts(expert_offsets, x.shape[0])]
    return out


def row_experts(expert_offsets: Tensor, rows: int) -> Tensor:
    """[rows] int64: the expert of each row of a permuted layout (rows past the last expert's get
    the last expert: they are never read back). Computed on the device, no host sync."""
    rows_idx = torch.arange(rows, device=expert_offsets.device)
    num_experts = expert_offsets.shape[0] - 1
    return torch.searchsorted(expert_offsets[1:], rows_idx, right=True).clamp_(max=num_experts - 1)


def gate(module: torch.nn.Module, h: Tensor) -> Tensor:
    """The module's gate on GEMM1's output [M, 2I] -> [M, I]: its _apply_gate (HF's default,
    act(first half) * second half, or the module's own), or that default where a transformers
    release predates _apply_gate."""
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(h)
    g, up = h.chunk(2, dim=-1)
    return module.act_fn(g) * up


def moe_kernels_experts_forward(module: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                                top_k_weights: Tensor) -> Tensor:
    """ExpertsInterface "moe_kernels": moe_permute -> grouped GEMM (+ bias) -> the module's gate or
    activation -> grouped GEMM (+ bias) -> post-expert norm if declared -> moe_unpermute with the
    top-k weights (fp32 accumulation).

    Args (HF's experts signature):
        hidden_states: [T, H], any float dtype (cast to the weights' dtype, as HF does).
        top_k_index: [T, K] int64 or int32 expert ids.
        top_k_weights: [T, K] router weights.
    Returns:
        [T, H] in hidden_states' dtype.
    """
    if hidden_states.shape[0] == 0:  # no rows for the grouped GEMM (its empty case is not specified)
        return hidden_states.new_zeros(hidden_states.shape)
    layout = ExpertsLayout.of(module)
    w_up, b_up = up_weights(module, layout)
    x = hidden_states.to(w_up.dtype).contiguous()
    num_experts, expert_map, num_local = routing_space(module, layout, x.device)
    permuted, offsets, inv_idx, _ = moe_permute(x, top_k_index.contiguous(), num_experts, expert_map, num_local)
    h = grouped_linear(permuted, w_up, offsets, layout.is_transposed, b_up)
    h = gate(module, h) if layout.has_gate else module.act_fn(h)
    b_down = module.down_proj_bias if layout.has_bias else None
    y = grouped_linear(h.contiguous(), module.down_proj, offsets, layout.is_transposed, b_down)
    if layout.has_post_expert_norm:
        y = module.post_expert_norm(y)
    out = moe_unpermute(y.contiguous(), top_k_weights.float().contiguous(), inv_idx)
    return out.to(hidden_states.dtype)
