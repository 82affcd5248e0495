"""ChunkedAllToAll: AllToAll whose exchange overlaps the experts.

The tokens of a layer are split into C chunks. The dispatch of chunk i+1 and the combine of chunk
i-1 run on a communication stream while the experts compute chunk i on the caller's stream::

    comm stream:     disp0  disp1  comb0 disp2  comb1 disp3  comb2 ... comb(C-1)
    caller's stream:        exp0   ------ exp1 ------ exp2 ------ ...

Only the first dispatch and the last combine stay exposed (about 1/C of the exchange each way),
at the price of C times the launches and NCCL calls, and of the experts' weights being read once
per chunk: see :func:`auto_num_chunks` for when that pays, and docs/ep.md for the model.

Results equal AllToAll's bit for bit (capacity and variable mode) whenever the experts compute
each row independently of the other rows: the exchange itself is exact (per-token or per-group
quantization, one record per destination, the partials added in rank order), tested on gloo.
On the GPU the CUTLASS grouped GEMM computes a row the same way within one tile configuration,
which it picks by rows per expert; the automatic chunk count keeps every chunk above 64 rows per
expert, in the same class as the whole layer (an explicit num_chunks may not; the two-GPU bench
reports ``bit_equal``). The CUTLASS experts' CPU reference computes rows alone (bit-exact,
tested); TorchExperts runs torch.matmul per expert, whose fp32 blocking depends on the row count,
so there a chunk may differ in the last bits. No host sync in capacity mode: CUDA-graph
capturable (not yet verified on GPUs).
"""

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.ep import ep_dispatch_plan, ep_pack_records, ep_unpack_records
from ..ops.permute import moe_unpermute
from .prepare_finalize import AllToAll

#: Rows per local expert per chunk below which a chunk would make the grouped GEMMs stream the
#: weights again instead of computing (measured on two H200s, DeepSeek-V3 FP8 shapes: 128 and 256
#: rows per expert ran at the same ~650-700 TFLOP/s; at 32 rows per expert the layer read the
#: weights at ~4.4 TB/s, i.e. weight-bound). docs/ep.md derives it.
MIN_ROWS_PER_EXPERT = 128
#: Each chunk adds two NCCL calls (~20-25 us of latency each, measured) and ~6 launches; past 4
#: chunks the exposed exchange (1/C of it) shrinks less than that fixed cost grows.
MAX_CHUNKS = 4


