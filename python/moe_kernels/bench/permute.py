"""moe_permute, moe_unpermute (and moe_sort_tokens alone) against the plain PyTorch formulas, and
the copy bandwidth.

Bytes counted (bf16 rows of H elements, T tokens, K choices):
  permute:   read T*H, write T*K*H (+ ids and metadata, negligible)
  unpermute: read T*K*H, write T*H (+ weights and indices)
"""

import torch

import moe_kernels

from .harness import Context, sets_for

TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
QUICK_TOKENS = [16, 1024, 4096]


def torch_permute(x, ids, E):
    """argsort of the flat ids (stable) + index_select: the plain PyTorch permute."""
    K = ids.shape[1]
    order = torch.argsort(ids.view(-1), stable=True)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=x.device)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device)  # bincount would sync (it reads max(ids))
    counts.scatter_add_(0, ids.view(-1).long(), torch.ones_like(ids.view(-1), dtype=torch.int64))
    offsets[1:] = torch.cumsum(counts, 0)
    return x.index_select(0, order // K), offsets, order


def torch_unpermute(permuted, w, inv):
    """index_select of each token's K rows + weighted sum in fp32: the plain PyTorch unpermute."""
    T, K = inv.shape
    rows = permuted.index_select(0, inv.view(-1)).view(T, K, -1)
    return (rows.float() * w.unsqueeze(-1)).sum(1).to(permuted.dtype)


def make_set(T, E, K, H):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :K].to(torch.int32).contiguous()
    w = torch.rand(T, K, device="cuda")
    permuted, _, inv, _ = moe_kernels.moe_permute(x, ids, E)
    return x, ids, w, permuted, inv


def run(ctx: Context) -> list:
    rows = []
    for m, T in ctx.grid(TOKENS, QUICK_TOKENS):
        E, K, H = m.E, m.K, m.H
        nbytes = T * H * 2 * (1 + K)  # both directions move the same bytes
        sets = [make_set(T, E, K, H) for _ in range(sets_for(nbytes))]
        p = ctx.measure({"ours": lambda x, ids: moe_kernels.moe_permute(x, ids, E),
                         "torch": lambda x, ids: torch_permute(x, ids, E)}, [(s[0], s[1]) for s in sets])
        sort = ctx.measure({"ours": lambda ids: moe_kernels.moe_sort_tokens(ids, E)}, [(s[1],) for s in sets])
        u = ctx.measure({"ours": moe_kernels.moe_unpermute, "torch": torch_unpermute},
                        [(s[3], s[2], s[4]) for s in sets])
        del sets
        sort_us = sort["ours"] * 1e6 if isinstance(sort["ours"], float) else None
        rows.append(ctx.row("permute", m, T, p, nbytes, "copy", sort_us=sort_us))
        rows.append(ctx.row("unpermute", m, T, u, nbytes, "copy"))
    return rows

