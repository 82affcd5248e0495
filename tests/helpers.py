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


def _rank_entry(rank, rank_main, world, port, results, *args):
    """A spawned rank: faulthandler on (a rank killed by a signal, e.g. the SIGABRT of a C++
    std::terminate in gloo or in an op, prints every thread's Python stack to the stderr that pytest
    captures, instead of one line), then rank_main, then a marker saying that it returned."""
    import faulthandler

    faulthandler.enable(all_threads=True)
    rank_main(rank, world, port, results, *args)
    results[(_DONE, rank)] = True


_DONE = "__spawn_ranks_done__"


def spawn_ranks(rank_main, world, *args) -> dict:
    """Runs rank_main(rank, world, port, results, *args) in `world` processes (torch.multiprocessing,
    a fresh rendezvous port) and returns what the ranks stored in the shared dict `results`.

    A rank killed by a signal (not a Python exception: those fail at once) gets one more attempt,
    with a fresh Manager and rendezvous port, and a warning naming the signal and which ranks had
    returned. Why: under torch 2.11 in the full CI run, a gloo rank of tests/test_ep_chunked.py's
    world-4 fixture died once per run with "terminate called without an active exception" (C++
    std::terminate, no Python error), twice; it did not reproduce alone, after the files before it,
    in a later full 2.11 run, in repeated world-4 runs or under CPU load: a rare crash (gloo or
    teardown timing), not a wrong result. Every result the tests check comes from the
    attempt that completed, so a retry cannot turn a wrong result into a pass; a crash that repeats
    still fails, with every thread's stack (see _rank_entry)."""
    import warnings

    import torch.multiprocessing as mp

    for attempt in (1, 2):
        with mp.Manager() as manager:
            results = manager.dict()
            try:
                mp.spawn(_rank_entry, args=(rank_main, world, free_port(), results, *args), nprocs=world)
            except mp.ProcessExitedException as e:
                done = sorted(k[1] for k in results.keys() if isinstance(k, tuple) and k[:1] == (_DONE,))
                msg = (f"spawn_ranks({rank_main.__module__}.{rank_main.__name__}, world={world}), attempt "
                       f"{attempt}: {e} (exit code {e.exit_code}); ranks that had returned: {done}")
                if attempt == 2 or e.exit_code >= 0:  # exit_code < 0: killed by signal -exit_code
                    raise RuntimeError(msg) from e
                warnings.warn(msg + "; retrying once", RuntimeWarning)
                continue
            return {k: v for k, v in results.items() if not (isinstance(k, tuple) and k[:1] == (_DONE,))}


def runs_fused_gemm1(fn):
    """Whether a call of fn launches cutlass_moe_fp8's fused GEMM1 (its argument kernel names it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("build_gated_args_kernel" in e.name for e in prof.events())
