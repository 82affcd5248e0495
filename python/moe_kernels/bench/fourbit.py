"""Shared by the 4-bit benchmarks (gemm_mxfp4, layer_mxfp4, layer_w4a8): random 4-bit weights in the
layouts the checkpoints store, and the calls of the 4-bit ops, each looked up in the installed
build (features.py) so that a build without them reports skipped rows instead of crashing.

Layouts (DESIGN.md, third wave):
- MXFP4: blocks uint8 [E, N, K/2], two E2M1 values a byte, the low nibble the even element; E8M0
  scales uint8 [E, N, K/32], value = e2m1 * 2^(s - 127).
- INT4 (W4A8): signed int4 two a byte [E, N, K/2], low nibble the even element; fp32 scales
  [E, N, K/128]; activations e4m3 with a static per-tensor scale or dynamic per token.
"""

from typing import Callable, Optional, Union

import torch

from . import features

# Every byte is a valid pair of E2M1 codes (the format has no NaN or Inf), so random bytes are
# random weights. E8M0 exponents 118..122 give weights of magnitude up to 6 * 2^-5 ~ 0.19, like the
# fp8 benchmarks' 0.05-scaled normals.
MX_SCALE_RANGE = (118, 123)
INT4_SCALE = 0.01
PACKED_DTYPE = torch.uint8  # two 4-bit values a byte, as the checkpoints store them

# The grouped GEMM ops of the 4-bit formats (branch fp4), looked up by name; the first that exists.
MXFP4_GEMM_NAMES = ("grouped_gemm_mxfp4",)


def mxfp4_weight(E: int, N: int, K: int, device="cuda"):
    """Random MXFP4 weight [E, N, K]: (blocks uint8 [E, N, K/2], scales uint8 [E, N, K/32])."""
    blocks = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device=device)
    scales = torch.randint(*MX_SCALE_RANGE, (E, N, K // 32), dtype=torch.uint8, device=device)
    return blocks, scales


def int4_weight(E: int, N: int, K: int, device="cuda"):
    """Random INT4 weight [E, N, K]: (packed [E, N, K/2], fp32 scales [E, N, K/128])."""
    packed = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device=device).view(PACKED_DTYPE)
    scales = torch.rand(E, N, K // 128, device=device) * INT4_SCALE + INT4_SCALE / 2
    return packed, scales


def mxfp4_gemm() -> Union[Callable, str]:
    """The MXFP4 grouped GEMM function of this build, or why it is missing."""
    for name in MXFP4_GEMM_NAMES:
        fn = features.function(name)
        if fn is not None:
            return fn
    return f"skipped: this build of moe_kernels has no MXFP4 grouped GEMM ({' or '.join(MXFP4_GEMM_NAMES)}; branch fp4)"


def call_gemm(gemm: Callable, a, w, w_scale, expert_offsets, a_scale=None):
    """gemm(a, w, w_scale, expert_offsets) with the activation scale passed under the name this
    build's function gives it (a_scale or a_scales), else positionally fifth."""
    if a_scale is None:
        return gemm(a, w, w_scale, expert_offsets)
    try:
        import inspect
        names = [p for p in inspect.signature(gemm).parameters if p.startswith("a_scale")]
    except (TypeError, ValueError):
        names = []
    if names:
        return gemm(a, w, w_scale, expert_offsets, **{names[0]: a_scale})
    return gemm(a, w, w_scale, expert_offsets, a_scale)


def fp8_layer_call(m, x, w1, w2, s1, s2, a1, a2, b1=None, b2=None) -> Union[Callable, str]:
    """Our FP8 layer on the model's experts (the peer `ours_fp8` of the 4-bit rows) as a callable of
    (ids, w) (the routing of each call), or why this build cannot run it (activation keywords:
    branch act)."""
    import moe_kernels

    why = features.missing("cutlass_moe_fp8", *features.layer_needs(m), where="activation keywords: branch act")
    if why:
        return why.replace("skipped:", "n/a:")
    kw = dict(m.layer_kwargs(), **({"w1_bias": b1, "w2_bias": b2} if m.expert_bias else {}))
    return lambda ids, w: moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, s1, s2, a1, a2, **kw)


def layer_peers(m, x, wt: dict) -> dict:
    """The peers of a 4-bit layer row (layer_mxfp4, layer_w4a8) on the same routings: our FP8 layer
    (`ours_fp8`, unit weight scales, static activation scales 0.02) on wt's e4m3 weights, and the bf16
    torch layer on wt's bf16 weights; each a callable of (ids, w), or why it cannot run."""
    from .layer import torch_bf16_layer

    b1, b2 = wt["b"]
    one, a = torch.ones(m.E, device="cuda"), torch.tensor([0.02], device="cuda")
    return {
        "ours_fp8": fp8_layer_call(m, x, wt["w18"], wt["w28"], one, one, a, a, b1, b2),
        "torch_bf16": lambda ids, w: torch_bf16_layer(x, wt["w1b"], wt["w2b"], w, ids, m.E, m.layer_kwargs(), b1, b2),
    }


def layer_keywords(m, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor]) -> dict:
    """The activation and bias keywords of a 4-bit layer call for model m."""
    return dict(m.layer_kwargs(), **({"w1_bias": b1, "w2_bias": b2} if m.expert_bias else {}))
