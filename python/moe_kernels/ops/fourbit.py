"""4-bit expert weights: MXFP4 (gpt-oss, DeepSeek-V4) and INT4 x FP8 (DeepSeek-R1 W4AFP8).

Grouped GEMMs (:func:`grouped_gemm_mxfp4`, :func:`grouped_gemm_w4a8`), the MoE layers built on them
(:func:`cutlass_moe_mxfp4`, :func:`cutlass_moe_w4a8`) and :func:`w4a8_scales_from_sglang`.

Weights are ``uint8 [E, N, K/2]``, two 4-bit codes a byte, the low nibble the even K element (the
checkpoints' layout: gpt-oss's ``*_blocks [E, N, K/32, 16]`` is a reshape away).

- MXFP4: E2M1 codes (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), one E8M0 scale byte ``s`` per 32 consecutive
  K elements, ``uint8 [E, N, K/32]``; value = e2m1 * 2^(s - 127) (s = 255 is NaN).
- INT4: signed two's-complement codes in [-8, 7], one float32 scale per 128 consecutive K elements,
  ``float32 [E, N, K/128]``; value = q * scale.

Numerics: the kernels multiply in bfloat16 with fp32 accumulation. An MXFP4 weight enters as its
exact value (every finite e2m1 * 2^k is a bf16); an INT4 weight as bf16(q * bf16(scale)) (the scale
rounded to bf16 as SGLang keeps W4AFP8 scales, the product rounded once). e4m3 activations convert
exactly to bf16; their per-token (or per-tensor) scale multiplies the fp32 accumulator. So for MXFP4
the products equal an FP8-MMA W4A8's (e2m1 is exact in e4m3) up to the fp32 accumulation order. The
CPU references compute the same thing with plain loops.
"""

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.moe_kernels

_GATED = ("silu", "gelu", "swigluoai")


