"""The MoE shapes the benchmarks run on: the layers of real models."""

from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True)
class Model:
    name: str
    E: int  # routed experts
    K: int  # experts per token
    H: int  # hidden size
    I: int  # expert intermediate size (w1 is [E, 2I, H], w2 [E, H, I])
    groups: int = 1  # router: expert groups and groups kept (DeepSeek's grouped top-k)
    topk_group: int = 1
    scoring: str = "softmax"
    bias: bool = False  # router correction bias (DeepSeek-V3)
    routed_scaling_factor: float = 1.0
    ep_ranks: int = 4  # expert-parallel ranks of the ep benchmark (experts split evenly)
    # The experts' gated activation (cutlass_moe_fp8's keywords): gpt-oss interleaves gate and up
    # in w1's rows, uses the clamped SwiGLU "swigluoai" and fp32 biases on both GEMMs.
    activation: str = "silu"
    gate_up_interleaved: bool = False
    expert_bias: bool = False

    def layer_kwargs(self) -> dict:
        """The activation keywords of this model's layer (empty for today's silu(gate) * up)."""
        if self.activation == "silu" and not self.gate_up_interleaved:
            return {}
        return {"activation": self.activation, "gate_up_interleaved": self.gate_up_interleaved}


MODELS = [
    Model("mixtral-8x7b", E=8, K=2, H=4096, I=14336),
    Model("qwen3-235b", E=128, K=8, H=4096, I=1536),
    Model("qwen3-30b-a3b", E=128, K=8, H=2048, I=768),
    Model("deepseek-v3", E=256, K=8, H=7168, I=2048, groups=8, topk_group=4, scoring="sigmoid", bias=True,
          routed_scaling_factor=2.5, ep_ranks=8),
    # H = I = 2880 is no multiple of 128: the block-scaled and INT4 (1x128 groups) ops skip them.
    Model("gpt-oss-20b", E=32, K=4, H=2880, I=2880, activation="swigluoai", gate_up_interleaved=True,
          expert_bias=True),
    Model("gpt-oss-120b", E=128, K=4, H=2880, I=2880, activation="swigluoai", gate_up_interleaved=True,
          expert_bias=True),
]


def select(spec: Optional[str]) -> List[Model]:
    """Models named by a comma-separated list; a name selects every model it prefixes
    ("qwen3": both Qwen3 models). None or "" selects all."""
    if not spec:
        return list(MODELS)
    chosen = []
    for word in spec.split(","):
        word = word.strip().lower()
        matches = [m for m in MODELS if m.name.startswith(word)]
        if not matches:
            raise ValueError(f"unknown model {word!r}: choose from {', '.join(m.name for m in MODELS)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen
