"""The modular MoE layer: Router -> PrepareFinalize (dispatch ... combine) -> Experts.

Any Experts works with any PrepareFinalize: the layer only passes tensors between them. Every part
is a torch.nn.Module: the weights are registered parameters (vLLM's names: w13_weight, w2_weight,
their scales and biases), so a model holding the layer saves, loads, moves and prints as usual.

    layer = MoELayer(FusedGateRouter(topk=2), SingleGpu(E), TorchExperts(w1, w2))
    out = layer(hidden_states, router_logits)

Built from a checkpoint's tensors: see :mod:`moe_kernels.modular.checkpoint`.
"""

from . import checkpoint
from .chunked import ChunkedAllToAll, auto_num_chunks
from .experts import (CutlassFp8Experts, CutlassMxfp4Experts, CutlassW4A8Experts, Experts, TorchExperts,
                      gated_activation)
from .layer import MoELayer
from .prepare_finalize import AllToAll, CapacityOverflowError, Dispatched, PrepareFinalize, SingleGpu
from .router import FusedGateRouter, Router

__all__ = [
    "AllToAll",
    "CapacityOverflowError",
    "ChunkedAllToAll",
    "CutlassFp8Experts",
    "CutlassMxfp4Experts",
    "CutlassW4A8Experts",
    "Dispatched",
    "Experts",
    "FusedGateRouter",
    "MoELayer",
    "PrepareFinalize",
    "Router",
    "SingleGpu",
    "TorchExperts",
    "auto_num_chunks",
    "checkpoint",
    "gated_activation",
]