def auto_num_chunks(global_tokens: int, topk: int, num_experts: int,
                    min_rows_per_expert: int = MIN_ROWS_PER_EXPERT, max_chunks: int = MAX_CHUNKS) -> int:
    """The chunk count for ``global_tokens`` tokens summed over the ranks (each with ``topk``
    choices among ``num_experts``): as many chunks as keep every chunk at ``min_rows_per_expert``
    expected rows per expert (balanced routing), at most ``max_chunks``, at least 1.

    ``rows per expert per chunk = global_tokens * topk / (num_experts * C)``. DeepSeek-V3 (E=256,
    K=8): on 2 ranks one chunk below 4096 tokens per rank, 2 chunks from 4096 (3 from 6144, 4 from
    8192); on 8 ranks one chunk below 1024 tokens per rank, 2 from 1024, 3 from 1536, 4 from 2048.
    """
    if global_tokens <= 0:
        return 1
    rows_per_expert = global_tokens * topk // num_experts
    return max(1, min(max_chunks, rows_per_expert // max(1, min_rows_per_expert)))


def chunk_bounds(tokens: int, num_chunks: int) -> List[int]:
    """Token boundaries of the chunks: ``ceil(tokens / C)`` tokens each, the last ones shorter or
    empty (5 tokens in 4 chunks: 2, 2, 1, 0). Every rank runs all C chunks, empty or not: each is
    a collective."""
    size = -(-tokens // num_chunks) if tokens else 0
    return [min(i * size, tokens) for i in range(num_chunks + 1)]


class ChunkedAllToAll(AllToAll):
    """AllToAll (same arguments, same records, same results) whose layer call pipelines the
    exchange with the experts over C token chunks. Used through MoELayer, which calls
    ``forward_pipelined``; ``prepare`` / ``finalize`` remain the unchunked AllToAll's.

    Args (besides AllToAll's):
        num_chunks: None (default): chosen by :func:`auto_num_chunks` from the tokens of all ranks
            (capacity mode: ``W * capacity``, a constant, so that every rank and every captured
            graph agrees; variable mode: the sum of every rank's T, one extra tiny all-reduce and
            host read per layer). An int >= 1 fixes it; it must be the same on every rank (each
            chunk is a collective).
        chunk_capacity: capacity mode only: records per (rank, rank) pair of one chunk. Default
            ``ceil(capacity / C)``: the same bytes as unchunked, and no drop when capacity >=
            tokens per rank (the never-overflowing setting). With a smaller capacity a chunk can
            overflow where the whole layer would not (reported as AllToAll reports it);
            ``chunk_capacity=capacity`` never drops more than unchunked, at up to C times the bytes.
        min_rows_per_expert, max_chunks: the automatic rule's parameters.

    A layer that serves both decode (small T, in CUDA graphs) and prefill should hold two of them,
    a small capacity for decode (one chunk: chunking only adds latency there) and a large one for
    prefill, as DeepEP has a low-latency and a normal mode.
    """

    def __init__(self, num_experts: int, group: Optional[dist.ProcessGroup] = None,
                 dispatch_dtype: Optional[torch.dtype] = None, capacity: Optional[int] = None,
                 quant_group_size: Optional[int] = None, *, num_chunks: Optional[int] = None,
                 chunk_capacity: Optional[int] = None, min_rows_per_expert: int = MIN_ROWS_PER_EXPERT,
                 max_chunks: int = MAX_CHUNKS):
        super().__init__(num_experts, group, dispatch_dtype, capacity, quant_group_size)
        if num_chunks is not None and num_chunks < 1:
            raise ValueError(f"ChunkedAllToAll: num_chunks must be None or >= 1, got {num_chunks}")
        if chunk_capacity is not None and (capacity is None or chunk_capacity < 0):
            raise ValueError(f"ChunkedAllToAll: chunk_capacity needs capacity mode and must be >= 0, got "
                             f"chunk_capacity={chunk_capacity} with capacity={capacity}")
        if max_chunks < 1 or min_rows_per_expert < 1:
            raise ValueError(f"ChunkedAllToAll: max_chunks and min_rows_per_expert must be >= 1, got "
                             f"{max_chunks} and {min_rows_per_expert}")
        self.num_chunks = num_chunks
        self.chunk_capacity = chunk_capacity
        self.min_rows_per_expert = min_rows_per_expert
        self.max_chunks = max_chunks

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", num_chunks={'auto' if self.num_chunks is None else self.num_chunks}"
        if self.chunk_capacity is not None:
            s += f", chunk_capacity={self.chunk_capacity}"
        return s

    def chunks_for(self, tokens: int, topk: int, device=None) -> int:
        """The chunk count of a call with ``tokens`` tokens on this rank (a collective in variable
        mode without num_chunks: every rank must call it)."""
        if self.num_chunks is not None:
            return self.num_chunks
        if self.capacity is not None:
            global_tokens = self.world * self.capacity
        else:
            t = torch.tensor([tokens], dtype=torch.int64, device=device)
            dist.all_reduce(t, group=self.group)
            global_tokens = int(t.item())  # variable mode reads the host anyway (the split sizes)
        return auto_num_chunks(global_tokens, topk, self.num_experts, self.min_rows_per_expert, self.max_chunks)

    def capacity_per_chunk(self, num_chunks: int) -> int:
        if self.chunk_capacity is not None:
            return self.chunk_capacity
        return -(-self.capacity // num_chunks)

    @staticmethod
    def _comm_stream(device) -> Optional["torch.cuda.Stream"]:
        """One communication stream per device, shared by every layer: each call forks it from
        the caller's stream and joins it back, so layers never overlap each other through it."""
        if device.type != "cuda":
            return None  # gloo on the CPU: one thread, the same order of operations
        s = _COMM_STREAMS.get(device)
        if s is None:
            s = _COMM_STREAMS[device] = torch.cuda.Stream(device)
        return s

    def forward_pipelined(self, experts, x: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                          shared_experts=None) -> Tensor:
        """MoELayer.forward_routed's body, pipelined: the routed ``experts`` over this group plus
        ``shared_experts(x)`` (if given), which run on the caller's stream while the first chunk
        is dispatched (the one exchange no routed work can hide; with C = 1 the whole dispatch)."""
        T, H = x.shape
        K = topk_ids.shape[1]
        C = self.chunks_for(T, K, x.device)
        W, local = self.world, self.local
        bounds = chunk_bounds(T, C)
        # Quantized once for all chunks: the scales are per token (or per token group), so a
        # chunk's rows are the same bits as if it were quantized alone. One launch instead of C.
        rows, scales = self._quantize(x.contiguous())
        weights = topk_weights.to(torch.float32).contiguous()
        ids = topk_ids.contiguous()
        expert_map = self.expert_map(x.device)
        G = 0 if scales is None else (1 if scales.dim() == 1 else scales.shape[1])
        cap = -1 if self.capacity is None else self.capacity_per_chunk(C)

        # Every chunk's plan first (C one-block kernels): variable splits exchange all chunks'
        # counts in one all_to_all and read them in one host sync.
        plans = []
        for i in range(C):
            a, b = bounds[i], bounds[i + 1]
            slots, counts, dropped = ep_dispatch_plan(ids[a:b], local, W, cap)
            plans.append((slots, counts))
            if cap >= 0:
                if self._dropped is None:
                    self._dropped = torch.zeros(1, dtype=torch.int64, device=x.device)
                self._dropped.add_(dropped)
        if cap < 0:
            send = torch.stack([c for _, c in plans], dim=1)       # [W, C]: row d goes to rank d
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)
            both = torch.cat([send, recv]).tolist()               # the one host sync of variable splits
            send_splits = [[both[d][i] for d in range(W)] for i in range(C)]
            recv_splits = [[both[W + d][i] for d in range(W)] for i in range(C)]
        else:
            send_splits = recv_splits = [None] * C

        self._ones(plans[0][0])  # the unit weights' cache sized (first chunk = largest) before the fork
        comp = torch.cuda.current_stream(x.device) if x.device.type == "cuda" else None
        comm = self._comm_stream(x.device)
        if comm is not None:
            comm.wait_stream(comp)  # the inputs, plans and quantized rows are ready

        # Every per-chunk tensor stays referenced until both streams have joined (the end of this
        # call), so no block is freed while the other stream may still use it; the next call's
        # comm.wait_stream(comp) orders the comm stream's reuse of its own blocks after that.
        keep = []
        dispatched, outs = [None] * C, [None] * C

        def on_comm():
            return torch.cuda.stream(comm) if comm is not None else _nullcontext()

        def dispatch(i):
            a, b = bounds[i], bounds[i + 1]
            slots, counts = plans[i]
            ss, rs = send_splits[i], recv_splits[i]
            n_send = W * cap if cap >= 0 else sum(ss)
            n_recv = W * cap if cap >= 0 else sum(rs)
            with on_comm():
                records = ep_pack_records(rows[a:b], None if scales is None else scales[a:b], weights[a:b], ids[a:b],
                                          slots, counts, n_send, local, cap)
                received = records.new_empty((n_recv, records.shape[1]))
                dist.all_to_all_single(received, records, rs, ss, group=self.group)
                parts = ep_unpack_records(received, H, rows.dtype, G, K)
                ready = _record(comm)
            keep.extend((records, received) + tuple(parts))
            dispatched[i] = (parts, ready, n_send)

        def run_experts(i):
            (x_i, s_i, w_i, ids_i), ready, _ = dispatched[i]
            _wait(comp, ready)
            extra = {} if scales is None else {"x_scale": s_i.view(-1) if scales.dim() == 1 else s_i}
            y = experts(x_i, w_i, ids_i, expert_map, local, **extra).contiguous()
            keep.append(y)
            return y, _record(comp)

        def combine(i, y, done):
            slots, _ = plans[i]
            n_send = dispatched[i][2]
            with on_comm():
                _wait(comm, done)
                back = y.new_empty((n_send, H))
                dist.all_to_all_single(back, y, send_splits[i], recv_splits[i], group=self.group)
                outs[i] = moe_unpermute(back, self._ones(slots), slots)
            keep.append(back)

        # Issue order (the same on every rank: each step is a collective): the comm stream gets
        # disp0, disp1, comb0, disp2, comb1, ... so that while the experts run chunk i it combines
        # chunk i-1 and dispatches chunk i+1.
        dispatch(0)
        shared = None if shared_experts is None else shared_experts(x)
        pending = None
        for i in range(C):
            y_done = run_experts(i)
            if pending is not None:
                combine(i - 1, *pending)
            if i + 1 < C:
                dispatch(i + 1)
            pending = y_done
        combine(C - 1, *pending)
        if comm is not None:
            comp.wait_stream(comm)
        out = outs[0] if C == 1 else torch.cat(outs)
        if self.capacity is not None:
            self._report_overflow()
        del keep
        out = out.to(x.dtype)
        return out if shared is None else out + shared  # MoELayer's sum, in its order


_COMM_STREAMS = {}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _record(stream) -> Optional["torch.cuda.Event"]:
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def _wait(stream, event) -> None:
    if stream is not None and event is not None:
        stream.wait_event(event)
