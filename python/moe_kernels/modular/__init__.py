"""The modular MoE layer: Router -> PrepareFinalize (dispatch ... combine) -> Experts.

Any Experts works with any PrepareFinalize: the layer only passes tensors between them.

    layer = MoELayer(router, SingleGpu(), TorchExperts(w1, w2))
    out = layer(hidden_states, router_logits)
"""

from .experts import CutlassFp8Experts, Experts, TorchExperts
from .layer import MoELayer
from .prepare_finalize import AllToAll, CapacityOverflowError, Dispatched, PrepareFinalize, SingleGpu
from .router import FusedGateRouter, Router

__all__ = [
    "AllToAll",
    "CapacityOverflowError",
    "CutlassFp8Experts",
    "Dispatched",
    "Experts",
    "FusedGateRouter",
    "MoELayer",
    "PrepareFinalize",
    "Router",
    "SingleGpu",
    "TorchExperts",
]
