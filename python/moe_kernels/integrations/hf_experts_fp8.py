"""The FP8 experts forwards for HF transformers: "moe_kernels_fp8" (bf16/fp16/fp32 weights
quantized once per output channel) and, for FP8 checkpoints (HF's FP8Experts), "moe_kernels"
(the checkpoint's e4m3 weights with their 128x128 block scales). Both run cutlass_moe_fp8, whose
fused activation computes silu, exact-erf gelu or gpt-oss's swigluoai on GEMM1's output (gate and
up as two halves or interleaved), with the experts' biases added in fp32: experts with any other
gate are rejected with an error naming what the module declares.
"""

import math
import weakref
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.gemm import cutlass_moe_fp8
from ..ops.quant import scaled_fp8_quant
from .hf_experts import ExpertsLayout, routing_space

FP8 = torch.float8_e4m3fn
BLOCK = 128  # the block-scaled contract: one weight scale per 128x128 block
BLOCK_FP8_ISSUE = "issue 10 (block-scaled FP8 cutlass_moe_fp8)"
_CACHE_ATTR = "_moe_kernels_fp8_cache"


class GateSpec(NamedTuple):
    """What cutlass_moe_fp8 computes between its GEMMs (its activation keywords)."""

    activation: str = "silu"
    gate_up_interleaved: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def keywords(self) -> dict:
        return dict(activation=self.activation, gate_up_interleaved=self.gate_up_interleaved,
                    swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit)

    def formula(self, h: Tensor) -> Tensor:
        """The activation in plain torch on GEMM1's output h [.., 2I] (the spec a module's gate is
        checked against)."""
        g, u = (h[..., 0::2], h[..., 1::2]) if self.gate_up_interleaved else h.chunk(2, dim=-1)
        if self.activation == "silu":
            return F.silu(g) * u
        if self.activation == "gelu":
            return F.gelu(g) * u
        g = g.clamp(max=self.swiglu_limit)
        u = u.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return (u + 1) * (g * torch.sigmoid(g * self.swiglu_alpha))


def _act_name(act) -> Optional[str]:
    """The activation of an act_fn module that the fused op computes exactly, or None."""
    name = type(act).__name__
    # transformers' ACT2FN["silu"] is its own SiLUActivation class; "swish" gives torch's nn.SiLU.
    if isinstance(act, torch.nn.SiLU) or name == "SiLUActivation":
        return "silu"
    # ACT2FN["gelu"] / ["gelu_python"]: GELUActivation, the erf GELU; nn.GELU() likewise. The tanh
    # approximations (gelu_pytorch_tanh, gelu_new, gelu_fast) are other functions.
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    if name == "GELUActivation":
        return "gelu"
    return None


def _hf_default_gate():
    from transformers.integrations import moe

    return getattr(moe, "_default_apply_gate", None)


def _swiglu_constants(module: torch.nn.Module) -> Optional[Tuple[float, float]]:
    """(alpha, limit) declared by a module with a clamped SwiGLU (gpt-oss's ``alpha`` / ``limit``,
    FP8Experts' ``swiglu_alpha`` / ``limit``), or None."""
    alpha = getattr(module, "alpha", None)
    if alpha is None:
        alpha = getattr(module, "swiglu_alpha", None)
    limit = getattr(module, "limit", None)
    if limit is None:
        limit = getattr(module, "swiglu_limit", None)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return float(alpha), (float(limit) if isinstance(limit, (int, float)) else math.inf)


def _gate_matches(module: torch.nn.Module, spec: GateSpec) -> bool:
    """Whether the module's own _apply_gate computes spec's formula: both on the same fp32 probe
    (values up to +-40, beyond any clamp), compared to 1e-5 (a different activation, layout or
    constant is off by far more)."""
    probe = torch.randn(8, 2 * 24, generator=torch.Generator().manual_seed(0)) * 10
    try:
        with torch.no_grad():
            got = module._apply_gate(probe.clone())
    except Exception:  # a gate that needs something else (a device, a shape): not recognized
        return False
    want = spec.formula(probe)
    return (isinstance(got, Tensor) and got.shape == want.shape
            and torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6, equal_nan=True))


