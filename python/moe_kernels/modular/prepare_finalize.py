"""PrepareFinalize: moves tokens to where their experts are (prepare) and the expert outputs back
(finalize). The Experts see only the tokens and experts of this rank."""

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops.ep import ep_dispatch_plan, ep_pack_records, ep_unpack_records
from ..ops.permute import moe_unpermute
from ..ops.quant import scaled_fp8_quant

FP8 = torch.float8_e4m3fn


@dataclass
class Dispatched:
    """What prepare hands to the Experts, plus what finalize needs to undo it."""

    x: Tensor                       # [T_here, H]: the rows as sent (float, or e4m3 with x_scale)
    topk_weights: Tensor            # [T_here, K]
    topk_ids: Tensor                # [T_here, K], global expert ids
    expert_map: Optional[Tensor]    # [E] global -> local expert or -1; None: every expert is here
    num_local_experts: int
    x_scale: Optional[Tensor] = None  # e4m3 x only: [T_here] per token or [T_here, H/128] per group
    state: Any = None


class PrepareFinalize(nn.Module):
    """Base of the PrepareFinalize modules: prepare(x, topk_weights, topk_ids) -> Dispatched and
    finalize(expert_out, dispatched) -> [T, H]. They hold no weights (they are modules so that a
    model prints whole and moves as one); any object with these two methods works too."""

    def prepare(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Dispatched:
        raise NotImplementedError

    def finalize(self, expert_out: Tensor, dispatched: Dispatched) -> Tensor:
        raise NotImplementedError


class SingleGpu(PrepareFinalize):
    """Every expert is local: nothing moves."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"

    def prepare(self, x, topk_weights, topk_ids):
        return Dispatched(x, topk_weights, topk_ids, None, self.num_experts)

    def finalize(self, expert_out, dispatched):
        return expert_out


class CapacityOverflowError(RuntimeError):
    """AllToAll with a capacity dropped records: some tokens lost expert contributions."""


@dataclass
class _AllToAllState:
    slots: Tensor                   # [T, W] int32: record of (token, rank) in the send buffer, or -1
    send_split: Optional[List[int]]  # records per rank (None: equal splits of the capacity)
    recv_split: Optional[List[int]]
    num_send: int
    dtype: torch.dtype              # the layer input's dtype, which the output takes back


class AllToAll(PrepareFinalize):
    """Expert parallelism over a torch.distributed group: rank r owns experts
    [r*E/W, (r+1)*E/W). Each token goes once to every rank that holds one of its experts, with its
    full top-k row (the receiver keeps its own experts through expert_map); each rank returns the
    partial weighted sums, which the sender adds up.

    One packed buffer per direction, one ``all_to_all_single`` each: prepare builds one record per
    (token, destination rank) = [row | scales | K weights | K ids] with ``ep_pack_records`` (after
    ``ep_dispatch_plan`` placed them) and the receiver splits them with ``ep_unpack_records``;
    finalize sends back one row of partial outputs per received record, and the sender adds up the
    up-to-W partials of each token with moe_unpermute's weighted gather (unit weights, fp32
    accumulation in rank order; the experts already applied the top-k weights).

    Args:
        num_experts: E, divisible by the world size.
        group: the process group (default: the world). NCCL on GPUs, gloo on CPU.
        dispatch_dtype: None (rows travel in the input's dtype) or torch.float8_e4m3fn: tokens are
            quantized once before they leave, per token (``scaled_fp8_quant(per_token=True)``, as
            CutlassFp8Experts does on one device) or per 1x128 group (``quant_group_size=128``, for
            block-scaled experts); the scales travel in the records. Half the bytes of bf16.
        capacity: None: variable splits, exactly the records needed; the counts are exchanged first
            and read on the host (one sync per layer; not CUDA-graph capturable). An int: at most
            ``capacity`` tokens from each rank to each rank, equal splits of W * capacity records, no
            host sync, CUDA-graph capturable. ``capacity = T`` (tokens per rank) can never overflow.
        quant_group_size: None (per-token scales) or the group size of per-group scales (128).

    Overflow (capacity mode): the records past a rank's capacity are dropped (those tokens miss
    that rank's experts) and counted on the device. It is reported, never silent: finalize raises
    CapacityOverflowError at the first host-visible point without a sync: at once for CPU tensors;
    on CUDA at a later call, once a non-blocking copy of the counter to pinned memory has landed
    (checked with an event query, skipped while capturing a graph). ``check_overflow()`` checks now
    (a host sync), e.g. after replaying a graph. Only the ranks that dropped records raise.
    """

    def __init__(self, num_experts: int, group: Optional[dist.ProcessGroup] = None,
                 dispatch_dtype: Optional[torch.dtype] = None, capacity: Optional[int] = None,
                 quant_group_size: Optional[int] = None):
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"AllToAll: num_experts={num_experts} must divide by the world size {self.world}")
        if dispatch_dtype not in (None, FP8):
            raise ValueError(f"AllToAll: dispatch_dtype must be None or torch.float8_e4m3fn, got {dispatch_dtype}")
        if quant_group_size is not None and dispatch_dtype != FP8:
            raise ValueError("AllToAll: quant_group_size applies to dispatch_dtype=torch.float8_e4m3fn only")
        if capacity is not None and (capacity < 0 or self.world < 2):
            # Unfilled records name an expert of another rank (dropped by the receiver's expert_map):
            # one rank has none to name, and needs no capacity anyway.
            raise ValueError(f"AllToAll: capacity must be >= 0 with a world of >= 2 ranks, got capacity={capacity} "
                             f"with {self.world} rank(s)")
        self.num_experts = num_experts
        self.local = num_experts // self.world
        self.dispatch_dtype = dispatch_dtype
        self.capacity = capacity
        self.quant_group_size = quant_group_size
        self._expert_map: Optional[Tensor] = None
        self._unit_weights: Optional[Tensor] = None
        self._dropped: Optional[Tensor] = None        # device int64 [1]: records dropped so far
        self._dropped_host: Optional[Tensor] = None   # its pinned copy (CUDA)
        self._dropped_copied: Optional[torch.cuda.Event] = None

    def extra_repr(self) -> str:
        s = f"num_experts={self.num_experts}, world={self.world}, rank={self.rank}"
        if self.dispatch_dtype is not None:
            s += f", dispatch_dtype={self.dispatch_dtype}"
        if self.quant_group_size is not None:
            s += f", quant_group_size={self.quant_group_size}"
        if self.capacity is not None:
            s += f", capacity={self.capacity}"
        return s

    def expert_map(self, device) -> Tensor:
        if self._expert_map is None or self._expert_map.device != torch.device(device):
            m = torch.full((self.num_experts,), -1, dtype=torch.int32, device=device)
            first = self.rank * self.local
            m[first:first + self.local] = torch.arange(self.local, dtype=torch.int32, device=device)
            self._expert_map = m
        return self._expert_map

    def _quantize(self, x: Tensor):
        """-> (rows, scales or None): the rows that travel."""
        if self.dispatch_dtype is None:
            return x, None
        if self.quant_group_size is None:
            q, s = scaled_fp8_quant(x, None, per_token=True)
            return q, s.view(-1)
        from ..ops.quant import per_token_group_quant_fp8  # the block-scaled path (second wave)
        return per_token_group_quant_fp8(x, self.quant_group_size)

    def prepare(self, x, topk_weights, topk_ids):
        T, H = x.shape
        K = topk_ids.shape[1]
        rows, scales = self._quantize(x.contiguous())
        weights = topk_weights.to(torch.float32).contiguous()
        ids = topk_ids.contiguous()
        cap = -1 if self.capacity is None else self.capacity
        slots, counts, dropped = ep_dispatch_plan(ids, self.local, self.world, cap)
        if self.capacity is None:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=self.group)
            splits = torch.cat([counts, recv_counts]).tolist()  # the host sync of variable splits
            send_split, recv_split = splits[:self.world], splits[self.world:]
            num_send, num_recv = sum(send_split), sum(recv_split)
        else:
            if self._dropped is None:
                self._dropped = torch.zeros(1, dtype=torch.int64, device=x.device)
            self._dropped.add_(dropped)
            send_split = recv_split = None
            num_send = num_recv = self.world * self.capacity
        records = ep_pack_records(rows, scales, weights, ids, slots, counts, num_send, self.local, cap)
        received = records.new_empty((num_recv, records.shape[1]))
        dist.all_to_all_single(received, records, recv_split, send_split, group=self.group)
        G = 0 if scales is None else (1 if scales.dim() == 1 else scales.shape[1])
        x_here, s_here, w_here, ids_here = ep_unpack_records(received, H, rows.dtype, G, K)
        x_scale = None if scales is None else (s_here.view(-1) if scales.dim() == 1 else s_here)
        state = _AllToAllState(slots, send_split, recv_split, num_send, x.dtype)
        return Dispatched(x_here, w_here, ids_here, self.expert_map(x.device), self.local, x_scale, state)

    def finalize(self, expert_out, dispatched):
        st: _AllToAllState = dispatched.state
        y = expert_out.contiguous()
        back = y.new_empty((st.num_send, y.shape[1]))
        dist.all_to_all_single(back, y, st.send_split, st.recv_split, group=self.group)
        out = moe_unpermute(back, self._ones(st.slots), st.slots)
        if self.capacity is not None:
            self._report_overflow()
        return out.to(st.dtype)

    def _ones(self, slots: Tensor) -> Tensor:
        """Unit weights [T, W] for the combine (cached: no fill kernel per call)."""
        T = slots.shape[0]
        u = self._unit_weights
        if u is None or u.device != slots.device or u.shape[0] < T:
            u = self._unit_weights = torch.ones((max(T, 1), self.world), dtype=torch.float32, device=slots.device)
        return u[:T]

    # ---------------------------------------------------------------- overflow of the capacity

    def dropped_records(self) -> int:
        """Records dropped by the capacity since construction (or reset_overflow); a host sync."""
        return 0 if self._dropped is None else int(self._dropped.item())

    def check_overflow(self) -> None:
        """Raises CapacityOverflowError if records were dropped (a host sync)."""
        self._raise_if(self.dropped_records())

    def reset_overflow(self) -> None:
        if self._dropped is not None:
            self._dropped.zero_()
        if self._dropped_host is not None:
            self._dropped_host.zero_()
        self._dropped_copied = None

    def _raise_if(self, dropped: int) -> None:
        if dropped > 0:
            raise CapacityOverflowError(
                f"AllToAll: rank {self.rank} dropped {dropped} token records: more than capacity={self.capacity} "
                f"tokens went from this rank to one rank, and those tokens miss that rank's experts. Raise the "
                f"capacity (capacity = tokens per rank never overflows) or use capacity=None (variable splits)")

    def _report_overflow(self) -> None:
        d = self._dropped
        if d.device.type != "cuda":
            self._raise_if(int(d.item()))  # free on the CPU
            return
        if torch.cuda.is_current_stream_capturing():
            return  # the graph's counter is read by check_overflow() after replays
        if self._dropped_copied is not None and self._dropped_copied.query():
            self._raise_if(int(self._dropped_host.item()))
        if self._dropped_host is None:
            self._dropped_host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self._dropped_host.copy_(d, non_blocking=True)
        if self._dropped_copied is None:
            self._dropped_copied = torch.cuda.Event()
        self._dropped_copied.record()
