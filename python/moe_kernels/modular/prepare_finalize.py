"""PrepareFinalize: moves tokens to where their experts are (prepare) and the expert outputs back
(finalize). The Experts see only the tokens and experts of this rank."""

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Dispatched:
    """What prepare hands to the Experts, plus what finalize needs to undo it."""

    x: Tensor                       # [T_here, H]
    topk_weights: Tensor            # [T_here, K]
    topk_ids: Tensor                # [T_here, K], global expert ids
    expert_map: Optional[Tensor]    # [E] global -> local expert or -1; None: every expert is here
    num_local_experts: int
    state: Any = None


class PrepareFinalize(Protocol):
    def prepare(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Dispatched: ...

    def finalize(self, expert_out: Tensor, dispatched: Dispatched) -> Tensor: ...


class SingleGpu:
    """Every expert is local: nothing moves."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def prepare(self, x, topk_weights, topk_ids):
        return Dispatched(x, topk_weights, topk_ids, None, self.num_experts)

    def finalize(self, expert_out, dispatched):
        return expert_out


class AllToAll:
    """Expert parallelism over a torch.distributed group: rank r owns experts
    [r*E/W, (r+1)*E/W). Each token goes once to every rank that holds one of its experts, with its
    full top-k row (the receiver keeps its own experts through expert_map); each rank returns the
    partial weighted sums, which the sender adds up.

    The split sizes depend on the routing, so prepare reads them on the host (one sync per layer,
    as any all-to-all dispatch through torch.distributed): this path is not CUDA-graph capturable.
    Works with NCCL on GPUs and gloo on CPU.
    """

    def __init__(self, num_experts: int, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"AllToAll: num_experts={num_experts} must divide by the world size {self.world}")
        self.num_experts = num_experts
        self.local = num_experts // self.world

    def expert_map(self, device) -> Tensor:
        m = torch.full((self.num_experts,), -1, dtype=torch.int32, device=device)
        first = self.rank * self.local
        m[first:first + self.local] = torch.arange(self.local, dtype=torch.int32, device=device)
        return m

    def prepare(self, x, topk_weights, topk_ids):
        dest = topk_ids.long() // self.local                                   # [T, K] owner rank
        wanted = torch.zeros(x.shape[0], self.world, dtype=torch.bool, device=x.device)
        wanted.scatter_(1, dest, True)                                          # token t -> rank d
        ranks, tokens = wanted.t().nonzero(as_tuple=True)                       # grouped by rank
        send_counts = torch.bincount(ranks, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()     # the host sync

        def exchange(t: Tensor) -> Tensor:
            out = t.new_empty((sum(recv_split),) + tuple(t.shape[1:]))
            dist.all_to_all_single(out, t[tokens].contiguous(), recv_split, send_split, group=self.group)
            return out

        return Dispatched(exchange(x), exchange(topk_weights), exchange(topk_ids), self.expert_map(x.device),
                          self.local, state=(tokens, send_split, recv_split, x.shape[0]))

    def finalize(self, expert_out, dispatched):
        tokens, send_split, recv_split, num_tokens = dispatched.state
        back = expert_out.new_empty((sum(send_split), expert_out.shape[1]))
        dist.all_to_all_single(back, expert_out.contiguous(), send_split, recv_split, group=self.group)
        out = torch.zeros((num_tokens, expert_out.shape[1]), dtype=torch.float32, device=expert_out.device)
        out.index_add_(0, tokens, back.float())
        return out.to(expert_out.dtype)
