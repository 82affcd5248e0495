"""Stage `chunked` of ep_dist (scripts/ep-check.sh): the whole EP layer with ChunkedAllToAll (the
exchange pipelined with the experts over token chunks) against the unchunked AllToAll and the
single-GPU layer, DeepSeek-V3 shapes, T tokens per rank, FP8 experts with per-expert and with
128x128 block scales, fp8 dispatch, capacity and variable modes, num_chunks 1, 2, 4 and the
automatic rule. Per row: time eager, the capacity mode also replayed from a CUDA graph (the same
layer captured, no host sync), and whether the chunked output equals the unchunked one bit for bit
(``bit_equal``; False is expected only where a chunk's rows per expert fall in another GEMM tile
class than the whole layer's, see moe_kernels.modular.chunked).

Targets (issue 21): ep/single <= 1.0 at T=4096 and <= 0.8 at T <= 1024.
"""

import torch

from moe_kernels.modular import AllToAll, ChunkedAllToAll, CutlassFp8Experts, MoELayer, SingleGpu

FP8 = torch.float8_e4m3fn
CHUNKS = (1, 2, 4, "auto")


def chunked(args, rank, world, device, *, fp8_weights, block_scales, route, timed, timed_graph, all_ranks):
    """-> rows: experts, T, mode, chunks (asked and used), ep_us, unchunked_us, single_us, ep/single,
    ep/unchunked, graph_us (capacity), unchunked_graph_us, bit_equal."""
    E, H, I = args.experts, args.hidden, args.inter
    w1, s1 = fp8_weights(E, 2 * I, H, device, 7)
    w2, s2 = fp8_weights(E, H, I, device, 8)
    local = E // world
    mine = slice(rank * local, (rank + 1) * local)
    kinds = {"per_expert": (s1, s2), "block": (block_scales(s1, 2 * I, H), block_scales(s2, H, I))}
    rows = []
    for kind, (sc1, sc2) in kinds.items():
        full = CutlassFp8Experts(w1, w2, sc1, sc2)
        part = CutlassFp8Experts(w1[mine], w2[mine], sc1[mine], sc2[mine])
        group = 128 if kind == "block" else None
        for T in args.tokens:
            weights, ids = route(T, args, device, seed=1000 * T + rank)
            x = torch.randn(T, H, device=device).to(torch.bfloat16)
            single = MoELayer(None, SingleGpu(E), full)
            t_single = timed(lambda: single.forward_routed(x, weights, ids), args, device)
            for capacity in (T, None):
                graph = capacity is not None and device.type == "cuda"  # graphs: fixed capacity on CUDA only
                mode = "capacity" if capacity else "variable"
                plain = MoELayer(None, AllToAll(E, dispatch_dtype=FP8, capacity=capacity, quant_group_size=group),
                                 part)
                want = plain.forward_routed(x, weights, ids)
                t_plain = timed(lambda: plain.forward_routed(x, weights, ids), args, device)
                g_plain = timed_graph(lambda: plain.forward_routed(x, weights, ids), args, device) if graph else None
                for n in CHUNKS:
                    pf = ChunkedAllToAll(E, dispatch_dtype=FP8, capacity=capacity, quant_group_size=group,
                                         num_chunks=None if n == "auto" else n)
                    ep = MoELayer(None, pf, part)
                    got = ep.forward_routed(x, weights, ids)
                    equal = all_ranks(0.0 if torch.equal(got, want) else 1.0, device) == 0.0
                    t_ep = timed(lambda: ep.forward_routed(x, weights, ids), args, device)
                    g_ep = timed_graph(lambda: ep.forward_routed(x, weights, ids), args, device) if graph else None
                    if capacity:
                        pf.check_overflow()
                    rows.append({"experts": kind, "T": T, "mode": mode, "chunks": str(n),
                                 "used": pf.chunks_for(T, ids.shape[1], device), "ep_us": t_ep * 1e6,
                                 "unchunked_us": t_plain * 1e6, "single_us": t_single * 1e6,
                                 "ep/single": t_ep / t_single, "ep/unchunked": t_ep / t_plain,
                                 "graph_us": None if g_ep is None else g_ep * 1e6,
                                 "unchunked_graph_us": None if g_plain is None else g_plain * 1e6,
                                 "graph/single": None if g_ep is None else g_ep / t_single,
                                 "bit_equal": equal})
    return rows


COLUMNS = ["experts", "T", "mode", "chunks", "used", "ep_us", "unchunked_us", "single_us", "ep/single", "ep/unchunked",
           "graph_us", "unchunked_graph_us", "graph/single", "bit_equal"]
