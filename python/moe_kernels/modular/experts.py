"""Experts: torch.nn.Modules holding the expert weights, called as
``experts(x [T,H], topk_weights [T,K], topk_ids [T,K], expert_map, num_local_experts, x_scale) -> [T,H]``:
the weighted sum over each token's experts that live here (others contribute nothing).

x is float (bf16, fp16, fp32), or float8_e4m3fn quantized by the dispatch with x_scale [T] (per token)
or [T, H/128] (per 1x128 group); the output is then bfloat16.

Weights, scales and biases are registered as parameters (requires_grad=False) under vLLM's FusedMoE
names, so that ``state_dict()`` / ``load_state_dict()`` round-trip and ``.to(device)`` moves them:

=========================  ===========================================================================
``w13_weight``             [E_local, 2I, H] (4-bit formats: [E_local, 2I, H/2] uint8/int8): gate rows,
                           then up rows (or interleaved, ``gate_up_interleaved=True``: gpt-oss)
``w2_weight``              [E_local, H, I] (4-bit: [E_local, H, I/2])
``w13_weight_scale``       FP8 per expert [E] / per channel [E, 2I]; MXFP4 E8M0 uint8 [E, 2I, H/32]
``w13_weight_scale_inv``   FP8 128x128 blocks [E, 2I/128, H/128]; W4A8 [E, 2I, H/128] fp32 (the
                           checkpoints' name: multiplied to dequantize, despite the ``_inv``)
``w2_weight_scale[_inv]``  the same for w2
``w13_input_scale``        W4A8: static fp32 [1] scale of GEMM1's input (absent: dynamic per token)
``w2_input_scale``         static fp32 [1] scale of GEMM2's input (absent: dynamic)
``w13_bias``, ``w2_bias``  fp32 [E, 2I] (w13's row order) and [E, H] (added before the routing weight)
=========================  ===========================================================================

The quantized Experts keep their dtypes under ``.to(dtype)`` / ``.half()`` / ``.bfloat16()``: the
dtypes are the storage format (and the kernels need fp32 scales and biases); only the device follows.
``TorchExperts`` converts like any module (``.to(torch.float64)`` computes in float64).

Each class has ``from_checkpoint(tensors, prefix, ...)`` (stacking per-expert tensors, transposing
fused ones) and the quantized ones ``reference()`` (a TorchExperts with the dequantized weights).
"""

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.gemm import cutlass_moe_fp8, interleave_gate_up
from ..ops.permute import moe_sort_tokens
from . import checkpoint as _ckpt

FP8 = torch.float8_e4m3fn
ACTIVATIONS = ("silu", "gelu", "swigluoai")


