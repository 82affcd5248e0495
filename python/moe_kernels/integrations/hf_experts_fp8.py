"""The FP8 experts forwards for HF transformers: "moe_kernels_fp8" (bf16/fp16/fp32 weights
quantized once per output channel) and, for FP8 checkpoints (HF's FP8Experts), "moe_kernels"
(the checkpoint's e4m3 weights with their 128x128 block scales). Both run cutlass_moe_fp8, whose
fused activation computes silu(gate) * up on the two halves of GEMM1's output: experts with any
other gate are rejected with an error naming what the module declares.
"""

import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.gemm import cutlass_moe_fp8
from ..ops.quant import scaled_fp8_quant
from .hf_experts import ExpertsLayout, routing_space

FP8 = torch.float8_e4m3fn
BLOCK = 128  # the block-scaled contract: one weight scale per 128x128 block
BLOCK_FP8_ISSUE = "issue 10 (block-scaled FP8 cutlass_moe_fp8)"
_CACHE_ATTR = "_moe_kernels_fp8_cache"


def _is_silu(act) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation class; "swish" gives torch's nn.SiLU.
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _hf_default_gate():
    from transformers.integrations import moe

    return getattr(moe, "_default_apply_gate", None)


def _custom_gate_reason(module: torch.nn.Module) -> Optional[str]:
    """Why the module's _apply_gate is not plain act(gate) * up on two halves, or None."""
    cls = type(module)
    gate_fn = getattr(cls, "_apply_gate", None)
    if gate_fn is None or gate_fn is _hf_default_gate():
        return None
    if cls.__name__ == "FP8Experts" or any(c.__name__ == "FP8Experts" for c in cls.__mro__):
        # FP8Experts' own gate reduces to act(gate) * up unless the config sets one of these.
        set_options = [name for name in ("gate_softcap", "up_softcap", "swiglu_alpha", "limit")
                       if getattr(module, name, None) is not None]
        if not set_options:
            return None
        return f"a modified SwiGLU ({', '.join(set_options)} set in the config)"
    return f"its own gate function {cls.__name__}._apply_gate"


def require_silu_gated(module: torch.nn.Module, layout: ExpertsLayout, implementation: str) -> None:
    """Raises ValueError unless the experts compute silu(gate) * up on concatenated halves with no
    bias and no post-expert norm: what cutlass_moe_fp8's fused activation computes."""
    name = type(module).__name__
    prefix = f'experts implementation "{implementation}": {name}'
    fix = 'use the "moe_kernels" implementation (bf16) for these experts'
    if not layout.has_gate:
        raise ValueError(f"{prefix} has no gate (has_gate=False, act(up) only); only silu(gate) * up "
                         f"experts are supported; {fix}")
    reason = _custom_gate_reason(module)  # first: a gate of its own may not use act_fn at all
    if reason is not None:
        raise ValueError(f"{prefix} uses {reason}; only silu(gate) * up is supported; {fix}")
    act = getattr(module, "act_fn", None)
    if not _is_silu(act):
        hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
        declared = f" (config.hidden_act={hidden_act!r})" if hidden_act is not None else ""
        raise ValueError(f"{prefix} uses the activation {type(act).__name__}{declared}; only SiLU-gated "
                         f"experts (silu(gate) * up) are supported; {fix}")
    if not layout.is_concatenated:
        raise ValueError(f"{prefix} stores gate and up interleaved (is_concatenated=False); only the "
                         f"concatenated [gate; up] layout is supported; {fix}")
    if layout.has_bias:
        raise ValueError(f"{prefix} has biases (has_bias=True), which the FP8 layer does not add; {fix}")
    if layout.has_post_expert_norm:
        raise ValueError(f"{prefix} has a post-expert norm (has_post_expert_norm=True); {fix}")


