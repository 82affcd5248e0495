"""moe_permute and moe_unpermute against the plain PyTorch versions and the copy bandwidth.

Bytes counted (bf16 rows of H elements, T tokens, K choices):
  permute:   read T*H, write T*K*H (+ ids and metadata, negligible)
  unpermute: read T*K*H, write T*H (+ weights and indices)
Run: python bench/bench_permute.py  (prints a table, writes bench/results/permute_*.json)
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import moe_kernels  # noqa: E402

MODELS = {  # name: (E, K, H)
    "mixtral-8x7b": (8, 2, 4096),
    "qwen3-235b": (128, 8, 4096),
    "deepseek-v3": (256, 8, 7168),
}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()

    bw = harness.copy_bandwidth()
    rows = []
    for name in args.models:
        E, K, H = MODELS[name]
        for T in args.tokens:
            elem = 2
            permute_bytes = T * H * elem * (1 + K)
            unpermute_bytes = T * H * elem * (K + 1)
            n = harness.sets_for(permute_bytes)
            sets = [make_set(T, E, K, H) for _ in range(n)]
            ours_p = harness.time_per_call(lambda x, ids: moe_kernels.moe_permute(x, ids, E),
                                           [(s[0], s[1]) for s in sets])
            peer_p = harness.time_per_call(lambda x, ids: torch_permute(x, ids, E), [(s[0], s[1]) for s in sets])
            ours_s = harness.time_per_call(lambda ids: moe_kernels.moe_sort_tokens(ids, E), [(s[1],) for s in sets])
            ours_u = harness.time_per_call(moe_kernels.moe_unpermute, [(s[3], s[2], s[4]) for s in sets])
            peer_u = harness.time_per_call(torch_unpermute, [(s[3], s[2], s[4]) for s in sets])
            del sets
            for op, ours, peer, nbytes in (("permute", ours_p, peer_p, permute_bytes),
                                           ("unpermute", ours_u, peer_u, unpermute_bytes)):
                rows.append({
                    "model": name, "op": op, "T": T,
                    "us": ours * 1e6, "torch_us": peer * 1e6, "speedup": peer / ours,
                    "GB/s": nbytes / ours / 1e9, "frac_copy_bw": nbytes / ours / bw,
                    **({"sort_us": ours_s * 1e6} if op == "permute" else {}),
                })
    harness.print_table(rows, ["model", "op", "T", "us", "sort_us", "torch_us", "speedup", "GB/s", "frac_copy_bw"])
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    path = harness.save("permute", {"copy_bandwidth_Bps": bw}, rows)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
