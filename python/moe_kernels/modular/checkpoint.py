"""Building the modular layer from a checkpoint's tensors, as they are stored (no transposing or
re-quantizing by the user).

``tensors`` is a state dict (any mapping name -> tensor) or a safetensors ``safe_open`` handle
(only this layer's tensors are read). ``prefix`` is the module path of the experts (or the router)
in the checkpoint, e.g. ``"model.layers.3.mlp.experts."`` (a missing trailing dot is added).

=======================  ==============================================  ===========================
checkpoint               tensors under ``prefix``                         build with
=======================  ==============================================  ===========================
bf16, per expert         ``{e}.gate_proj.weight`` [I, H], ``up_proj``,    ``TorchExperts.from_checkpoint``
(DeepSeek, Qwen3;        ``down_proj.weight`` [H, I] (``names=("w1",
Mixtral: w1, w3, w2)     "w3", "w2")`` for Mixtral's names)
FP8 128x128 blocks       ``{e}.gate_proj.weight`` e4m3 [I, H] +           ``CutlassFp8Experts.from_checkpoint``
(DeepSeek-V3/R1,         ``.weight_scale_inv`` [I/128, H/128], up, down
Qwen3-FP8, Kimi-K2)
FP8 per channel /        ``.weight`` e4m3 + ``.weight_scale`` [N, 1] /    ``CutlassFp8Experts.from_checkpoint``
per tensor               [N] / [] or [1] (per tensor: broadcast to per
                         channel, exact), optional ``down_proj.
                         input_scale`` (static_input_scale=True: max
                         over experts)
W4AFP8 (DeepSeek-R1)     ``{e}.gate_proj.weight`` int8 [I, H/2] +          ``CutlassW4A8Experts.from_checkpoint``
                         ``.weight_scale_inv`` [I, H/128], optional
                         ``.input_scale`` (max over experts), up, down
gpt-oss (bf16)           ``gate_up_proj`` [E, H, 2I] (gate, up            ``TorchExperts.from_checkpoint``
                         interleaved), ``gate_up_proj_bias`` [E, 2I],
                         ``down_proj`` [E, I, H], ``down_proj_bias``
                         [E, H]: transposed to w13 [E, 2I, H], w2
                         [E, H, I]
gpt-oss (MXFP4)          ``gate_up_proj_blocks`` [E, 2I, H/32, 16],       ``CutlassMxfp4Experts.from_checkpoint``
                         ``gate_up_proj_scales`` [E, 2I, H/32],
                         ``down_proj_blocks`` [E, H, I/32, 16],
                         ``down_proj_scales``, the two biases
router                   ``weight`` [E, H], optional ``bias`` [E]         ``FusedGateRouter.from_checkpoint``
                         (gpt-oss), ``e_score_correction_bias`` [E]
                         (DeepSeek-V3)
=======================  ==============================================  ===========================

Per-expert tensors are stacked into w13 = [gate; up] (gate rows first) and w2. Checkpoint input
scales (static activation scales) are read for FP8 only when asked (``static_input_scale=True``:
the second GEMM's input takes the maximum of the experts' ``down_proj.input_scale``, as vLLM does;
otherwise activations are quantized dynamically); W4AFP8 uses them, as SGLang does. For the
fused (gpt-oss) layouts, the activation defaults to gpt-oss's: swigluoai, gate and up interleaved,
alpha 1.702, limit 7.0 (pass ``activation="silu", gate_up_interleaved=False`` for a fused
checkpoint without them, e.g. Llama 4's).

``experts=range(a, b)`` loads only those global experts (one rank's share with expert parallelism).

Example (DeepSeek-V3, layer 3)::

    from safetensors import safe_open
    from moe_kernels.modular import CutlassFp8Experts, FusedGateRouter, MoELayer, SingleGpu
    with safe_open("model-00002-of-000163.safetensors", "pt") as f:   # or a merged state dict
        router = FusedGateRouter.from_checkpoint(f, "model.layers.3.mlp.gate.", topk=8, num_expert_group=8,
                                                 topk_group=4, scoring_func="sigmoid", routed_scaling_factor=2.5,
                                                 apply_routed_scaling_factor_on_output=True)
        experts = CutlassFp8Experts.from_checkpoint(f, "model.layers.3.mlp.experts.")
    layer = MoELayer(router, SingleGpu(256), experts).cuda()
    out = layer(hidden_states)           # the router's gate computes the logits
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn

#: E2M1 code -> value (low 3 bits magnitude, bit 3 sign), the table of transformers' integrations/mxfp4.py.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class _Source:
    """Reads tensors by name from a mapping or a safetensors handle."""

    def __init__(self, tensors):
        self._get = tensors.get_tensor if hasattr(tensors, "get_tensor") else tensors.__getitem__
        self.keys = set(tensors.keys())

    def has(self, key: str) -> bool:
        return key in self.keys

    def get(self, key: str, who: str) -> Tensor:
        if key not in self.keys:
            near = sorted(k for k in self.keys if k.startswith(key.rsplit(".", 1)[0]))[:8]
            raise KeyError(f"{who}: checkpoint has no tensor {key!r} (names under that path: {near})")
        return self._get(key)


def _norm_prefix(prefix: str) -> str:
    return prefix if prefix == "" or prefix.endswith(".") else prefix + "."


def activation_for(layout: str, activation: Optional[str], gate_up_interleaved: Optional[bool]) -> dict:
    """The activation keywords: the caller's, else the layout's default (gpt-oss: swigluoai, interleaved)."""
    gpt_oss = layout == "gpt_oss"
    return dict(activation=activation if activation is not None else ("swigluoai" if gpt_oss else "silu"),
                gate_up_interleaved=gate_up_interleaved if gate_up_interleaved is not None else gpt_oss)


def _expert_ids(src: _Source, prefix: str, first_name: str, experts: Optional[Sequence[int]], who: str):
    if experts is not None:
        return list(experts)
    ids = []
    while src.has(f"{prefix}{len(ids)}.{first_name}.weight"):
        ids.append(len(ids))
    if not ids:
        raise KeyError(f"{who}: no per-expert tensors {prefix}0.{first_name}.weight ... in the checkpoint, and no "
                       f"fused {prefix}gate_up_proj (gpt-oss)")
    return ids


@dataclass
class ExpertTensors:
    """What the loaders return: the constructor's arguments."""

    layout: str                     # "per_expert" or "gpt_oss"
    w1: Tensor
    w2: Tensor
    w1_scale: Optional[Tensor] = None
    w2_scale: Optional[Tensor] = None
    w1_bias: Optional[Tensor] = None
    w2_bias: Optional[Tensor] = None