def dequantize_rows(x: Tensor, x_scale: Optional[Tensor], who: str) -> Tensor:
    """e4m3 rows times their scales, in fp32: x_scale [1] (per tensor), [T] or [T, 1] (per token), or
    [T, G] (per group of H/G columns)."""
    if x_scale is None:
        raise ValueError(f"{who}: float8_e4m3fn x needs x_scale")
    T, H = x.shape
    s = x_scale.float()
    if s.numel() == 1 or (s.dim() == 1 and s.shape[0] == T):
        return x.float() * s.reshape(-1, 1)
    if s.dim() == 2 and s.shape[0] == T and H % s.shape[1] == 0:
        G = s.shape[1]
        return (x.float().view(T, G, H // G) * s.unsqueeze(-1)).view(T, H)
    raise ValueError(f"{who}: x_scale must be [1], [T], [T, 1] or [T, G] with G dividing H={H} (T={T}), "
                     f"got shape {tuple(x_scale.shape)}")


def gated_activation(h: Tensor, activation: str = "silu", gate_up_interleaved: bool = False,
                     swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> Tensor:
    """act(gate) * up of GEMM1's output h [..., 2I] (the formulas of DESIGN.md, third wave).

    gate and up are h's halves, or its even and odd columns with gate_up_interleaved (gpt-oss).
    silu: silu(gate) * up; gelu: gelu(gate) * up, the exact (erf) GELU; swigluoai (gpt-oss):
    gate = min(gate, limit), up = clamp(up, -limit, limit), (up + 1) * gate * sigmoid(alpha * gate).
    """
    if gate_up_interleaved:
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "swigluoai":
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(-swiglu_limit, swiglu_limit)
        return (up + 1) * gate * torch.sigmoid(swiglu_alpha * gate)
    raise ValueError(f"gated_activation: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Experts(nn.Module):
    """Base of the Experts modules: shapes, the gated activation and the biases every format shares.

    Subclasses register their weights and implement forward(x, topk_weights, topk_ids,
    expert_map=None, num_local_experts=-1, x_scale=None). Any callable with that signature works as
    the experts of a MoELayer too.
    """

    #: The activation quantization the dispatch should use: None per token, 128 per 1x128 group.
    quant_group_size: Optional[int] = None
    #: Printed by extra_repr.
    weight_format = "?"

    def _init_common(self, who: str, E: int, H: int, I: int, activation: str, gate_up_interleaved: bool,
                     swiglu_alpha: float, swiglu_limit: float, w1_bias: Optional[Tensor],
                     w2_bias: Optional[Tensor], bias_dtype: Optional[torch.dtype]):
        if activation not in ACTIVATIONS:
            raise ValueError(f"{who}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.activation = activation
        self.gate_up_interleaved = bool(gate_up_interleaved)
        self.swiglu_alpha, self.swiglu_limit = float(swiglu_alpha), float(swiglu_limit)
        for name, b, shape in (("w1_bias", w1_bias, (E, 2 * I)), ("w2_bias", w2_bias, (E, H))):
            if b is not None and tuple(b.shape) != shape:
                what = "E, 2I" if name == "w1_bias" else "E, H"
                raise ValueError(f"{who}: {name} must be [{shape[0]}, {shape[1]}] ({what}), got {tuple(b.shape)}")
            if b is not None and not b.is_floating_point():
                raise ValueError(f"{who}: {name} must be a float tensor, got {b.dtype}")
        conv = (lambda b: b) if bias_dtype is None else (lambda b: b.to(bias_dtype))
        self.w13_bias = None if w1_bias is None else _frozen(conv(w1_bias))
        self.w2_bias = None if w2_bias is None else _frozen(conv(w2_bias))

    def _uses_new_activation_keywords(self) -> bool:
        return (self.activation != "silu" or self.gate_up_interleaved or self.w13_bias is not None
                or self.w2_bias is not None)

    def _activation_kwargs(self) -> dict:
        """The third-wave keywords of the fused ops; empty for the default SwiGLU without biases, so
        that the layer also runs on a library built before those keywords existed."""
        if not self._uses_new_activation_keywords():
            return {}
        return dict(activation=self.activation, gate_up_interleaved=self.gate_up_interleaved,
                    swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit,
                    w1_bias=self.w13_bias, w2_bias=self.w2_bias)

    def _activation_repr(self) -> str:
        s = f"activation={self.activation}"
        if self.activation == "swigluoai":
            s += f"(alpha={self.swiglu_alpha:g}, limit={self.swiglu_limit:g})"
        if self.gate_up_interleaved:
            s += ", gate_up_interleaved=True"
        if self.w13_bias is not None or self.w2_bias is not None:
            s += ", bias=True"
        return s

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, "
                f"format={self.weight_format}, {self._activation_repr()}")

    def _reference_kwargs(self) -> dict:
        f32 = (lambda b: None if b is None else b.detach().float())
        return dict(activation=self.activation, gate_up_interleaved=self.gate_up_interleaved,
                    swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit,
                    w1_bias=f32(self.w13_bias), w2_bias=f32(self.w2_bias))

    def _deprecated(self, old: str, new: str):
        warnings.warn(f"{type(self).__name__}.{old} is deprecated (removed in the next release): use .{new}, "
                      f"the registered parameter", DeprecationWarning, stacklevel=3)
        return getattr(self, new)


class _FixedDtypes:
    """For modules whose dtypes are a storage format (fp8/uint8 weights, fp32 scales and biases):
    ``.to(dtype)``, ``.half()``, ``.float()``... leave them as they are, while a device change still
    moves them. The conversion is probed on an empty tensor, so no converted copy of a weight is
    made only to be thrown away."""

    def _apply(self, fn, recurse=True):
        def keep_dtype(t):
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            return fn(t) if probe.dtype == t.dtype else t.to(probe.device)
        return super()._apply(keep_dtype, recurse)


def _check_w13_w2(who: str, w1: Tensor, w2: Tensor, packed: int = 1):
    """w1 [E, 2I, H/packed] and w2 [E, H, I/packed] -> (E, H, I)."""
    sfx = "" if packed == 1 else f"/{packed}"
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0] or w1.shape[1] != 2 * w2.shape[2] * packed \
            or w1.shape[2] * packed != w2.shape[1]:
        raise ValueError(f"{who}: w1 [E, 2I, H{sfx}] and w2 [E, H, I{sfx}] expected, got {tuple(w1.shape)} "
                         f"and {tuple(w2.shape)}")
    return w1.shape[0], w2.shape[1], w2.shape[2] * packed


class TorchExperts(Experts):
    """Plain PyTorch experts (the reference): gated MLPs over moe_sort_tokens' grouping.

    Args:
        w1: [E_local, 2I, H] (rows 0..I-1 gate, I..2I-1 up, vLLM's w13; or interleaved); w2:
            [E_local, H, I]; any float dtype and device.
        activation, gate_up_interleaved, swiglu_alpha, swiglu_limit: the gated activation
            (:func:`gated_activation`).
        w1_bias: optional [E_local, 2I] (w1's row order); w2_bias: optional [E_local, H], added
            before the routing weight.

    Registered: w13_weight, w2_weight, w13_bias, w2_bias (in the dtype given; ``.to(dtype)``
    converts them). Computes in fp32 (float64 for float64 weights), one matmul per local expert;
    eager mode reads the expert offsets on the host (a sync: it is the spec the fused experts are
    tested against, not a fast path). Under torch.compile it runs every local expert on every row
    and keeps each row's own result instead (no host sync, so the graph has no break; E_local times
    the work). e4m3 rows are dequantized with their scales first (the output is then bfloat16).
    """

    weight_format = "torch"

    def __init__(self, w1: Tensor, w2: Tensor, *, activation: str = "silu", gate_up_interleaved: bool = False,
                 swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, w1_bias: Optional[Tensor] = None,
                 w2_bias: Optional[Tensor] = None):
        super().__init__()
        E, H, I = _check_w13_w2("TorchExperts", w1, w2)
        self.w13_weight, self.w2_weight = _frozen(w1), _frozen(w2)
        self._init_common("TorchExperts", E, H, I, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                          w1_bias, w2_bias, None)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("format=torch", f"format=torch {str(self.w13_weight.dtype)[6:]}")

    w1 = property(lambda self: self._deprecated("w1", "w13_weight"))
    w2 = property(lambda self: self._deprecated("w2", "w2_weight"))

    @classmethod
    def from_checkpoint(cls, tensors, prefix: str, *, experts: Optional[Sequence[int]] = None,
                        names=("gate_proj", "up_proj", "down_proj"), dtype: Optional[torch.dtype] = None,
                        activation: Optional[str] = None, gate_up_interleaved: Optional[bool] = None,
                        swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> "TorchExperts":
        """Float experts from a checkpoint's tensors (a state dict, or a safetensors ``safe_open``
        handle), see :mod:`moe_kernels.modular.checkpoint` for the layouts: per-expert
        ``{prefix}{e}.gate_proj.weight`` ... (DeepSeek, Qwen, Mixtral with names=("w1", "w3", "w2")),
        or gpt-oss's fused ``{prefix}gate_up_proj`` [E, H, 2I] (+ ``_bias``) and ``down_proj``
        [E, I, H] (+ ``_bias``), whose activation defaults to gpt-oss's (swigluoai, interleaved).
        experts: the global expert ids to load (expert parallelism), default all; dtype: convert to."""
        w = _ckpt.load_float_experts(tensors, prefix, experts=experts, names=names)
        act = _ckpt.activation_for(w.layout, activation, gate_up_interleaved)
        conv = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
        return cls(conv(w.w1), conv(w.w2), w1_bias=conv(w.w1_bias), w2_bias=conv(w.w2_bias), swiglu_alpha=swiglu_alpha,
                   swiglu_limit=swiglu_limit, **act)

    def _mlp(self, e: int, rows: Tensor, cdt: torch.dtype) -> Tensor:
        h = rows @ self.w13_weight[e].to(cdt).t()
        if self.w13_bias is not None:
            h = h + self.w13_bias[e].to(cdt)
        a = gated_activation(h, self.activation, self.gate_up_interleaved, self.swiglu_alpha, self.swiglu_limit)
        y = a @ self.w2_weight[e].to(cdt).t()
        if self.w2_bias is not None:
            y = y + self.w2_bias[e].to(cdt)
        return y

    def forward(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, expert_map: Optional[Tensor] = None,
                num_local_experts: int = -1, x_scale: Optional[Tensor] = None) -> Tensor:
        out_dtype = x.dtype
        if x.dtype == FP8:
            x, out_dtype = dequantize_rows(x, x_scale, "TorchExperts"), torch.bfloat16
        cdt = torch.promote_types(self.w13_weight.dtype, torch.float32)
        E_local = self.w13_weight.shape[0]
        E = E_local if expert_map is None else expert_map.shape[0]
        T, K = topk_ids.shape
        H = x.shape[1]
        offsets, inv, src = moe_sort_tokens(topk_ids, E, expert_map, E_local if expert_map is not None else -1)
        M = src.shape[0]
        # Rows grouped by expert: row r holds token src[r] // K; unused rows read an appended zero row.
        xz = torch.cat([x.to(cdt), x.new_zeros((1, H), dtype=cdt)])
        rows = xz[torch.where(src >= 0, src // K, T).long()]
        y = rows.new_zeros((M, H))
        if torch.compiler.is_compiling():
            # Without a host sync: the expert of each row from the offsets, every expert on every row.
            row_expert = torch.searchsorted(offsets[1:], torch.arange(M, device=x.device), right=True)
            for e in range(E_local):
                y = torch.where((row_expert == e).unsqueeze(-1), self._mlp(e, rows, cdt), y)
        else:
            bounds = offsets.tolist()
            for e in range(E_local):
                if bounds[e + 1] > bounds[e]:
                    y[bounds[e]:bounds[e + 1]] = self._mlp(e, rows[bounds[e]:bounds[e + 1]], cdt)
        # out[t] = sum_k w[t,k] * y[inv[t,k]]; dropped choices (-1) read an appended zero row.
        yz = torch.cat([y, y.new_zeros((1, H))])
        picked = yz[torch.where(inv >= 0, inv, M).long()]
        return (picked * topk_weights.to(cdt).unsqueeze(-1)).sum(1).to(out_dtype)


class CutlassFp8Experts(_FixedDtypes, Experts):
    """The CUTLASS FP8 experts (:func:`moe_kernels.cutlass_moe_fp8`) as a module.

    Args:
        w1: [E_local, 2I, H] float8_e4m3fn (gate rows, then up rows; or interleaved);
            w2: [E_local, H, I] float8_e4m3fn.
        w1_scale, w2_scale: float32 weight scales (multiplied to dequantize): [E_local] per expert,
            [E_local, 2I] and [E_local, H] per output channel (a trailing 1 allowed), or
            [E_local, 2I/128, H/128] and [E_local, H/128, I/128] per 128x128 block (block-scaled
            checkpoints; the activations are then quantized per 1x128 group).
        a2_scale: optional static [1] scale of the second GEMM's input; None: dynamic per token (per
            1x128 group in block mode, which takes no a2_scale).
        activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias: as
            cutlass_moe_fp8 takes them (third wave); biases are stored in fp32.

    Registered: w13_weight, w2_weight; w13_weight_scale, w2_weight_scale (per expert / channel) or
    w13_weight_scale_inv, w2_weight_scale_inv (128x128 blocks, the checkpoints' name); w2_input_scale
    (a2_scale, if given); w13_bias, w2_bias (if given).

    Activations are quantized per token (per 1x128 group in block mode) with dynamic scales. They
    may arrive quantized from the dispatch (AllToAll(dispatch_dtype=torch.float8_e4m3fn), with
    ``quant_group_size=128`` in block mode): e4m3 x with x_scale [T] (per token) or [T, H/128] (per
    group). Float x ([T, H] bfloat16 or float16) is quantized the same way inside cutlass_moe_fp8,
    so both give the same bytes. Output: [T, H] bfloat16 (x's dtype for float16 x).
    """

    def __init__(self, w1: Tensor, w2: Tensor, w1_scale: Tensor, w2_scale: Tensor, a2_scale: Optional[Tensor] = None,
                 *, activation: str = "silu", gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702,
                 swiglu_limit: float = 7.0, w1_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None):
        super().__init__()
        who = "CutlassFp8Experts"
        E, H, I = _check_w13_w2(who, w1, w2)
        if w1.dtype != FP8 or w2.dtype != FP8:
            raise ValueError(f"{who}: w1 and w2 must be float8_e4m3fn, got {w1.dtype} and {w2.dtype}")
        self.block = w1_scale.dim() == 3
        if self.block:
            self.per_out_ch = False
        elif w1_scale.numel() == E and w2_scale.numel() == E:
            self.per_out_ch = False
        elif w1_scale.numel() == E * w1.shape[1] and w2_scale.numel() == E * w2.shape[1]:
            self.per_out_ch = True
        else:
            raise ValueError(f"{who}: w1_scale and w2_scale must be [E], [E, 2I] and [E, H], or "
                             f"3-D block scales; got {tuple(w1_scale.shape)} and {tuple(w2_scale.shape)} for "
                             f"w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}")
        if self.block and a2_scale is not None:
            raise ValueError(f"{who}: a2_scale must be None with block scales (the second GEMM's "
                             "input is quantized per 1x128 group)")
        self.w13_weight, self.w2_weight = _frozen(w1), _frozen(w2)
        sfx = "_inv" if self.block else ""
        self.register_parameter("w13_weight_scale" + sfx, _frozen(w1_scale))
        self.register_parameter("w2_weight_scale" + sfx, _frozen(w2_scale))
        self.w2_input_scale = None if a2_scale is None else _frozen(a2_scale)
        self.quant_group_size = 128 if self.block else None
        self.weight_format = ("fp8 block 128x128" if self.block else
                              "fp8 per-channel" if self.per_out_ch else "fp8 per-expert")
        self._init_common(who, E, H, I, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                          w1_bias, w2_bias, torch.float32)

    @property
    def w13_scale(self) -> Tensor:
        """w1's weight scales, whichever name they are registered under."""
        return self.w13_weight_scale_inv if self.block else self.w13_weight_scale

    @property
    def w2_scale(self) -> Tensor:
        return self.w2_weight_scale_inv if self.block else self.w2_weight_scale

    w1 = property(lambda self: self._deprecated("w1", "w13_weight"))
    w2 = property(lambda self: self._deprecated("w2", "w2_weight"))
    w1_scale = property(lambda self: self._deprecated("w1_scale", "w13_scale"))
    a2_scale = property(lambda self: self._deprecated("a2_scale", "w2_input_scale"))

    @classmethod
    def from_checkpoint(cls, tensors, prefix: str, *, experts: Optional[Sequence[int]] = None,
                        names=("gate_proj", "up_proj", "down_proj"), activation: str = "silu",
                        gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702,
                        swiglu_limit: float = 7.0, static_input_scale: bool = False,
                        interleave: bool = False) -> "CutlassFp8Experts":
        """FP8 experts from per-expert checkpoint tensors ``{prefix}{e}.gate_proj.weight`` (e4m3
        [I, H]) with ``.weight_scale_inv`` [I/128, H/128] (block-scaled: DeepSeek-V3/R1, Qwen3-FP8,
        Kimi-K2) or ``.weight_scale`` (per channel [N] / [N, 1], or per tensor, which is broadcast
        to per channel: exact), the same for up_proj and down_proj. Activations are quantized
        dynamically per token (per 1x128 group in block mode), except with ``static_input_scale``:
        the second GEMM's input then takes the static scale a2_scale = the maximum of the experts'
        ``down_proj.input_scale`` (vLLM's choice for static FP8 checkpoints; not in block mode).
        ``interleave``: w13's gate and up rows (and their per-channel scales) are interleaved at load
        (:func:`moe_kernels.interleave_gate_up`; the registered w13_weight is then in that order),
        which with ``static_input_scale`` lets cutlass_moe_fp8 run GEMM1 with the activation in its
        epilogue (docs/ops.md); not for block scales or a checkpoint already interleaved.
        See :mod:`moe_kernels.modular.checkpoint`."""
        who = "CutlassFp8Experts.from_checkpoint"
        w = _ckpt.load_fp8_experts(tensors, prefix, experts=experts, names=names)
        a2 = _ckpt.load_fp8_down_input_scale(tensors, prefix, experts=experts, names=names) if static_input_scale else None
        w1, s1 = w.w1, w.w1_scale
        if interleave:
            if gate_up_interleaved:
                raise ValueError(f"{who}: interleave=True with gate_up_interleaved=True: the checkpoint's gate and up "
                                 "rows are interleaved already")
            if s1.dim() == 3:
                raise ValueError(f"{who}: interleave=True needs per-channel or per-tensor weight scales, not 128x128 "
                                 "blocks (a block holds 128 gate or 128 up rows)")
            w1, s1, gate_up_interleaved = interleave_gate_up(w1), interleave_gate_up(s1), True
        return cls(w1, w.w2, s1, w.w2_scale, a2, activation=activation, gate_up_interleaved=gate_up_interleaved,
                   swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)

    def reference(self) -> TorchExperts:
        """TorchExperts with the dequantized fp32 weights (activations not quantized)."""
        w1 = _ckpt.dequantize_fp8(self.w13_weight.detach(), self.w13_scale.detach(), self.block)
        w2 = _ckpt.dequantize_fp8(self.w2_weight.detach(), self.w2_scale.detach(), self.block)
        return TorchExperts(w1, w2, **self._reference_kwargs())

    def _check_scale(self, x: Tensor, x_scale: Optional[Tensor]) -> Tensor:
        T, H = x.shape
        if x_scale is None:
            raise ValueError("CutlassFp8Experts: float8_e4m3fn x needs x_scale")
        if self.block:
            if x_scale.dim() != 2 or tuple(x_scale.shape) != (T, H // 128):
                raise ValueError(f"CutlassFp8Experts: block-scaled experts need per-group x_scale [T, H/128] = "
                                 f"[{T}, {H // 128}] (dispatch with quant_group_size=128), got "
                                 f"{tuple(x_scale.shape)}")
            return x_scale
        if x_scale.numel() != T or (x_scale.dim() == 2 and x_scale.shape[1] != 1) or x_scale.dim() > 2:
            raise ValueError(f"CutlassFp8Experts: x_scale must be per token, [T] or [T, 1] with T={T} (dispatch "
                             f"without quant_group_size), got {tuple(x_scale.shape)}")
        return x_scale.reshape(-1)

    def forward(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, expert_map: Optional[Tensor] = None,
                num_local_experts: int = -1, x_scale: Optional[Tensor] = None) -> Tensor:
        a1_scale = self._check_scale(x, x_scale) if x.dtype == FP8 else None
        return cutlass_moe_fp8(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.w13_scale,
                               self.w2_scale,
                               # Dynamic per-token scales (per-group ones in block mode, where the
                               # group size implies them): with expert_map, a per-tensor scale would
                               # span rows that no local expert computes.
                               a1_scale=a1_scale, a2_scale=self.w2_input_scale, per_act_token=not self.block,
                               per_out_ch=self.per_out_ch, expert_map=expert_map, **self._activation_kwargs())


def _fourbit_op(name: str):
    """The 4-bit layer ops are added by the fp4 work; looked up at call time so that this package
    imports (and the modules build, save and load) on a library without them."""
    import moe_kernels
    fn = getattr(moe_kernels, name, None)
    if fn is None and hasattr(torch.ops.moe_kernels, name):
        fn = getattr(torch.ops.moe_kernels, name)
    if fn is None:
        raise NotImplementedError(f"moe_kernels.{name} is not in this build of moe_kernels (the 4-bit experts "
                                  f"need a library with the MXFP4 / W4A8 ops)")
    return fn


def _bf16_rows(x: Tensor, x_scale: Optional[Tensor], who: str):
    """-> (bf16 rows, output dtype). The 4-bit ops take bfloat16 rows and quantize (or not) them
    themselves: e4m3 rows from the dispatch are dequantized to bfloat16 first (one more rounding;
    dispatch in bf16 to avoid it) and give bfloat16; fp16/fp32 rows are computed in bfloat16 and
    returned in their dtype."""
    if x.dtype == FP8:
        return dequantize_rows(x, x_scale, who).to(torch.bfloat16), torch.bfloat16
    return x.to(torch.bfloat16), x.dtype


class CutlassMxfp4Experts(_FixedDtypes, Experts):
    """MXFP4 experts (:func:`moe_kernels.cutlass_moe_mxfp4`; gpt-oss, DeepSeek-V4 checkpoints).

    Args:
        w1: uint8 [E_local, 2I, H/2] (or the checkpoint's [E_local, 2I, H/32, 16]): two E2M1 values
            per byte, the low nibble the even element; w2: uint8 [E_local, H, I/2] (or [.., I/32, 16]).
        w1_scale: uint8 E8M0 [E_local, 2I, H/32]; w2_scale: uint8 [E_local, H, I/32];
            value = e2m1 * 2^(scale - 127).
        activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias: the gated
            activation and biases (fp32); gpt-oss: swigluoai, interleaved, with biases.
        a_dtype: torch.bfloat16 (W4A16) or torch.float8_e4m3fn (W4A8: activations quantized per token).

    Registered (vLLM's Mxfp4 names): w13_weight, w2_weight, w13_weight_scale, w2_weight_scale,
    w13_bias, w2_bias. The op takes bfloat16 rows: e4m3 input from the dispatch is dequantized to
    bfloat16 first (output bfloat16); fp16/fp32 input is computed in bfloat16 and returned in its dtype.
    """

    def __init__(self, w1: Tensor, w2: Tensor, w1_scale: Tensor, w2_scale: Tensor, *, activation: str = "silu",
                 gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                 w1_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
                 a_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        who = "CutlassMxfp4Experts"
        w1, w2 = _ckpt.flatten_mxfp4_blocks(w1), _ckpt.flatten_mxfp4_blocks(w2)
        E, H, I = _check_w13_w2(who, w1, w2, packed=2)
        for name, t, shape in (("w1", w1, None), ("w2", w2, None), ("w1_scale", w1_scale, (E, 2 * I, H // 32)),
                               ("w2_scale", w2_scale, (E, H, I // 32))):
            if t.dtype != torch.uint8:
                raise ValueError(f"{who}: {name} must be uint8, got {t.dtype}")
            if shape is not None and tuple(t.shape) != shape:
                raise ValueError(f"{who}: {name} must be {list(shape)} ([E, N, K/32] E8M0), got {tuple(t.shape)}")
        if H % 32 or I % 32:
            raise ValueError(f"{who}: H and I must be multiples of 32 (one E8M0 scale per 32 values), got H={H}, I={I}")
        if a_dtype not in (torch.bfloat16, FP8):
            raise ValueError(f"{who}: a_dtype must be torch.bfloat16 or torch.float8_e4m3fn, got {a_dtype}")
        self.a_dtype = a_dtype
        self.w13_weight, self.w2_weight = _frozen(w1), _frozen(w2)
        self.w13_weight_scale, self.w2_weight_scale = _frozen(w1_scale), _frozen(w2_scale)
        self.weight_format = "mxfp4 (W4A16)" if a_dtype == torch.bfloat16 else "mxfp4 (W4A8)"
        self._init_common(who, E, H, I, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                          w1_bias, w2_bias, torch.float32)

    @classmethod
    def from_checkpoint(cls, tensors, prefix: str, *, experts: Optional[Sequence[int]] = None,
                        activation: Optional[str] = None, gate_up_interleaved: Optional[bool] = None,
                        swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                        a_dtype: torch.dtype = torch.bfloat16) -> "CutlassMxfp4Experts":
        """From a gpt-oss MXFP4 checkpoint: ``{prefix}gate_up_proj_blocks`` [E, 2I, H/32, 16],
        ``_scales`` [E, 2I, H/32], ``gate_up_proj_bias`` [E, 2I], ``down_proj_blocks`` [E, H, I/32, 16],
        ``_scales``, ``down_proj_bias`` [E, H], as transformers' integrations/mxfp4.py reads them (rows
        as stored: no transpose). The activation defaults to gpt-oss's (swigluoai, interleaved)."""
        w = _ckpt.load_mxfp4_experts(tensors, prefix, experts=experts)
        act = _ckpt.activation_for("gpt_oss", activation, gate_up_interleaved)
        return cls(w.w1, w.w2, w.w1_scale, w.w2_scale, w1_bias=w.w1_bias, w2_bias=w.w2_bias, swiglu_alpha=swiglu_alpha,
                   swiglu_limit=swiglu_limit, a_dtype=a_dtype, **act)

    def reference(self) -> TorchExperts:
        """TorchExperts with the dequantized fp32 weights (activations not quantized)."""
        w1 = _ckpt.dequantize_mxfp4(self.w13_weight.detach(), self.w13_weight_scale.detach())
        w2 = _ckpt.dequantize_mxfp4(self.w2_weight.detach(), self.w2_weight_scale.detach())
        return TorchExperts(w1, w2, **self._reference_kwargs())

    def forward(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, expert_map: Optional[Tensor] = None,
                num_local_experts: int = -1, x_scale: Optional[Tensor] = None) -> Tensor:
        x, out_dtype = _bf16_rows(x, x_scale, "CutlassMxfp4Experts")
        op = _fourbit_op("cutlass_moe_mxfp4")
        return op(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.w13_weight_scale,
                  self.w2_weight_scale, activation=self.activation, gate_up_interleaved=self.gate_up_interleaved,
                  swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit, w1_bias=self.w13_bias,
                  w2_bias=self.w2_bias, a_dtype=self.a_dtype, expert_map=expert_map,
                  num_local_experts=-1 if expert_map is None else self.num_experts).to(out_dtype)


class CutlassW4A8Experts(_FixedDtypes, Experts):
    """INT4 x FP8 experts (:func:`moe_kernels.cutlass_moe_w4a8`; DeepSeek-R1 W4AFP8).

    Args:
        w1: [E_local, 2I, H/2] int8 or uint8, signed int4 two per byte, the low nibble the even
            element; w2: [E_local, H, I/2].
        w1_scale: float32 [E_local, 2I, H/128] (one per 1x128 group along K, multiplied to
            dequantize); w2_scale: float32 [E_local, H, I/128].
        a1_scale, a2_scale: optional static float32 [1] activation scales of GEMM1's and GEMM2's
            inputs; None: dynamic per token.
        activation, gate_up_interleaved, swiglu_alpha, swiglu_limit, w1_bias, w2_bias: as above.

    Registered (SGLang's W4AFp8 names): w13_weight, w2_weight, w13_weight_scale_inv,
    w2_weight_scale_inv, w13_input_scale, w2_input_scale (if given), w13_bias, w2_bias.
    Input dtypes as CutlassMxfp4Experts (the op takes bfloat16 rows).
    """

    weight_format = "int4 x fp8 (W4A8)"

    def __init__(self, w1: Tensor, w2: Tensor, w1_scale: Tensor, w2_scale: Tensor, a1_scale: Optional[Tensor] = None,
                 a2_scale: Optional[Tensor] = None, *, activation: str = "silu", gate_up_interleaved: bool = False,
                 swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, w1_bias: Optional[Tensor] = None,
                 w2_bias: Optional[Tensor] = None):
        super().__init__()
        who = "CutlassW4A8Experts"
        E, H, I = _check_w13_w2(who, w1, w2, packed=2)
        if w1.dtype not in (torch.int8, torch.uint8) or w2.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"{who}: w1 and w2 must be int8 or uint8 (two int4 per byte), got {w1.dtype} and "
                             f"{w2.dtype}")
        if H % 128 or I % 128:
            raise ValueError(f"{who}: H and I must be multiples of 128 (one scale per 1x128 group), got H={H}, I={I}")
        for name, t, shape in (("w1_scale", w1_scale, (E, 2 * I, H // 128)), ("w2_scale", w2_scale, (E, H, I // 128))):
            if t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ValueError(f"{who}: {name} must be float32 {list(shape)} ([E, N, K/128]), got {t.dtype} "
                                 f"{tuple(t.shape)}")
        for name, t in (("a1_scale", a1_scale), ("a2_scale", a2_scale)):
            if t is not None and (t.numel() != 1 or t.dtype != torch.float32):
                raise ValueError(f"{who}: {name} must be None or float32 [1], got {t.dtype} {tuple(t.shape)}")
        self.w13_weight, self.w2_weight = _frozen(w1), _frozen(w2)
        self.w13_weight_scale_inv, self.w2_weight_scale_inv = _frozen(w1_scale), _frozen(w2_scale)
        self.w13_input_scale = None if a1_scale is None else _frozen(a1_scale.reshape(1))
        self.w2_input_scale = None if a2_scale is None else _frozen(a2_scale.reshape(1))
        self._init_common(who, E, H, I, activation, gate_up_interleaved, swiglu_alpha, swiglu_limit,
                          w1_bias, w2_bias, torch.float32)

    @classmethod
    def from_checkpoint(cls, tensors, prefix: str, *, experts: Optional[Sequence[int]] = None,
                        names=("gate_proj", "up_proj", "down_proj"), static_input_scales: bool = True,
                        activation: str = "silu", gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702,
                        swiglu_limit: float = 7.0) -> "CutlassW4A8Experts":
        """From W4AFP8 per-expert tensors (DeepSeek-R1 W4AFP8): ``{prefix}{e}.gate_proj.weight`` int8
        [I, H/2], ``.weight_scale_inv`` [I, H/128], optional ``.input_scale``; up_proj, down_proj.
        The input scales become the static a1_scale / a2_scale (their maximum over the experts, as
        SGLang takes them); static_input_scales=False ignores them (dynamic per-token scales)."""
        w, a1, a2 = _ckpt.load_w4a8_experts(tensors, prefix, experts=experts, names=names)
        if not static_input_scales:
            a1 = a2 = None
        return cls(w.w1, w.w2, w.w1_scale, w.w2_scale, a1, a2, activation=activation,
                   gate_up_interleaved=gate_up_interleaved, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)

    def extra_repr(self) -> str:
        static = "static" if self.w13_input_scale is not None else "dynamic"
        return super().extra_repr() + f", a1={static}"

    def reference(self) -> TorchExperts:
        """TorchExperts with the dequantized fp32 weights (activations not quantized)."""
        w1 = _ckpt.dequantize_int4(self.w13_weight.detach(), self.w13_weight_scale_inv.detach())
        w2 = _ckpt.dequantize_int4(self.w2_weight.detach(), self.w2_weight_scale_inv.detach())
        return TorchExperts(w1, w2, **self._reference_kwargs())

    def forward(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, expert_map: Optional[Tensor] = None,
                num_local_experts: int = -1, x_scale: Optional[Tensor] = None) -> Tensor:
        x, out_dtype = _bf16_rows(x, x_scale, "CutlassW4A8Experts")
        op = _fourbit_op("cutlass_moe_w4a8")
        # int8 (SGLang's dtype) or uint8 bytes: the op reads bytes; a view is free.
        return op(x, self.w13_weight.view(torch.uint8), self.w2_weight.view(torch.uint8), topk_weights, topk_ids,
                  self.w13_weight_scale_inv, self.w2_weight_scale_inv, self.w13_input_scale, self.w2_input_scale,
                  activation=self.activation,
                  gate_up_interleaved=self.gate_up_interleaved, swiglu_alpha=self.swiglu_alpha,
                  swiglu_limit=self.swiglu_limit, w1_bias=self.w13_bias, w2_bias=self.w2_bias,
                  expert_map=expert_map, num_local_experts=-1 if expert_map is None else self.num_experts).to(out_dtype)
