"""FP8 (float8_e4m3fn) quantization: scaled_fp8_quant, and silu_and_mul_quant_fp8, the gated
activation (silu, gelu or swigluoai; optional per-expert bias) between the two grouped GEMMs of an
MoE layer fused with the re-quantization.

Scales, as vLLM's ``scaled_fp8_quant``:

- ``scale`` given (float32, one element): static per-tensor; the op returns a copy of it as [1].
  ``per_token`` is then ignored (it selects the granularity of a *dynamic* scale only, like
  vLLM's ``use_per_token_if_dynamic``).
- ``scale=None, per_token=False``: dynamic per-tensor, scale [1].
- ``scale=None, per_token=True``: dynamic per-token, scale [M, 1], one per row.

A dynamic scale is ``max(amax / 448, 1 / (448 * 512))`` (vLLM's floor, which keeps an all-zero row
finite: its scale is 1/229376 and its q is 0). Values are quantized as
``q = e4m3(clamp(y * (1 / scale), -448, 448))``, the reciprocal taken once per scale, the product in
fp32, the rounding to nearest even; dequantize with ``q.float() * scale``. Dynamic scales are
computed on the device (no host sync; CUDA-graph capturable). A static scale must be positive
(it is not checked on the device, which would need a host sync).

Per-group scales (the activation scales of block-scaled FP8 checkpoints: DeepSeek-V3/R1,
Qwen3-FP8, Kimi-K2): ``per_token_group_quant_fp8``, and ``silu_and_mul_quant_fp8`` with
``group_size > 0``, give every group of ``group_size`` consecutive columns of a row its own dynamic
scale ``max(amax, 1e-10) / 448`` (vLLM's and SGLang's formula, floor included) and quantize it as
``q = e4m3(clamp(y / scale, -448, 448))`` with an IEEE fp32 division (as those implementations do).
An infinite value does not enter its group's amax (it would make the scale infinite, the rest of
the group 0 and itself NaN): it saturates to +-448. NaN stays NaN.

Non-finite input: a dynamic scale takes amax over the finite values only (NaN and +-inf count as
0), so +-inf saturates to +-448 and NaN stays NaN in its own element, without changing the scale
of the other values. silu(-inf) = -0 (its limit) and silu(+inf) = +inf.

The CUDA kernels and the CPU reference perform the same fp32 operations (silu through an
exponential written with IEEE operations only), so they give the same bytes.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.moe_kernels


def scaled_fp8_quant(x: Tensor, scale: Optional[Tensor] = None, per_token: bool = False) -> Tuple[Tensor, Tensor]:
    """Quantizes x to float8_e4m3fn with a static, dynamic per-tensor or dynamic per-token scale.

    Args:
        x: [M, K] bfloat16, float16 or float32, contiguous.
        scale: optional float32 with one element ([1] or a scalar) on x's device: static scale.
        per_token: with scale=None, one dynamic scale per row instead of one for the tensor.

    Returns:
        q: [M, K] float8_e4m3fn, ``e4m3(clamp(x * (1 / scale), -448, 448))``.
        scale: float32, [1] (static: a copy of the given scale; dynamic per-tensor) or [M, 1]
            (dynamic per-token).
    """
    return _ops.scaled_fp8_quant(x, scale, per_token)


def per_token_group_quant_fp8(x: Tensor, group_size: int = 128,
                              column_major_scales: bool = False) -> Tuple[Tensor, Tensor]:
    """Quantizes x to float8_e4m3fn with one dynamic scale per token per group of ``group_size``
    columns (the 1x128 activation scales of block-scaled FP8 GEMMs), in one pass over x.

    Args:
        x: [T, K] bfloat16, float16 or float32, contiguous; K a multiple of group_size.
        group_size: columns per group (128 for the DeepSeek-V3 / Qwen3-FP8 checkpoints).
        column_major_scales: return the scales in a column-major tensor (strides (1, T)), for
            GEMMs that read MN-major scale operands; the values are the same. T is not padded
            (a TMA load of such scales needs T % 4 == 0 for 16-byte aligned columns: callers that
            need it pad T themselves; no GEMM of this library reads this layout yet).

    Returns:
        q: [T, K] float8_e4m3fn, ``e4m3(clamp(x / scale, -448, 448))`` with the scale of the
            element's group (infinities saturate to +-448).
        scales: [T, K // group_size] float32, ``max(amax(group), 1e-10) / 448`` (amax over the
            group's finite values); row-major, or column-major with column_major_scales.
            Dequantize with ``q.float() * scales.repeat_interleave(group_size, dim=1)``.
    """
    return _ops.per_token_group_quant_fp8(x, group_size, column_major_scales)


ACTIVATIONS = ("silu", "gelu", "swigluoai")


def silu_and_mul_quant_fp8(
    x: Tensor, scale: Optional[Tensor] = None, per_token: bool = False, group_size: int = 0,
    activation: str = "silu", gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0, bias: Optional[Tensor] = None, expert_offsets: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """A gated activation ``y = act(gate, up)`` quantized to float8_e4m3fn, in one pass over x (two
    for a dynamic per-tensor scale): the step between the two grouped GEMMs of an MoE layer.

    Activations, computed in fp32 (``g``, ``u`` the gate and up values, bias included):

    - ``"silu"`` (default): ``silu(g) * u``, ``silu(g) = g / (1 + exp(-g))``.
    - ``"gelu"``: ``gelu(g) * u`` with the exact GELU of torch.nn.functional.gelu,
      ``gelu(g) = g / 2 * (1 + erf(g / sqrt(2)))`` (not the tanh approximation).
    - ``"swigluoai"`` (gpt-oss): ``g' = min(g, limit)``; ``u' = clamp(u, -limit, limit)``;
      ``y = (u' + 1) * g' * sigmoid(alpha * g')`` with ``alpha = swiglu_alpha`` (1.702) and
      ``limit = swiglu_limit`` (7.0). The gate is clamped from above only. NaN stays NaN.

    Any other name is an error that names it. exp and erf are evaluated with IEEE fp32 operations
    only, the same on the GPU and in the CPU reference (equal bytes); they are within 2 ulp of the
    exact functions.

    Args:
        x: [M, 2I] bfloat16, float16 or float32, contiguous, the output of GEMM1: gate in columns
            [0, I) and up in [I, 2I) (vLLM's w13 layout), or with ``gate_up_interleaved`` gate in
            the even columns and up in the odd ones (gpt-oss's gate_up_proj).
        scale, per_token: as scaled_fp8_quant.
        group_size: > 0 for one dynamic scale per row per group of group_size columns of y, as
            per_token_group_quant_fp8 computes them (I must be a multiple of it; scale must be
            None and per_token False). 0: the scale modes of scaled_fp8_quant.
        activation: ``"silu"``, ``"gelu"`` or ``"swigluoai"``.
        gate_up_interleaved: x's columns alternate gate, up.
        swiglu_alpha, swiglu_limit: the constants of ``"swigluoai"`` (ignored otherwise).
        bias: optional [E, 2I] float32, contiguous, on x's device, in x's column order: row r
            gets ``x[r] + bias[e]`` (one fp32 addition each) before the activation, e the expert
            with ``expert_offsets[e] <= r < expert_offsets[e+1]``; rows past ``expert_offsets[-1]``
            get no bias.
        expert_offsets: [E + 1] int64 (moe_permute's), required with bias and only with it.

    Returns:
        q: [M, I] float8_e4m3fn, the quantized y.
        scale: float32, [1] or [M, 1], as scaled_fp8_quant; with group_size > 0,
            [M, I // group_size] row-major.
    """
    return _ops.silu_and_mul_quant_fp8(x, scale, per_token, group_size, activation, gate_up_interleaved,
                                       float(swiglu_alpha), float(swiglu_limit), bias, expert_offsets)


def _fake_scale(x: Tensor, rows: int, scale: Optional[Tensor], per_token: bool) -> Tensor:
    if scale is None and per_token:
        return x.new_empty((rows, 1), dtype=torch.float32)
    return x.new_empty((1,), dtype=torch.float32)


@torch.library.register_fake("moe_kernels::scaled_fp8_quant")
def _(x, scale=None, per_token=False):
    M, K = x.shape
    return x.new_empty((M, K), dtype=torch.float8_e4m3fn), _fake_scale(x, M, scale, per_token)


@torch.library.register_fake("moe_kernels::per_token_group_quant_fp8")
def _(x, group_size=128, column_major_scales=False):
    T, K = x.shape
    torch._check(group_size > 0 and K % group_size == 0,
                 lambda: f"per_token_group_quant_fp8: x's K (its columns) must be a multiple of group_size={group_size}, got K={K}")
    G = K // group_size
    scales = x.new_empty((G, T), dtype=torch.float32).t() if column_major_scales else \
        x.new_empty((T, G), dtype=torch.float32)
    return x.new_empty((T, K), dtype=torch.float8_e4m3fn), scales


@torch.library.register_fake("moe_kernels::silu_and_mul_quant_fp8")
def _(x, scale=None, per_token=False, group_size=0, activation="silu", gate_up_interleaved=False, swiglu_alpha=1.702,
      swiglu_limit=7.0, bias=None, expert_offsets=None):
    torch._check(activation in ACTIVATIONS, lambda: f'silu_and_mul_quant_fp8: activation must be "silu", "gelu" '
                 f'or "swigluoai", got "{activation}"')
    M, K2 = x.shape
    q = x.new_empty((M, K2 // 2), dtype=torch.float8_e4m3fn)
    if group_size > 0:
        return q, x.new_empty((M, K2 // 2 // group_size), dtype=torch.float32)
    return q, _fake_scale(x, M, scale, per_token)
