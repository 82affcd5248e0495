"""The modular MoE layer: Router -> PrepareFinalize -> Experts, on one device and over 2 ranks
(gloo on CPU, so it runs everywhere)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_kernels.modular import AllToAll, MoELayer, SingleGpu, TorchExperts
from helpers import spawn_ranks

T, E, K, H, I = 37, 8, 2, 24, 16


def softmax_topk(logits):
    w, ids = torch.softmax(logits.float(), dim=-1).topk(K, dim=-1)
    return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


def make_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    w1 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    return x, logits, w1, w2


def dense_moe(x, logits, w1, w2):
    """out[t] = sum_k w[t,k] * W2[e] (silu(W1g[e] x) * W1u[e] x), token by token."""
    w, ids = softmax_topk(logits)
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            h = w1[e].double() @ x[t].double()
            out[t] += w[t, k].double() * (w2[e].double() @ (F.silu(h[:I]) * h[I:]))
    return out


def test_single_gpu_layer_matches_dense_formula():
    x, logits, w1, w2 = make_problem()
    layer = MoELayer(softmax_topk, SingleGpu(E), TorchExperts(w1, w2))
    torch.testing.assert_close(layer(x, logits).double(), dense_moe(x, logits, w1, w2), rtol=1e-4, atol=1e-5)


def test_shared_experts_are_added():
    x, logits, w1, w2 = make_problem(1)
    shared = torch.randn(H, H) / H
    layer = MoELayer(softmax_topk, SingleGpu(E), TorchExperts(w1, w2), shared_experts=lambda h: h @ shared)
    want = dense_moe(x, logits, w1, w2) + (x @ shared).double()
    torch.testing.assert_close(layer(x, logits).double(), want, rtol=1e-4, atol=1e-5)


def test_torch_experts_rejects_bad_weights():
    with pytest.raises(ValueError, match=r"w1 \[E, 2I, H\] and w2 \[E, H, I\]"):
        TorchExperts(torch.zeros(4, 6, 8), torch.zeros(4, 8, 4))


def _rank_main(rank, world, port, results):
    # One thread per rank: the ranks share the cores, and spinning OpenMP threads of oversubscribed
    # processes made these tiny shapes take seconds per call.
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, logits, _, _ = make_problem(2 + rank)  # each rank has its own tokens
        _, _, w1, w2 = make_problem(0)  # and every rank the same experts
        local = E // world
        mine = slice(rank * local, (rank + 1) * local)
        layer = MoELayer(softmax_topk, AllToAll(E), TorchExperts(w1[mine], w2[mine]))
        results[rank] = layer(x, logits)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_equals_single_device(world):
    results = spawn_ranks(_rank_main, world)
    for rank in range(world):
        x, logits, _, _ = make_problem(2 + rank)
        _, _, w1, w2 = make_problem(0)
        torch.testing.assert_close(results[rank].double(), dense_moe(x, logits, w1, w2), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_single_gpu_layer_on_cuda_matches_dense_formula():
    x, logits, w1, w2 = make_problem(3)
    layer = MoELayer(softmax_topk, SingleGpu(E), TorchExperts(w1.cuda(), w2.cuda()))
    out = layer(x.cuda(), logits.cuda())
    torch.testing.assert_close(out.cpu().double(), dense_moe(x, logits, w1, w2), rtol=1e-4, atol=1e-5)
