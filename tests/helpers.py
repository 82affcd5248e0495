"""Shared test utilities: random routing, allocator poisoning, device list."""

import os
import socket

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_topk_ids(T, K, E, dtype=torch.int32, device="cpu"):
    """[T, K] distinct experts per token (as a router gives), uniformly at random."""
    if T == 0:
        return torch.empty((0, K), dtype=dtype, device=device)
    ids = torch.rand(T, E).argsort(dim=1)[:, :K]
    return ids.to(dtype=dtype, device=device).contiguous()


def random_expert_map(E, num_local, device="cpu"):
    """A map sending a random subset of num_local global experts to 0..num_local-1, others to -1."""
    chosen = torch.randperm(E)[:num_local]
    m = torch.full((E,), -1, dtype=torch.int32)
    m[chosen] = torch.arange(num_local, dtype=torch.int32)
    return m.to(device)


def random_rows(T, H, dtype, device="cpu"):
    x = torch.randn(T, H, device=device)
    return x.to(dtype)


def poison_cuda_allocator(byte: int) -> None:
    """Fill the caching allocator's free blocks with `byte`, so that an op's output that it forgets
    to write holds garbage (0xFF: NaN in every float type) instead of zeros."""
    if not torch.cuda.is_available() or os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        return  # no cache to poison (compute-sanitizer runs): every tensor is a fresh cudaMalloc
    blocks = [torch.empty(1 << 18, dtype=torch.uint8, device="cuda") for _ in range(64)]
    blocks += [torch.empty(1 << 26, dtype=torch.uint8, device="cuda") for _ in range(4)]
    for b in blocks:
        b.fill_(byte)
    del blocks


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(rank_main, world, *args) -> dict:
    """Runs rank_main(rank, world, port, results, *args) in `world` processes (torch.multiprocessing,
    a fresh rendezvous port) and returns what the ranks stored in the shared dict `results`."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(world, free_port(), results, *args), nprocs=world)
        return dict(results)
