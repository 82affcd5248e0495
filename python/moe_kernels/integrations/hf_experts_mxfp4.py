"""gpt-oss MXFP4 checkpoints in HF transformers through cutlass_moe_mxfp4 (ExpertsInterface
"moe_kernels_mxfp4").

transformers runs gpt-oss's MXFP4 experts with its own Triton kernels (from the `kernels` hub) on
recent GPUs and otherwise dequantizes them to bf16 at load (on the CPU, without Triton or the
`kernels` package, or with ``Mxfp4Config(dequantize=True)``): the 4-bit blocks are gone from the
loaded model. So the blocks are read again from the checkpoint's safetensors files, as stored
(``*_blocks`` [E, 2I, H/32, 16] uint8, two E2M1 values a byte, low nibble first; ``*_scales``
[E, 2I, H/32] uint8 E8M0), which is exactly cutlass_moe_mxfp4's weight format::

    from transformers import AutoModelForCausalLM, Mxfp4Config
    from moe_kernels.integrations.transformers import use_mxfp4_experts
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True))
    use_mxfp4_experts(model, path)       # the one call: 4-bit experts, "moe_kernels_mxfp4"

The biases, the router and everything else stay as transformers loaded them; the gate is the
module's (gpt-oss's swigluoai on interleaved rows, recognized as for "moe_kernels_fp8").
"""

import json
import os
from typing import Dict, List, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .hf_experts import ExpertsLayout, routing_space
from .hf_experts_fp8 import fp32_biases, gate_spec

_MXFP4_ATTR = "_moe_kernels_mxfp4"
IMPLEMENTATION = "moe_kernels_mxfp4"


class Mxfp4Weights(NamedTuple):
    """One experts module's MXFP4 tensors in cutlass_moe_mxfp4's layout."""

    w1: Tensor        # [E, 2I, H/2] uint8
    w1_scale: Tensor  # [E, 2I, H/32] uint8 E8M0
    w2: Tensor        # [E, H, I/2] uint8
    w2_scale: Tensor  # [E, H, I/32] uint8 E8M0
    a_dtype: torch.dtype


class CheckpointTensors:
    """The tensors of a safetensors checkpoint (a directory with model.safetensors or an index of
    shards, or one file), read lazily by name: only the experts' blocks and scales are loaded."""

    def __init__(self, path: Union[str, os.PathLike]):
        from safetensors import safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            else:
                files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
            files = [os.path.join(path, name) for name in files]
        else:
            files = [path]
        if not files:
            raise ValueError(f"use_mxfp4_experts: no .safetensors file in {path}")
        self._where: Dict[str, str] = {}
        for file in files:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    self._where[key] = file
        self._open = safe_open

    def keys(self):
        return self._where.keys()

    def get_tensor(self, key: str) -> Tensor:
        with self._open(self._where[key], "pt") as f:
            return f.get_tensor(key)


def _check_matches(name: str, module: torch.nn.Module, w1_shape, w2_shape) -> None:
    """The checkpoint's blocks describe this module's experts: E, 2I and H as its own weights say."""
    layout = ExpertsLayout.of(module)
    w_up = getattr(module, "gate_up_proj", None)
    if w_up is None or not layout.has_gate:
        raise ValueError(f"use_mxfp4_experts: {name} ({type(module).__name__}) has no gate_up_proj; the checkpoint's "
                         f"{name}.gate_up_proj_blocks cannot be its weights")
    E, a, b = w_up.shape
    two_i, H = (b, a) if layout.is_transposed else (a, b)
    want = (E, two_i, H // 2)
    if tuple(w1_shape) != want or tuple(w2_shape) != (E, H, two_i // 4):
        raise ValueError(f"use_mxfp4_experts: {name} ({type(module).__name__}) has E={E}, 2I={two_i}, H={H}, so its "
                         f"MXFP4 weights would be [E, 2I, H/2] = {list(want)} and [E, H, I/2] = {[E, H, two_i // 4]}; "
                         f"the checkpoint's are {list(w1_shape)} and {list(w2_shape)}")


def use_mxfp4_experts(model: torch.nn.Module, checkpoint, *, a_dtype: torch.dtype = torch.bfloat16) -> List[str]:
    """Attaches to every experts module of ``model`` whose ``gate_up_proj_blocks`` the checkpoint
    holds its MXFP4 weights (on the module's device; a plain attribute, not a parameter: never
    saved) and sets the model's experts implementation to "moe_kernels_mxfp4" (registered here).

    Args:
        model: an HF model loaded from ``checkpoint`` (its MXFP4 experts dequantized by
            transformers, or not: only the names are matched).
        checkpoint: the checkpoint directory or .safetensors file, or a mapping name -> tensor.
        a_dtype: torch.bfloat16 (W4A16, the default) or torch.float8_e4m3fn (W4A8: activations
            quantized to e4m3 per token before each GEMM).
    Returns:
        The names of the experts modules converted; ValueError when there is none.
    """
    from ..modular.checkpoint import load_mxfp4_experts
    from .transformers import register

    register()
    tensors = checkpoint if hasattr(checkpoint, "keys") else CheckpointTensors(checkpoint)
    keys = set(tensors.keys())
    converted = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if f"{prefix}gate_up_proj_blocks" not in keys:
            continue
        t = load_mxfp4_experts(tensors, prefix)
        _check_matches(name, module, t.w1.shape, t.w2.shape)
        device = module.gate_up_proj_bias.device if hasattr(module, "gate_up_proj_bias") else next(
            module.parameters()).device
        module.__dict__[_MXFP4_ATTR] = Mxfp4Weights(t.w1.to(device), t.w1_scale.to(device), t.w2.to(device),
                                                    t.w2_scale.to(device), a_dtype)
        converted.append(name)
    if not converted:
        raise ValueError(f"use_mxfp4_experts: the checkpoint holds no *.gate_up_proj_blocks of a module of "
                         f"{type(model).__name__} (not an MXFP4 checkpoint of this model?)")
    model.set_experts_implementation(IMPLEMENTATION)
    return converted


def moe_kernels_mxfp4_experts_forward(module: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                                      top_k_weights: Tensor) -> Tensor:
    """ExpertsInterface "moe_kernels_mxfp4": the module's MXFP4 weights (use_mxfp4_experts) through
    cutlass_moe_mxfp4 with the module's gate as its activation and its biases in fp32. Returns
    [T, H] in hidden_states' dtype."""
    from ..ops.fourbit import cutlass_moe_mxfp4

    weights: Optional[Mxfp4Weights] = module.__dict__.get(_MXFP4_ATTR)
    if weights is None:
        raise ValueError(f'experts implementation "{IMPLEMENTATION}": {type(module).__name__} has no MXFP4 '
                         "weights; call moe_kernels.integrations.transformers.use_mxfp4_experts(model, checkpoint)")
    layout = ExpertsLayout.of(module)
    spec = gate_spec(module, layout, IMPLEMENTATION)
    b1, b2 = fp32_biases(module, layout)
    x = hidden_states.to(torch.bfloat16).contiguous()
    _, expert_map, num_local = routing_space(module, layout, x.device)
    out = cutlass_moe_mxfp4(x, weights.w1, weights.w2, top_k_weights.float().contiguous(), top_k_index.contiguous(),
                            weights.w1_scale, weights.w2_scale, w1_bias=b1, w2_bias=b2, a_dtype=weights.a_dtype,
                            expert_map=expert_map, num_local_experts=num_local, **spec.keywords())
    return out.to(hidden_states.dtype)
