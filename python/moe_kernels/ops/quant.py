"""FP8 (float8_e4m3fn) quantization: scaled_fp8_quant, and silu_and_mul_quant_fp8, the activation
between the two grouped GEMMs of an MoE layer fused with the re-quantization.

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


def silu_and_mul_quant_fp8(
    x: Tensor, scale: Optional[Tensor] = None, per_token: bool = False
) -> Tuple[Tensor, Tensor]:
    """``silu(gate) * up`` quantized to float8_e4m3fn, in one pass over x (two for a dynamic
    per-tensor scale).

    Args:
        x: [M, 2I] bfloat16, float16 or float32, contiguous: gate in columns [0, I), up in
            [I, 2I) (the output of GEMM1 with vLLM's w13 layout).
        scale, per_token: as scaled_fp8_quant.

    Returns:
        q: [M, I] float8_e4m3fn, the quantized ``y = silu(gate) * up`` (computed in fp32,
            ``silu(g) = g / (1 + exp(-g))``).
        scale: float32, [1] or [M, 1], as scaled_fp8_quant.
    """
    return _ops.silu_and_mul_quant_fp8(x, scale, per_token)


def _fake_scale(x: Tensor, rows: int, scale: Optional[Tensor], per_token: bool) -> Tensor:
    if scale is None and per_token:
        return x.new_empty((rows, 1), dtype=torch.float32)
    return x.new_empty((1,), dtype=torch.float32)


@torch.library.register_fake("moe_kernels::scaled_fp8_quant")
def _(x, scale=None, per_token=False):
    M, K = x.shape
    return x.new_empty((M, K), dtype=torch.float8_e4m3fn), _fake_scale(x, M, scale, per_token)


@torch.library.register_fake("moe_kernels::silu_and_mul_quant_fp8")
def _(x, scale=None, per_token=False):
    M, K2 = x.shape
    return x.new_empty((M, K2 // 2), dtype=torch.float8_e4m3fn), _fake_scale(x, M, scale, per_token)
