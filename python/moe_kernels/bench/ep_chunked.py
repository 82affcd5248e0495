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


# Record sizes of DeepSeek-V3's rows (H=7168, K=8): fp8 per token 7248 (16-byte aligned only), fp8
# per 128-group 7456 (32), the per-token record padded to 256 bytes 7424, bf16 14400 (64), and the
# bf16 combine row 14336 (2048).
ALIGN_RECORD_BYTES = (7248, 7424, 7456, 14400, 14336)


def alignment(args, rank, world, device, *, route, timed, all_ranks):
    """Raw all_to_all_single of the variable splits of a real routing, at several record sizes,
    against equal splits of the same bytes: does NCCL slow down on rank segments that start at
    offsets aligned to 16 bytes only (docs/ep.md, the fp8 variable mode's 0.40 of raw)?
    -> rows: T, record_bytes, offset_align (largest power of two dividing the record), MB, us
    (variable splits), equal_us, variable/equal."""
    import torch.distributed as dist
    from moe_kernels.ops.ep import ep_dispatch_plan

    rows = []
    for T in args.tokens:
        _, ids = route(T, args, device, seed=1000 * T + rank)
        _, counts, _ = ep_dispatch_plan(ids, args.experts // world, world, -1)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts)
        send_n, recv_n = counts.tolist(), recv.tolist()
        for rb in ALIGN_RECORD_BYTES:
            src = torch.empty(sum(send_n) * rb, dtype=torch.uint8, device=device)
            dst = torch.empty(sum(recv_n) * rb, dtype=torch.uint8, device=device)
            ss, rs = [n * rb for n in send_n], [n * rb for n in recv_n]
            t_var = timed(lambda: dist.all_to_all_single(dst, src, rs, ss), args, device)
            total = all_ranks(sum(ss), device, dist.ReduceOp.MAX)
            split = int(total // world) // 256 * 256
            esrc = torch.empty(world * split, dtype=torch.uint8, device=device)
            edst = torch.empty_like(esrc)
            t_eq = timed(lambda: dist.all_to_all_single(edst, esrc), args, device)
            rows.append({"T": T, "record_bytes": rb, "offset_align": rb & -rb, "MB": sum(ss) / 1e6,
                         "us": t_var * 1e6, "equal_us": t_eq * 1e6, "variable/equal": t_var / t_eq})
    return rows


ALIGN_COLUMNS = ["T", "record_bytes", "offset_align", "MB", "us", "equal_us", "variable/equal"]