def _stack(src, prefix, ids, names, suffix, who):
    """[gate; up] per expert stacked -> [E, 2N, ...], and down -> [E, ...]."""
    gate, up, down = names
    w1 = torch.stack([torch.cat([src.get(f"{prefix}{e}.{gate}.{suffix}", who),
                                 src.get(f"{prefix}{e}.{up}.{suffix}", who)]) for e in ids])
    w2 = torch.stack([src.get(f"{prefix}{e}.{down}.{suffix}", who) for e in ids])
    return w1, w2


def _select(t: Optional[Tensor], experts) -> Optional[Tensor]:
    if t is None or experts is None:
        return t
    return t[torch.as_tensor(list(experts), dtype=torch.long, device=t.device)]


def load_float_experts(tensors, prefix: str, *, experts=None,
                       names=("gate_proj", "up_proj", "down_proj")) -> ExpertTensors:
    """Float (e.g. bf16) experts, per expert or gpt-oss's fused layout."""
    who, src, prefix = "TorchExperts.from_checkpoint", _Source(tensors), _norm_prefix(prefix)
    if src.has(f"{prefix}gate_up_proj"):
        # gpt-oss stores x @ W ([E, H, 2I], [E, I, H]); ours are W x: transpose once here.
        w1 = _select(src.get(f"{prefix}gate_up_proj", who), experts).transpose(1, 2).contiguous()
        w2 = _select(src.get(f"{prefix}down_proj", who), experts).transpose(1, 2).contiguous()
        opt = (lambda n: _select(src.get(prefix + n, who), experts) if src.has(prefix + n) else None)
        b1, b2 = opt("gate_up_proj_bias"), opt("down_proj_bias")
        return ExpertTensors("gpt_oss", w1, w2, w1_bias=b1, w2_bias=b2)
    if src.has(f"{prefix}gate_up_proj_blocks"):
        raise ValueError(f"{who}: {prefix} holds MXFP4 blocks: use CutlassMxfp4Experts.from_checkpoint (and its "
                         f".reference() for a float TorchExperts)")
    ids = _expert_ids(src, prefix, names[0], experts, who)
    w1, w2 = _stack(src, prefix, ids, names, "weight", who)
    return ExpertTensors("per_expert", w1, w2)


