"""moe_fused_gate against the router written in plain PyTorch (softmax top-k for Mixtral and
Qwen3, DeepSeek-V3's grouped sigmoid top-k with a correction bias).

The op reads T*E scores and writes T*K weights and ids: it is launch and latency bound at small T
and a few microseconds per thousand tokens at large T, so time and ratio are reported, no rate.
"""

import torch

import moe_kernels

from .harness import Context, sets_for

TOKENS = [1, 16, 128, 1024, 4096, 16384]
QUICK_TOKENS = [16, 1024, 4096]


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


def run(ctx: Context) -> list:
    rows = []
    for m, T in ctx.grid(TOKENS, QUICK_TOKENS):
        bias = torch.randn(m.E, device="cuda") * 0.1 if m.bias else None
        args = (bias, m.groups, m.topk_group, m.K, m.scoring, True)
        rsf = m.routed_scaling_factor
        sets = [(torch.randn(T, m.E, device="cuda", dtype=torch.bfloat16),) for _ in range(sets_for(T * m.E * 2))]
        t = ctx.measure({"ours": lambda x: moe_kernels.moe_fused_gate(x, *args, 0, rsf, True),
                         "torch": lambda x: torch_gate(x, *args, rsf)}, sets)
        rows.append(ctx.row("fused_gate", m, T, t))
    return rows