def grouped_gemm_mxfp4(a: Tensor, w: Tensor, w_scale: Tensor, expert_offsets: Tensor, a_scale: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, activation: str = "none", gate_up_interleaved: bool = False,
                       swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> Tensor:
    """Grouped GEMM over experts with MXFP4 weights, optionally with a fused gated activation.

    For the rows r of expert e (``expert_offsets[e] <= r < expert_offsets[e+1]``)::

        y[r, n] = (sum_k bf16(a[r, k]) * bf16(w_value[e, n, k])) * a_scale[r] + bias[e, n]   (fp32)

    activation ``"none"``: ``out[r, n] = bf16(y[r, n])``, out [M, N]. ``"silu"``, ``"gelu"``,
    ``"swigluoai"``: ``out[r, j] = bf16(act(y[r, gate(j)], y[r, up(j)]))``, out [M, N/2], with
    gate(j) = j and up(j) = N/2 + j, or 2j and 2j+1 when ``gate_up_interleaved`` (gpt-oss). The
    activations are those of :func:`cutlass_moe_mxfp4`.

    Args:
        a: [M, K] bfloat16 (W4A16), or float8_e4m3fn (W4A8; then ``a_scale`` is required), rows
            grouped by expert (as moe_permute leaves them). K a multiple of 32.
        w: [E, N, K/2] uint8, two E2M1 codes a byte, low nibble the even element.
        w_scale: [E, N, K/32] uint8 E8M0 exponents.
        expert_offsets: [E + 1] int64.
        a_scale: float32 [1] (per tensor) or [M] / [M, 1] (per row) with float8_e4m3fn ``a``; None
            with bfloat16 ``a``.
        bias: [E, N] float32 or None, in w's row order.
    Returns:
        [M, N] (or [M, N/2] gated) bfloat16; rows at and past ``expert_offsets[-1]`` are not
        written.

    The grid is a static bound of the tiles the routing can need (no host sync, CUDA-graph
    capturable); experts with no rows cost nothing. At decode (M / E <= 1) a GEMV kernel streams the
    weights instead of the tiles (docs/ops.md; verified on an H200). CUDA needs compute
    capability 8.0 or newer.
    """
    return _ops.grouped_gemm_mxfp4(a, w, w_scale, expert_offsets, a_scale, bias, activation, gate_up_interleaved,
                                   swiglu_alpha, swiglu_limit)


def grouped_gemm_w4a8(a: Tensor, w: Tensor, w_scale: Tensor, expert_offsets: Tensor, a_scale: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None, activation: str = "none", gate_up_interleaved: bool = False,
                      swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> Tensor:
    """Grouped GEMM over experts with signed INT4 weights and float8_e4m3fn activations.

    The formula of :func:`grouped_gemm_mxfp4` with ``w_value = bf16(q * bf16(w_scale))`` (one
    scale per 128 K elements, rounded to bf16 as SGLang keeps W4AFP8 scales, the product rounded
    once more to the GEMM's bf16 input).

    Args:
        a: [M, K] float8_e4m3fn, rows grouped by expert. K a multiple of 128.
        w: [E, N, K/2] uint8, two signed 4-bit codes a byte, low nibble the even element.
        w_scale: [E, N, K/128] float32 (use :func:`w4a8_scales_from_sglang` for SGLang's packed
            layout).
        expert_offsets: [E + 1] int64.
        a_scale: float32 [1] (per tensor) or [M] / [M, 1] (per row); required.
        bias, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit: as
            :func:`grouped_gemm_mxfp4`.
    Returns:
        [M, N] (or [M, N/2] gated) bfloat16.
    """
    return _ops.grouped_gemm_w4a8(a, w, w_scale, expert_offsets, a_scale, bias, activation, gate_up_interleaved,
                                  swiglu_alpha, swiglu_limit)


def cutlass_moe_mxfp4(hidden_states: Tensor, w1: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                      w1_scale: Tensor, w2_scale: Tensor, *, activation: str = "silu",
                      gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                      w1_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
                      a_dtype: torch.dtype = torch.bfloat16, expert_map: Optional[Tensor] = None,
                      num_local_experts: int = -1) -> Tensor:
    """The expert computation of an MoE layer with MXFP4 weights (gpt-oss, DeepSeek-V4).

    moe_permute -> :func:`grouped_gemm_mxfp4` with w1 (+ w1_bias, gated activation fused) ->
    :func:`grouped_gemm_mxfp4` with w2 (+ w2_bias) -> moe_unpermute with topk_weights. With
    ``a_dtype=torch.float8_e4m3fn`` (W4A8) the input and GEMM1's output are quantized to e4m3 per
    token (scaled_fp8_quant, dynamic) before each GEMM.

    Activations (``gate``, ``up`` the two halves of GEMM1's output, biases included):

    - ``"silu"``: silu(gate) * up
    - ``"gelu"``: gelu(gate) * up, the exact (erf) GELU
    - ``"swigluoai"`` (gpt-oss): g = min(gate, swiglu_limit); u = clamp(up, -swiglu_limit,
      swiglu_limit); (u + 1) * g * sigmoid(swiglu_alpha * g)

    Args:
        hidden_states: [T, H] bfloat16; H a multiple of 32 (gpt-oss's 2880 works).
        w1: [E_local, 2I, H/2] uint8 (gate and up rows: gate first, or alternating with
            ``gate_up_interleaved``, as gpt-oss stores them); I a multiple of 32.
        w2: [E_local, H, I/2] uint8.
        topk_weights: [T, K] float32; topk_ids: [T, K] int32/int64 global expert ids.
        w1_scale: [E_local, 2I, H/32] uint8 E8M0; w2_scale: [E_local, H, I/32] uint8.
        w1_bias: [E_local, 2I] float32 (w1's row order) or None; w2_bias: [E_local, H] float32 or
            None, added per expert before the routing weight.
        a_dtype: torch.bfloat16 (W4A16) or torch.float8_e4m3fn (W4A8).
        expert_map: [E] int32 global -> local expert or -1 (expert parallelism); other experts'
            choices contribute nothing.
        num_local_experts: -1 or E_local.
    Returns:
        [T, H] bfloat16.
    """
    return _ops.cutlass_moe_mxfp4(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale,
                                  activation=activation, gate_up_interleaved=gate_up_interleaved,
                                  swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, w1_bias=w1_bias,
                                  w2_bias=w2_bias, a_dtype=a_dtype, expert_map=expert_map,
                                  num_local_experts=num_local_experts)


def cutlass_moe_w4a8(hidden_states: Tensor, w1: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                     w1_scale: Tensor, w2_scale: Tensor, a1_scale: Optional[Tensor] = None,
                     a2_scale: Optional[Tensor] = None, *, activation: str = "silu",
                     gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                     w1_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
                     expert_map: Optional[Tensor] = None, num_local_experts: int = -1) -> Tensor:
    """The expert computation of an MoE layer with INT4 weights and FP8 activations (W4AFP8).

    quantize (static a1_scale, or per token) -> moe_permute (rows with their scales) ->
    :func:`grouped_gemm_w4a8` with w1 (+ w1_bias, gated activation fused) -> quantize (static
    a2_scale, or per token) -> :func:`grouped_gemm_w4a8` with w2 (+ w2_bias) -> moe_unpermute.

    Args:
        hidden_states: [T, H] bfloat16; H a multiple of 128.
        w1: [E_local, 2I, H/2] uint8 signed int4 pairs (low nibble the even element); I a multiple
            of 128.
        w2: [E_local, H, I/2] uint8.
        topk_weights: [T, K] float32; topk_ids: [T, K] int32/int64 global expert ids.
        w1_scale: [E_local, 2I, H/128] float32; w2_scale: [E_local, H, I/128] float32 (the
            checkpoints' ``weight_scale_inv`` as stored; :func:`w4a8_scales_from_sglang` converts
            SGLang's packed layout).
        a1_scale, a2_scale: [1] float32 static per-tensor scales of GEMM1's and GEMM2's inputs, or
            None for dynamic per-token scales.
        activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias,
            expert_map, num_local_experts: as :func:`cutlass_moe_mxfp4`.
    Returns:
        [T, H] bfloat16.
    """
    return _ops.cutlass_moe_w4a8(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, a1_scale,
                                 a2_scale, activation=activation, gate_up_interleaved=gate_up_interleaved,
                                 swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, w1_bias=w1_bias,
                                 w2_bias=w2_bias, expert_map=expert_map, num_local_experts=num_local_experts)


def w4a8_scales_from_sglang(scales: Tensor, n: int, k: int, group_size: int = 128) -> Tensor:
    """SGLang's packed W4AFP8 weight scales -> ours, float32 [E, N, K/128].

    SGLang's CUTLASS W4A8 path (``interleave_scales`` in sglang/srt/layers/quantization/w4afp8.py)
    takes the checkpoint's [E, N, K/128] scales, converts them to bfloat16 and interleaves ``p``
    consecutive K groups of each row: [E, N, G] -> [E, G/p, N, p] -> [E, G/p, N*p]; p = 4 when
    the group count allows (so [E, K/512, N*4] for DeepSeek-R1), else 2 or 1 depending on the SGLang
    version. ``p`` is read from the shape (``scales.shape[2] // n``). A one-byte view of the
    bfloat16 tensor (the [E, K/512, N*8] shape that shows up when the packed scales are stored as
    bytes) is accepted too and read back as bfloat16.

    Args:
        scales: the packed scales, bfloat16/float16/float32, or a one-byte view of bfloat16 ones.
        n: rows of the weight (N: 2I for w13, H for w2); k: its K (H for w13, I for w2).
        group_size: 128 (the only W4AFP8 group size).
    Returns:
        float32 [E, N, K/group_size], contiguous.
    """
    if k % group_size != 0:
        raise ValueError(f"w4a8_scales_from_sglang: k={k} must be a multiple of group_size={group_size}")
    groups = k // group_size
    if scales.dim() != 3:
        raise ValueError(f"w4a8_scales_from_sglang: scales must be 3-D [E, K/({group_size}*p), N*p], "
                         f"got shape {tuple(scales.shape)}")
    if scales.element_size() == 1:
        if scales.shape[2] % 2 != 0:
            raise ValueError(f"w4a8_scales_from_sglang: a one-byte scales tensor must be the bytes of bfloat16 "
                             f"scales (an even last dimension), got shape {tuple(scales.shape)}")
        scales = scales.contiguous().view(torch.bfloat16)
    e = scales.shape[0]
    pack = scales.shape[2] // n if n > 0 else 0
    if pack < 1 or groups % pack != 0 or tuple(scales.shape) != (e, groups // pack, n * pack):
        raise ValueError(f"w4a8_scales_from_sglang: scales must be [E, K/({group_size}*p), N*p] with p dividing "
                         f"K/{group_size} = {groups} (n={n}, k={k}), got shape {tuple(scales.shape)}")
    out = scales.reshape(e, groups // pack, n, pack).permute(0, 2, 1, 3).reshape(e, n, groups)
    return out.to(torch.float32).contiguous()


def _gemm_out_cols(w: Tensor, activation: str) -> int:
    return w.shape[1] // 2 if activation in _GATED else w.shape[1]


@torch.library.register_fake("moe_kernels::grouped_gemm_mxfp4")
def _(a, w, w_scale, expert_offsets, a_scale=None, bias=None, activation="none", gate_up_interleaved=False,
      swiglu_alpha=1.702, swiglu_limit=7.0):
    return a.new_empty((a.shape[0], _gemm_out_cols(w, activation)), dtype=torch.bfloat16)


@torch.library.register_fake("moe_kernels::grouped_gemm_w4a8")
def _(a, w, w_scale, expert_offsets, a_scale=None, bias=None, activation="none", gate_up_interleaved=False,
      swiglu_alpha=1.702, swiglu_limit=7.0):
    return a.new_empty((a.shape[0], _gemm_out_cols(w, activation)), dtype=torch.bfloat16)


@torch.library.register_fake("moe_kernels::cutlass_moe_mxfp4")
def _(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, *, activation="silu",
      gate_up_interleaved=False, swiglu_alpha=1.702, swiglu_limit=7.0, w1_bias=None, w2_bias=None, a_dtype=None,
      expert_map=None, num_local_experts=-1):
    return torch.empty_like(hidden_states, dtype=torch.bfloat16)


@torch.library.register_fake("moe_kernels::cutlass_moe_w4a8")
def _(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, a1_scale=None, a2_scale=None, *,
      activation="silu", gate_up_interleaved=False, swiglu_alpha=1.702, swiglu_limit=7.0, w1_bias=None,
      w2_bias=None, expert_map=None, num_local_experts=-1):
    return torch.empty_like(hidden_states, dtype=torch.bfloat16)