def _max_input_scale(src: _Source, prefix: str, ids, projs, who: str) -> Tensor:
    """The largest of the experts' static input scales of these projections, [1] fp32: one scale
    serves the whole grouped GEMM, and the largest one clips no expert's activations."""
    return torch.stack([src.get(f"{prefix}{e}.{n}.input_scale", who).float().reshape(())
                        for e in ids for n in projs]).max().reshape(1)


def load_fp8_down_input_scale(tensors, prefix: str, *, experts=None,
                              names=("gate_proj", "up_proj", "down_proj")) -> Tensor:
    """The static scale of the FP8 layer's second GEMM input: the maximum of the experts'
    ``{e}.down_proj.input_scale`` (a KeyError naming the first missing tensor)."""
    who, src, prefix = "CutlassFp8Experts.from_checkpoint", _Source(tensors), _norm_prefix(prefix)
    ids = _expert_ids(src, prefix, names[0], experts, who)
    return _max_input_scale(src, prefix, ids, (names[2],), who)


def load_fp8_experts(tensors, prefix: str, *, experts=None,
                     names=("gate_proj", "up_proj", "down_proj")) -> ExpertTensors:
    """e4m3 per-expert weights with block (``weight_scale_inv``) or per-channel / per-tensor
    (``weight_scale``) scales -> w1, w2 and fp32 scales in CutlassFp8Experts' layout."""
    who, src, prefix = "CutlassFp8Experts.from_checkpoint", _Source(tensors), _norm_prefix(prefix)
    ids = _expert_ids(src, prefix, names[0], experts, who)
    gate, up, down = names
    w1, w2 = _stack(src, prefix, ids, names, "weight", who)
    if w1.dtype != FP8:
        raise ValueError(f"{who}: {prefix}{ids[0]}.{gate}.weight is {w1.dtype}, not float8_e4m3fn")
    if src.has(f"{prefix}{ids[0]}.{gate}.weight_scale_inv"):
        I = w1.shape[1] // 2
        if I % 128:
            raise ValueError(f"{who}: block-scaled gate/up need I % 128 == 0 to stack their scale blocks, got I={I}")
        s1, s2 = _stack(src, prefix, ids, names, "weight_scale_inv", who)
        return ExpertTensors("per_expert", w1, w2, s1.float(), s2.float())

    def channel(name, e, rows):
        s = src.get(f"{prefix}{e}.{name}.weight_scale", who).float().reshape(-1)
        if s.numel() == 1:
            return s.expand(rows)  # per tensor: the same scale on every row of that projection
        if s.numel() != rows:
            raise ValueError(f"{who}: {prefix}{e}.{name}.weight_scale must hold 1 or {rows} values, got {s.numel()}")
        return s

    I, H = w1.shape[1] // 2, w2.shape[1]
    s1 = torch.stack([torch.cat([channel(gate, e, I), channel(up, e, I)]) for e in ids])
    s2 = torch.stack([channel(down, e, H) for e in ids]).contiguous()
    return ExpertTensors("per_expert", w1, w2, s1.contiguous(), s2)


