"""HF transformers drop-in: moe_kernels as experts implementations.

```python
from moe_kernels.integrations.transformers import register
register()
model.set_experts_implementation("moe_kernels")       # or "moe_kernels_fp8", or at load:
# AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_kernels")
```

Names registered (transformers >= 5.0, whose MoE models dispatch their experts modules through
``ExpertsInterface``, and FP8 checkpoints through ``FP8ExpertsInterface``):

- ExpertsInterface "moe_kernels": moe_permute -> grouped GEMM (torch._grouped_mm on CUDA for
  bf16; one matmul per expert otherwise) -> the module's own gate / activation -> grouped GEMM ->
  moe_unpermute. Honours every layout an experts module declares (transposed, bias, gated or not,
  concatenated or interleaved through the module's gate, post-expert norm, expert parallelism).
- ExpertsInterface "moe_kernels_fp8": weights quantized to e4m3 once per output channel and
  cached on the module (refreshed when they change), tokens per token, cutlass_moe_fp8.
  Gates silu, exact gelu and gpt-oss's swigluoai, halves or interleaved, biases kept in fp32:
  anything else is an error naming it.
- ExpertsInterface "moe_kernels_mxfp4": gpt-oss MXFP4 checkpoints, the 4-bit blocks read again from
  the checkpoint files (transformers dequantizes them at load without its Triton kernels):
  ``use_mxfp4_experts(model, checkpoint_dir)`` attaches them and selects this implementation;
  cutlass_moe_mxfp4 with the module's gate and fp32 biases.
- FP8ExpertsInterface "moe_kernels" and "moe_kernels_fp8": FP8 checkpoints (e4m3 weights with
  128x128 ``weight_scale_inv``) through the block-scaled cutlass_moe_fp8. Both names, so that
  either choice works on a model whose dense experts and FP8 experts share one setting.

Routing stays the model's own; ``use_fused_router(model)`` opts in to moe_fused_gate for the
routers of DeepSeek-V3, Qwen3-MoE and Mixtral (same ids and weights).
"""

import transformers
from packaging.version import Version

from .hf_experts import moe_kernels_experts_forward
from .hf_experts_fp8 import moe_kernels_fp8_block_experts_forward, moe_kernels_fp8_experts_forward
from .hf_experts_mxfp4 import moe_kernels_mxfp4_experts_forward, use_mxfp4_experts
from .hf_router import FUSED_ROUTERS, restore_router, use_fused_router

MIN_TRANSFORMERS = "5.0"

#: ExpertsInterface name -> forward.
EXPERTS_IMPLEMENTATIONS = {
    "moe_kernels": moe_kernels_experts_forward,
    "moe_kernels_fp8": moe_kernels_fp8_experts_forward,
    "moe_kernels_mxfp4": moe_kernels_mxfp4_experts_forward,
}
#: FP8ExpertsInterface name -> forward.
FP8_EXPERTS_IMPLEMENTATIONS = {
    "moe_kernels": moe_kernels_fp8_block_experts_forward,
    "moe_kernels_fp8": moe_kernels_fp8_block_experts_forward,
}

__all__ = [
    "register",
    "use_mxfp4_experts",
    "use_fused_router",
    "restore_router",
    "FUSED_ROUTERS",
    "EXPERTS_IMPLEMENTATIONS",
    "FP8_EXPERTS_IMPLEMENTATIONS",
    "moe_kernels_experts_forward",
    "moe_kernels_fp8_experts_forward",
    "moe_kernels_fp8_block_experts_forward",
    "moe_kernels_mxfp4_experts_forward",
]


def _interfaces():
    """(ExpertsInterface, FP8ExpertsInterface or None) of the installed transformers."""
    if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
        raise ImportError(f"moe_kernels.integrations.transformers needs transformers >= {MIN_TRANSFORMERS} "
                          f"(its ExpertsInterface), found {transformers.__version__}")
    from transformers.integrations.moe import ExpertsInterface

    try:
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:  # releases without FP8 experts: nothing to register there
        FP8ExpertsInterface = None
    return ExpertsInterface, FP8ExpertsInterface


def register() -> None:
    """Adds the implementations above to transformers' experts interfaces (class-wide, so every
    model sees them). Idempotent: registering again maps the same names to the same functions."""
    experts_interface, fp8_experts_interface = _interfaces()
    for name, forward in EXPERTS_IMPLEMENTATIONS.items():
        experts_interface.register(name, forward)
    if fp8_experts_interface is not None:
        for name, forward in FP8_EXPERTS_IMPLEMENTATIONS.items():
            fp8_experts_interface.register(name, forward)
