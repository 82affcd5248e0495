"""ep_pre_reorder and ep_post_reorder of one expert-parallel rank (rank 0 of `model.ep_ranks`)
against the plain PyTorch formulas, and the copy bandwidth.

Bytes counted (bf16 rows of H elements; only what the rank needs, from the routing of each set):
  pre:  read the rows of the tokens with at least one local choice, write one row per local
        choice (bf16, or 1 byte per element with fp8)
  post: read one row per local choice, write T rows (tokens without a local choice get zeros)
(ids, src2dst, weights and scales are negligible: at most 8*K bytes per token.)
"""

import torch

import moe_kernels

from .harness import FP8, Context, sets_for

TOKENS = [64, 1024, 4096, 16384]
QUICK_TOKENS = [16, 1024, 4096]
OPS = ["ep_pre", "ep_pre_fp8_tensor", "ep_pre_fp8_token", "ep_post"]


def torch_pre(x, src2dst, ids, start, end, scale=None):
    """Plain PyTorch: (quantize,) expand each token to its K rows, scatter the local ones; the other
    choices go to a spare last row (no host sync, as a boolean mask would need)."""
    T, K = ids.shape
    if scale is not None:
        s = scale.view(-1, 1) if scale.numel() == T else scale.view(1, 1)
        x = (x.float() / s).clamp(-448.0, 448.0).to(FP8)
    kept = (ids >= start) & (ids <= end)
    dst = torch.where(kept, src2dst, T * K).view(-1).long()
    out = torch.empty((T * K + 1, x.shape[1]), dtype=x.dtype, device=x.device)
    rows = x.unsqueeze(1).expand(T, K, x.shape[1]).reshape(T * K, x.shape[1])
    if x.dtype == FP8:  # index_copy_ has no fp8 kernel: move the bytes
        out.view(torch.uint8).index_copy_(0, dst, rows.view(torch.uint8))
    else:
        out.index_copy_(0, dst, rows)
    return out[: T * K]


def torch_post(down, src2dst, ids, w, start, end):
    """Plain PyTorch: gather each token's K rows, weight the local ones, sum in fp32."""
    T, K = ids.shape
    kept = (ids >= start) & (ids <= end)
    rows = down.index_select(0, src2dst.view(-1).clamp(min=0)).view(T, K, -1)
    return (rows.float() * (w * kept).unsqueeze(-1)).sum(1).to(down.dtype)


def make_set(T, E, K, H, start, end):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :K].to(torch.int32).contiguous()
    w = torch.rand(T, K, device="cuda")
    _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, E)  # SGLang's layout: every expert sorted
    down = torch.randn(T * K, H, device="cuda", dtype=torch.bfloat16)
    tensor_scale = torch.tensor([0.02], device="cuda")
    token_scale = torch.rand(T, device="cuda") * 0.02 + 0.01
    kept = (ids >= start) & (ids <= end)
    counts = (int(kept.any(dim=1).sum()), int(kept.sum()))  # tokens read, local choices
    return dict(x=x, ids=ids, w=w, src2dst=src2dst, down=down, tensor_scale=tensor_scale,
                token_scale=token_scale, counts=counts)


def calls(op, start, end):
    """(ours, peer): functions of one set."""
    pre, post = moe_kernels.ep_pre_reorder, moe_kernels.ep_post_reorder
    if op == "ep_pre":
        return (lambda s: pre(s["x"], s["src2dst"], s["ids"], start, end),
                lambda s: torch_pre(s["x"], s["src2dst"], s["ids"], start, end))
    if op in ("ep_pre_fp8_tensor", "ep_pre_fp8_token"):
        key = "tensor_scale" if op == "ep_pre_fp8_tensor" else "token_scale"
        return (lambda s: pre(s["x"], s["src2dst"], s["ids"], start, end, s[key], FP8),
                lambda s: torch_pre(s["x"], s["src2dst"], s["ids"], start, end, s[key]))
    return (lambda s: post(s["down"], s["src2dst"], s["ids"], s["w"], start, end),
            lambda s: torch_post(s["down"], s["src2dst"], s["ids"], s["w"], start, end))


def bytes_needed(op, T, H, tokens_read, local_choices):
    if op == "ep_post":
        return local_choices * H * 2 + T * H * 2
    out_elem = 2 if op == "ep_pre" else 1
    return tokens_read * H * 2 + local_choices * H * out_elem


def run(ctx: Context) -> list:
    rows = []
    for m, T in ctx.grid(TOKENS, QUICK_TOKENS):
        start, end = 0, m.E // m.ep_ranks - 1  # rank 0
        # A set holds x, down_output (T*K rows) and the routing: rotate enough to defeat L2.
        sets = [make_set(T, m.E, m.K, m.H, start, end) for _ in range(sets_for(T * m.H * 2 * (1 + m.K)))]
        tokens_read = sum(s["counts"][0] for s in sets) / len(sets)
        local = sum(s["counts"][1] for s in sets) / len(sets)
        for op in OPS:
            ours, peer = calls(op, start, end)
            t = ctx.measure({"ours": ours, "torch": peer}, [(s,) for s in sets])
            rows.append(ctx.row(op, m, T, t, bytes_needed(op, T, m.H, tokens_read, local), "copy",
                                ranks=m.ep_ranks, experts=f"[{start},{end}]", local_choices=local,
                                tokens_read=tokens_read))
        del sets
    return rows