def load_w4a8_experts(tensors, prefix: str, *, experts=None, names=("gate_proj", "up_proj", "down_proj")):
    """W4AFP8 per-expert tensors (DeepSeek-R1 W4AFP8, as SGLang's W4AFp8 method loads them):
    ``.weight`` int8 [N, K/2] (two int4 a byte), ``.weight_scale_inv`` [N, K/128], optional
    ``.input_scale`` (static per-tensor activation scales: the maximum over the experts is taken, as
    SGLang does, since one scale serves the whole grouped GEMM) -> (ExpertTensors, a1_scale, a2_scale)."""
    who, src, prefix = "CutlassW4A8Experts.from_checkpoint", _Source(tensors), _norm_prefix(prefix)
    ids = _expert_ids(src, prefix, names[0], experts, who)
    gate, up, down = names
    w1, w2 = _stack(src, prefix, ids, names, "weight", who)
    if w1.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"{who}: {prefix}{ids[0]}.{gate}.weight is {w1.dtype}, not int8/uint8 packed int4")
    s1, s2 = _stack(src, prefix, ids, names, "weight_scale_inv", who)
    a1 = a2 = None
    if src.has(f"{prefix}{ids[0]}.{gate}.input_scale"):
        a1, a2 = _max_input_scale(src, prefix, ids, (gate, up), who), _max_input_scale(src, prefix, ids, (down,), who)
    return ExpertTensors("per_expert", w1, w2, s1.float().contiguous(), s2.float().contiguous()), a1, a2


def flatten_mxfp4_blocks(w: Tensor) -> Tensor:
    """[E, N, K/32, 16] (the checkpoint's blocks) -> [E, N, K/2]; 3-D tensors pass through."""
    return w.reshape(w.shape[0], w.shape[1], -1) if w.dim() == 4 else w


def load_mxfp4_experts(tensors, prefix: str, *, experts=None) -> ExpertTensors:
    """gpt-oss's MXFP4 experts: blocks and E8M0 scales as stored (rows = output features, gate and
    up interleaved), biases in fp32."""
    who, src, prefix = "CutlassMxfp4Experts.from_checkpoint", _Source(tensors), _norm_prefix(prefix)

    def get(name):
        return _select(src.get(f"{prefix}{name}", who), experts)

    def opt(name):
        return get(name).float() if src.has(f"{prefix}{name}") else None

    return ExpertTensors("gpt_oss", flatten_mxfp4_blocks(get("gate_up_proj_blocks")).contiguous(),
                         flatten_mxfp4_blocks(get("down_proj_blocks")).contiguous(),
                         get("gate_up_proj_scales").contiguous(), get("down_proj_scales").contiguous(),
                         opt("gate_up_proj_bias"), opt("down_proj_bias"))


# ------------------------------------------------------------------ dequantization (references)

def dequantize_fp8(w: Tensor, scale: Tensor, block: bool) -> Tensor:
    """e4m3 [E, N, K] times its scales -> fp32: [E] per expert, [E, N] / [E, N, 1] per channel, or
    (block) [E, N/128, K/128] per 128x128 block."""
    E, N, K = w.shape
    w = w.float()
    s = scale.float()
    if block:
        s = s.repeat_interleave(128, 1)[:, :N].repeat_interleave(128, 2)[:, :, :K]
        return w * s
    if s.numel() == E:
        return w * s.reshape(E, 1, 1)
    return w * s.reshape(E, N, 1)


def dequantize_mxfp4(w: Tensor, scale: Tensor) -> Tensor:
    """uint8 [E, N, K/2] (low nibble the even element) with E8M0 scales [E, N, K/32] -> fp32 [E, N, K]."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=w.device)
    b = w.to(torch.int64)
    vals = torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).flatten(-2)
    return vals * torch.exp2(scale.float() - 127).repeat_interleave(32, dim=-1)


def dequantize_int4(w: Tensor, scale: Tensor) -> Tensor:
    """signed int4 [E, N, K/2] (int8 or uint8 bytes, low nibble the even element) with fp32 scales
    [E, N, K/128] -> fp32 [E, N, K]."""
    b = w.view(torch.uint8).to(torch.int64)
    nib = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)
    vals = (nib - 16 * (nib >= 8)).float()
    return vals * scale.float().repeat_interleave(128, dim=-1)