@torch.compiler.disable  # a probe on the CPU, once per module
def gate_spec(module: torch.nn.Module, layout: ExpertsLayout, implementation: str) -> GateSpec:
    """The activation keywords of cutlass_moe_fp8 that compute the module's gate, or ValueError
    naming what it declares. Recognized:

    - HF's default gate, ``act_fn(gate) * up`` on the two halves, with act_fn SiLU or the erf GELU;
    - a gate of the module's own (gpt-oss's GptOssExperts, FP8Experts with ``swiglu_alpha``, any
      class with ``alpha``/``limit`` or ``swiglu_alpha``/``swiglu_limit``) that computes silu,
      gelu or swigluoai on halves or interleaved values, checked by running it once on a probe
      against the formula (cached on the module).
    """
    cache = module.__dict__.setdefault(_CACHE_ATTR, {})
    if "gate_spec" in cache:
        return cache["gate_spec"]
    name = type(module).__name__
    prefix = f'experts implementation "{implementation}": {name}'
    fix = 'use the "moe_kernels" implementation (bf16) for these experts'
    supported = "silu(gate) * up, gelu(gate) * up (exact erf) and swigluoai (gpt-oss)"
    if not layout.has_gate:
        raise ValueError(f"{prefix} has no gate (has_gate=False, act(up) only); only gated experts "
                         f"({supported}) are supported; {fix}")
    if layout.has_post_expert_norm:
        raise ValueError(f"{prefix} has a post-expert norm (has_post_expert_norm=True); {fix}")
    gate_fn = getattr(type(module), "_apply_gate", None)
    act = getattr(module, "act_fn", None)
    act_name = _act_name(act) if act is not None else None
    if gate_fn is None or gate_fn is _hf_default_gate():
        if act_name is None:
            hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
            declared = f" (config.hidden_act={hidden_act!r})" if hidden_act is not None else ""
            raise ValueError(f"{prefix} uses the activation {type(act).__name__}{declared}; only {supported} are "
                             f"supported; {fix}")
        spec = GateSpec(act_name)
    else:
        candidates = []
        constants = _swiglu_constants(module)
        for interleaved in (not layout.is_concatenated, layout.is_concatenated):
            if constants is not None:
                candidates.append(GateSpec("swigluoai", interleaved, *constants))
            if act_name is not None:
                candidates.append(GateSpec(act_name, interleaved))
        spec = next((c for c in candidates if _gate_matches(module, c)), None)
        if spec is None:
            raise ValueError(f"{prefix} uses its own gate function {name}._apply_gate, which does not compute "
                             f"{supported} on its inputs (checked on a probe); {fix}")
    cache["gate_spec"] = spec
    return spec


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


@torch.compiler.disable  # reads data pointers and versions: runs eagerly, outside any graph
def fp32_biases(module: torch.nn.Module, layout: ExpertsLayout) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(gate_up_proj_bias [E, 2I], down_proj_bias [E, H]) as float32 (kept in fp32, not
    quantized), or (None, None) without has_bias; converted once and cached while the
    parameters stay the same."""
    if not layout.has_bias:
        return None, None
    b1, b2 = module.gate_up_proj_bias, module.down_proj_bias
    if b1.dtype == torch.float32 and b2.dtype == torch.float32 and b1.is_contiguous() and b2.is_contiguous():
        return b1.detach(), b2.detach()
    return _cached(module, "biases_float32", (b1, b2),
                   lambda: (b1.detach().float().contiguous(), b2.detach().float().contiguous()))


def moe_kernels_fp8_experts_forward(module: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                                    top_k_weights: Tensor) -> Tensor:
    """ExpertsInterface "moe_kernels_fp8": weights quantized to e4m3 once per output channel
    (cached on the module, refreshed when the weights change), biases kept in fp32, tokens
    quantized per token on the fly, the module's gate as cutlass_moe_fp8's activation (see
    gate_spec: silu, gelu or gpt-oss's swigluoai; halves or interleaved). Returns [T, H] in
    hidden_states' dtype."""
    layout = ExpertsLayout.of(module)
    spec = gate_spec(module, layout, "moe_kernels_fp8")
    (w1, w1_scale), (w2, w2_scale) = per_channel_fp8_weights(module, layout)
    b1, b2 = fp32_biases(module, layout)
    x = _activation_input(hidden_states)
    _, expert_map, num_local = routing_space(module, layout, x.device)
    out = cutlass_moe_fp8(x, w1, w2, top_k_weights.float().contiguous(), top_k_index.contiguous(), w1_scale, w2_scale,
                          per_act_token=True, per_out_ch=True, expert_map=expert_map, num_local_experts=num_local,
                          w1_bias=b1, w2_bias=b2, **spec.keywords())
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
    spec = gate_spec(module, layout, "moe_kernels")
    require_block_fp8_checkpoint(module)
    if not block_fp8_supported():
        raise NotImplementedError(
            'experts implementation "moe_kernels" for FP8 checkpoints needs cutlass_moe_fp8 with '
            f"block-scaled weights (3-D scales), which this build of moe_kernels lacks: {BLOCK_FP8_ISSUE}")
    w1_scale, w2_scale = float32_block_scales(module)
    x = _activation_input(hidden_states)
    _, expert_map, num_local = routing_space(module, layout, x.device)
    b1, b2 = fp32_biases(module, layout)
    out = cutlass_moe_fp8(x, module.gate_up_proj, module.down_proj, top_k_weights.float().contiguous(),
                          top_k_index.contiguous(), w1_scale, w2_scale, expert_map=expert_map,
                          num_local_experts=num_local, w1_bias=b1, w2_bias=b2, **spec.keywords())
    return out.to(hidden_states.dtype)
