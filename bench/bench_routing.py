"""moe_fused_gate against the router written in plain PyTorch (the DeepSeek-V3 gate formula).

Bytes: T*E scores read, T*(topk)*(4+4) written: the op is latency/launch bound at small T and a
few microseconds of compute per 1000 tokens at large T, so time and speedup are reported.
Run: python bench/bench_routing.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import moe_kernels  # noqa: E402

CONFIGS = {  # name: (E, groups, topk_group, topk, scoring, bias, renormalize, rsf)
    "deepseek-v3": (256, 8, 4, 8, "sigmoid", True, True, 2.5),
    "kimi-k2": (384, 1, 1, 8, "sigmoid", True, True, 2.827),
    "qwen3": (128, 1, 1, 8, "softmax", False, True, 1.0),
}
TOKENS = [1, 16, 128, 1024, 4096, 16384]


def torch_gate(scores, bias, G, topk_group, topk, scoring, renormalize, rsf):
    s = scores.float().sigmoid() if scoring == "sigmoid" else scores.float().softmax(dim=-1)
    choice = s + bias if bias is not None else s
    T, E = s.shape
    if topk_group < G:
        grouped = choice.view(T, G, E // G)
        group_score = grouped.topk(2, dim=-1).values.sum(-1) if bias is not None else grouped.amax(-1)
        keep = torch.zeros(T, G, dtype=torch.bool, device=s.device)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    ids = choice.topk(topk, dim=-1).indices
    w = s.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * rsf, ids.int()


def main():
    rows = []
    for name, (E, G, tg, k, scoring, with_bias, renorm, rsf) in CONFIGS.items():
        bias = torch.randn(E, device="cuda") * 0.1 if with_bias else None
        for T in TOKENS:
            n = harness.sets_for(T * E * 2)
            sets = [(torch.randn(T, E, device="cuda", dtype=torch.bfloat16),) for _ in range(n)]
            ours = harness.time_per_call(
                lambda x: moe_kernels.moe_fused_gate(x, bias, G, tg, k, scoring, renorm, 0, rsf, True), sets)
            peer = harness.time_per_call(lambda x: torch_gate(x, bias, G, tg, k, scoring, renorm, rsf), sets)
            rows.append({"config": name, "T": T, "us": ours * 1e6, "torch_us": peer * 1e6, "speedup": peer / ours})
    harness.print_table(rows, ["config", "T", "us", "torch_us", "speedup"])
    print(f"saved {harness.save('routing', {}, rows)}")


if __name__ == "__main__":
    main()
