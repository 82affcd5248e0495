"""Hugging Face transformers' experts backends ("grouped_mm", "batched_mm", transformers >= 5:
transformers.integrations.moe) as peers: the bf16 expert layers HF models run.

The backends are methods of HF's experts modules (gate_up_proj [E, 2I, H], down_proj [E, H, I],
SwiGLU, the layout of our w1/w2), selected by config._experts_implementation; MixtralExperts is
built on the meta device and given our weights, so no memory is spent twice. Anything missing
(transformers not installed, an older or newer API) makes the peer "n/a" with the reason.
"""

from typing import Callable, Union

import torch


def experts(impl: str, w1: torch.Tensor, w2: torch.Tensor) -> Union[Callable, str]:
    """(x [T, H] bf16, topk_ids [T, K] int64, topk_weights [T, K] bf16) -> [T, H] through
    transformers' `impl` backend on w1 [E, 2I, H], w2 [E, H, I]; or why it is not available."""
    try:
        import transformers
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except (ImportError, AttributeError) as e:
        return f"n/a ({type(e).__name__}: {str(e)[:80]})"
    version = getattr(transformers, "__version__", "?")
    try:
        if impl not in ALL_EXPERTS_FUNCTIONS:
            return f"n/a (transformers {version} has no {impl!r} experts backend)"
        E, two_i, H = w1.shape
        config = MixtralConfig(hidden_size=H, intermediate_size=two_i // 2, num_local_experts=E,
                               num_experts_per_tok=1)
        with torch.device("meta"):
            module = MixtralExperts(config)
        module.gate_up_proj = torch.nn.Parameter(w1, requires_grad=False)
        module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
        module.config._experts_implementation = impl
    except Exception as e:  # noqa: BLE001  (an API this code does not know)
        return f"n/a (transformers {version}: {type(e).__name__}: {str(e)[:80]})"

    def forward(x, topk_ids, topk_weights):
        with torch.no_grad():
            return module(x, topk_ids, topk_weights)

    return forward
