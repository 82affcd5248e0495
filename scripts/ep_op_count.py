"""Counts what one expert-parallel layer call issues on the host, on the CPU (gloo, 2 ranks): every
op that reaches the dispatcher (each library op and each aten op is one kernel launch on CUDA, a
collective one NCCL call) and the host syncs among them (aten::_local_scalar_dense: .item() /
.tolist()). Allocations (empty/new_empty: no launch) and views are listed apart. For docs/ep.md:

    PYTHONPATH=python python3 scripts/ep_op_count.py
"""

import collections
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from moe_kernels.modular import AllToAll, ChunkedAllToAll, CutlassFp8Experts, MoELayer

FP8 = torch.float8_e4m3fn
E, K, H, I, T = 16, 4, 256, 128, 64
NO_LAUNCH = {"empty.memory_format", "new_empty.default", "empty_like.default", "view.default", "slice.Tensor",
             "detach.default", "alias.default", "t.default", "select.int", "unsqueeze.default",
             "expand.default", "_unsafe_view.default", "reshape.default", "as_strided.default", "split.Tensor"}


class Count(TorchDispatchMode):
    """Ops through the dispatcher, plus .tolist() / .item() calls (host reads: a sync on CUDA;
    .tolist() does not pass the dispatcher, so the methods are wrapped while counting)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.reads = 0

    def __enter__(self):
        self._saved = torch.Tensor.tolist, torch.Tensor.item
        count = self

        def wrap(f):
            def g(t, *a, **kw):
                count.reads += 1
                return f(t, *a, **kw)
            return g
        torch.Tensor.tolist, torch.Tensor.item = wrap(self._saved[0]), wrap(self._saved[1])
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.item = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def classify(ops):
    launches = {k: v for k, v in ops.items() if k.split(".", 1)[-1] not in NO_LAUNCH and "_local_scalar_dense" not in k}
    syncs = None
    comm = sum(v for k, v in launches.items() if k.startswith("c10d."))
    return launches, syncs, comm


def main(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(K, -1)
    w, ids = (w / w.sum(-1, keepdim=True)).contiguous(), ids.to(torch.int32).contiguous()
    local = E // world
    q1 = torch.randn(local, 2 * I, H, generator=g).to(FP8)
    q2 = torch.randn(local, H, I, generator=g).to(FP8)
    ex = CutlassFp8Experts(q1, q2, torch.full((local,), 0.05), torch.full((local,), 0.05))
    rows = []
    for name, pf in (("AllToAll", lambda **kw: AllToAll(E, **kw)),
                     ("Chunked C=2", lambda **kw: ChunkedAllToAll(E, num_chunks=2, **kw)),
                     ("Chunked C=4", lambda **kw: ChunkedAllToAll(E, num_chunks=4, **kw))):
        for dispatch in (None, FP8):
            for cap in (None, T):
                layer = MoELayer(None, pf(dispatch_dtype=dispatch, capacity=cap), ex)
                layer.forward_routed(x, w, ids)  # caches (expert_map, unit weights) filled
                with Count() as c:
                    layer.forward_routed(x, w, ids)
                launches, _, comm = classify(c.ops)
                # capacity mode's overflow check reads the counter with .item() on the CPU only
                # (CUDA: a non-blocking copy and an event query): not a sync there.
                syncs = c.reads - (1 if cap else 0)
                rows.append((name, "fp8" if dispatch else "bf16", "capacity" if cap else "variable",
                             sum(launches.values()), comm, syncs, dict(launches)))
    if rank == 0:
        out.extend(rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.list()
        mp.spawn(main, args=(2, port, out), nprocs=2)
        print("| PrepareFinalize | dispatch | mode | ops issued (launches + collectives) | collectives "
              "| host reads on CUDA (.tolist/.item) |")
        print("|---|---|---|---|---|---|")
        for name, d, mode, n, comm, syncs, ops in out:
            print(f"| {name} | {d} | {mode} | {n} | {comm} | {syncs} |")
        if "-v" in sys.argv:
            for name, d, mode, n, comm, syncs, ops in out:
                print(name, d, mode, ops)