def _activation_input(hidden_states: Tensor) -> Tensor:
    """cutlass_moe_fp8 reads bf16 or fp16 tokens: other dtypes (fp32 models) go through bf16, which
    loses nothing that the e4m3 quantization right after keeps."""
    x = hidden_states if hidden_states.dtype in (torch.bfloat16, torch.float16) else hidden_states.to(torch.bfloat16)
    return x.contiguous()


def _quantize_rows(w: Tensor) -> Tuple[Tensor, Tensor]:
    """w [E, N, K] -> (e4m3 [E, N, K], float32 [E, N]): one dynamic scale per output channel
    (row), max(amax / 448, 1 / (448 * 512)) as scaled_fp8_quant computes per token."""
    E, N, K = w.shape
    q, scale = scaled_fp8_quant(w.reshape(E * N, K).contiguous(), per_token=True)
    return q.view(E, N, K), scale.view(E, N)


class _Stamp:
    """What identifies the contents of some tensors without reading them: the tensor objects
    (held weakly: a replaced parameter is a new object, even at a reused address), their storage
    (``.data =`` assignments, moves) and their version counters (every in-place write:
    load_state_dict, optimizer steps, ``.copy_``)."""

    def __init__(self, *tensors: Tensor):
        self._refs = [weakref.ref(t) for t in tensors]
        self._key = [(t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors]

    def matches(self, *tensors: Tensor) -> bool:
        return (len(tensors) == len(self._refs) and all(r() is t for r, t in zip(self._refs, tensors))
                and self._key == [(t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors])


def _cached(module: torch.nn.Module, kind: str, tensors: Tuple[Tensor, ...], make):
    """make() cached on the module under kind until the tensors change (see _Stamp). A plain
    attribute, not a buffer: it is derived data, never saved with the model."""
    cache = module.__dict__.setdefault(_CACHE_ATTR, {})
    entry = cache.get(kind)
    if entry is None or not entry[0].matches(*tensors):
        entry = (_Stamp(*tensors), make())
        cache[kind] = entry
    return entry[1]


@torch.compiler.disable  # reads data pointers and versions: runs eagerly, outside any graph
def per_channel_fp8_weights(module: torch.nn.Module, layout: ExpertsLayout):
    """((w1 e4m3 [E, 2I, H], w1_scale [E, 2I]), (w2 e4m3 [E, H, I], w2_scale [E, H])) of the
    module's weights, quantized on first use and cached on the module until the weights change."""
    w_up, w_down = module.gate_up_proj, module.down_proj

    def quantize():
        with torch.no_grad():
            w1, w2 = w_up.detach(), w_down.detach()
            if layout.is_transposed:  # stored [E, H, 2I] / [E, I, H]: the layer wants [E, N, K]
                w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
            return _quantize_rows(w1), _quantize_rows(w2)

    return _cached(module, f"per_channel_transposed={layout.is_transposed}", (w_up, w_down), quantize)


def moe_kernels_fp8_experts_forward(module: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                                    top_k_weights: Tensor) -> Tensor:
    """ExpertsInterface "moe_kernels_fp8": weights quantized to e4m3 once per output channel
    (cached on the module, refreshed when the weights change), tokens quantized per token on the
    fly, cutlass_moe_fp8. Returns [T, H] in hidden_states' dtype."""
    layout = ExpertsLayout.of(module)
    require_silu_gated(module, layout, "moe_kernels_fp8")
    (w1, w1_scale), (w2, w2_scale) = per_channel_fp8_weights(module, layout)
    x = _activation_input(hidden_states)
    _, expert_map, num_local = routing_space(module, layout, x.device)
    out = cutlass_moe_fp8(x, w1, w2, top_k_weights.float().contiguous(), top_k_index.contiguous(), w1_scale, w2_scale,
                          per_act_token=True, per_out_ch=True, expert_map=expert_map, num_local_experts=num_local)
    return out.to(hidden_states.dtype)


_block_fp8_supported: Optional[bool] = None


@torch.compiler.disable
def block_fp8_supported() -> bool:
    """Whether the installed cutlass_moe_fp8 takes block-scaled weights (3-D scales): asked once
    with a one-token CPU call, since the op library and this package can come from different
    builds."""
    global _block_fp8_supported
    if _block_fp8_supported is None:
        E, H, I = 1, BLOCK, BLOCK
        args = (torch.ones(1, H, dtype=torch.bfloat16), torch.ones(E, 2 * I, H).to(FP8),
                torch.ones(E, H, I).to(FP8), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32),
                torch.ones(E, 2 * I // BLOCK, H // BLOCK), torch.ones(E, H // BLOCK, I // BLOCK))
        try:
            cutlass_moe_fp8(*args)
            _block_fp8_supported = True
        except RuntimeError:
            _block_fp8_supported = False
    return _block_fp8_supported


def require_block_fp8_checkpoint(module: torch.nn.Module) -> None:
    """Raises unless the FP8Experts module holds what the block-scaled layer takes: e4m3 weights,
    128x128 block scales (float32 or UE8M0), dynamic activation scales, H and I multiples of 128."""
    name = type(module).__name__
    prefix = f'experts implementation "moe_kernels" for FP8 checkpoints: {name}'
    if module.gate_up_proj.dtype != FP8:
        raise ValueError(f"{prefix} holds {module.gate_up_proj.dtype} weights (e.g. an FP4 checkpoint); "
                         "only float8_e4m3fn weights are supported")
    block = getattr(module, "block_size", None)
    if block is None or tuple(block) != (BLOCK, BLOCK):
        raise ValueError(f"{prefix} has weight_block_size={block}; only 128x128 block scales are supported")
    scheme = getattr(module, "activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f'{prefix} has activation_scheme={scheme!r}; only "dynamic" activation scales '
                         "are supported")
    E, two_i, H = module.gate_up_proj.shape
    if H % BLOCK or two_i % (2 * BLOCK):
        raise ValueError(f"{prefix} has hidden size {H} and intermediate size {two_i // 2}; both must be "
                         f"multiples of {BLOCK} (each gate and up block of scales covers one of them)")


@torch.compiler.disable
def float32_block_scales(module: torch.nn.Module) -> Tuple[Tensor, Tensor]:
    """The module's weight_scale_inv tensors as float32 [E, 2I/128, H/128] and [E, H/128, I/128]:
    as stored when float32; UE8M0 (powers of two) converted once, exactly, and cached."""
    s1, s2 = module.gate_up_proj_scale_inv, module.down_proj_scale_inv
    if s1.dtype == torch.float32 and s2.dtype == torch.float32:
        return s1, s2
    return _cached(module, "block_scales_float32", (s1, s2), lambda: (s1.detach().float(), s2.detach().float()))


def moe_kernels_fp8_block_experts_forward(module: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                                          top_k_weights: Tensor) -> Tensor:
    """FP8ExpertsInterface "moe_kernels": an FP8 checkpoint's experts (e4m3 weights in HF's layout,
    gate rows then up rows, with their 128x128 ``*_scale_inv`` as stored) through the block-scaled
    cutlass_moe_fp8; tokens quantized per token per 128 columns inside. Returns [T, H] in
    hidden_states' dtype."""
    layout = ExpertsLayout.of(module)
    require_silu_gated(module, layout, "moe_kernels")
    require_block_fp8_checkpoint(module)
    if not block_fp8_supported():
        raise NotImplementedError(
            'experts implementation "moe_kernels" for FP8 checkpoints needs cutlass_moe_fp8 with '
            f"block-scaled weights (3-D scales), which this build of moe_kernels lacks: {BLOCK_FP8_ISSUE}")
    w1_scale, w2_scale = float32_block_scales(module)
    x = _activation_input(hidden_states)
    _, expert_map, num_local = routing_space(module, layout, x.device)
    out = cutlass_moe_fp8(x, module.gate_up_proj, module.down_proj, top_k_weights.float().contiguous(),
                          top_k_index.contiguous(), w1_scale, w2_scale, expert_map=expert_map,
                          num_local_experts=num_local)
    return out.to(hidden_states.dtype)
