"""Expert parallelism over torch.distributed (one process per GPU, launched by torchrun; see
scripts/ep-check.sh): (a) a correctness check of the EP layer against the single-device layer,
(b) dispatch + combine of AllToAll against two raw all_to_all_single calls of the same bytes, per
dispatch dtype and mode, (c) the whole EP layer with FP8 experts against the single-GPU layer, and
(graph) the fixed-capacity dispatch + combine captured in a CUDA graph against the raw calls
captured alike.

DeepSeek-V3 routing by default: E=256 experts, top-8 of 8 groups (4 kept, sigmoid with a bias),
H=7168, I=2048; T tokens per rank. Bytes counted per rank: dispatch = records sent x record bytes
(row + scales + weights + ids), combine = records x H x 2 (bf16 partial outputs); the raw
baseline moves the same bytes (averaged over ranks) in equal splits, in the same run.

    torchrun --nproc_per_node=2 -m moe_kernels.bench.ep_dist            # GPUs, NCCL (scripts/ep-check.sh)
    torchrun --nproc_per_node=2 -m moe_kernels.bench.ep_dist --backend gloo --device cpu --small
Prints a table last; rank 0 writes JSON to --results (bench/results/ by default).
"""

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import moe_kernels
from moe_kernels.bench.report import environment as base_environment
from moe_kernels.modular import AllToAll, CapacityOverflowError, CutlassFp8Experts, MoELayer, SingleGpu, TorchExperts

FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------- setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="tokens per rank (default: 128 1024 4096)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--groups", type=int, default=8, help="expert groups of the router (DeepSeek-V3: 8, 4 kept)")
    p.add_argument("--topk-groups", type=int, default=4)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048, help="expert intermediate size I")
    p.add_argument("--iters", type=int, default=20, help="timed calls (--small: 3)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--stages", default="check,comm,layer,graph",
                   help="comma-separated subset of check,comm,align,layer,chunked,graph (graph: CUDA only, run "
                        "last; chunked: the layer with ChunkedAllToAll, align: raw exchange by record size; "
                        "bench/ep_chunked.py)")
    p.add_argument("--small", action="store_true",
                   help="tiny shapes (E=16, H=256, I=128, T in {8, 32}, 3 iterations): to test the script on CPU")
    p.add_argument("--results", default="bench/results")
    a = p.parse_args(argv)
    if a.small:
        a.experts, a.hidden, a.inter, a.iters, a.warmup, a.groups, a.topk_groups = 16, 256, 128, 3, 1, 4, 2
    if a.tokens is None:
        a.tokens = [8, 32] if a.small else [128, 1024, 4096]
    return a


def init(args):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300),
                            **({"device_id": device} if args.device == "cuda" else {}))
    return rank, world, device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_ranks(value: float, device, op=dist.ReduceOp.MAX) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def timed(fn, args, device) -> float:
    """Seconds per call of fn: warm-up, a barrier, `iters` calls back to back timed with CUDA events
    (wall clock on the CPU); the slowest rank's time (a collective ends when its last rank ends)."""
    for _ in range(args.warmup):
        fn()
    sync(device)
    dist.barrier()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / args.iters
    else:
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        seconds = (time.perf_counter() - t0) / args.iters
    return all_ranks(seconds, device)


def route(T, args, device, seed):
    """DeepSeek-V3 routing (grouped top-k, sigmoid with a bias) of random scores."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.randn(T, args.experts, generator=g).to(device)
    bias = (torch.randn(args.experts, generator=g) * 0.1).to(device)
    return moe_kernels.moe_fused_gate(scores, bias, args.groups, args.topk_groups, args.topk, "sigmoid", True, 0,
                                      1.0, False)


def fp8_weights(E, N, Kd, device, seed):
    """Random e4m3 weights [E, N, Kd] (one expert at a time: no bf16 copy of all of them) and scales [E]
    that give the dequantized weights a magnitude of about 1/sqrt(Kd)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.empty(E, N, Kd, dtype=FP8, device=device)
    for e in range(E):
        w[e] = torch.randn(N, Kd, generator=g, device=device).clamp(-4, 4).to(FP8)
    return w, torch.full((E,), Kd ** -0.5, dtype=torch.float32, device=device)


def block_scales(per_expert, N, Kd):
    """[E] per-expert scales as [E, N/128, K/128] block scales (the same value in every block)."""
    return per_expert.view(-1, 1, 1).expand(-1, N // 128, Kd // 128).contiguous()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------- (a) correctness

def check(args, rank, world, device):
    """The EP layer against the single-device layer with the same experts, every dispatch dtype and
    mode, FP8 (CUTLASS) and torch experts; capacity overflow raises. -> rows for the table."""
    T, E, K, H, I = 64, 16, 4, 256, 128
    if E % world:
        E = world * 4
    gen = torch.Generator().manual_seed(100 + rank)
    x = (torch.randn(T, H, generator=gen) * torch.rand(T, 1, generator=gen).add(0.1)).to(torch.bfloat16).to(device)
    logits = torch.randn(T, E, generator=gen).to(device)

    def router(lg):
        w, ids = torch.softmax(lg.float(), dim=-1).topk(K, dim=-1)
        return (w / w.sum(-1, keepdim=True)).contiguous(), ids.to(torch.int32).contiguous()

    w1, s1 = fp8_weights(E, 2 * I, H, device, 7)   # the same on every rank (seeded generator per device)
    w2, s2 = fp8_weights(E, H, I, device, 8)
    local = E // world
    mine = slice(rank * local, (rank + 1) * local)
    fp8_full = CutlassFp8Experts(w1, w2, s1, s2)
    fp8_mine = CutlassFp8Experts(w1[mine].contiguous(), w2[mine].contiguous(), s1[mine].contiguous(),
                                 s2[mine].contiguous())
    # Block-scaled experts (128x128 weight blocks, 1x128 activation groups): the same weights with
    # one scale per block.
    b1, b2 = block_scales(s1, 2 * I, H), block_scales(s2, H, I)
    block_full = CutlassFp8Experts(w1, w2, b1, b2)
    block_mine = CutlassFp8Experts(w1[mine], w2[mine], b1[mine], b2[mine])
    deq1, deq2 = w1.float() * s1.view(-1, 1, 1), w2.float() * s2.view(-1, 1, 1)
    rows = []
    for experts in ("cutlass_fp8", "cutlass_block", "torch"):
        for dispatch in (None, FP8):
            for capacity in (None, T):
                name = f"{experts}/{'fp8' if dispatch else 'bf16'}/{'capacity' if capacity else 'variable'}"
                try:
                    group = 128 if dispatch and experts == "cutlass_block" else None
                    pf = AllToAll(E, dispatch_dtype=dispatch, capacity=capacity, quant_group_size=group)
                    if experts == "cutlass_fp8":
                        got = MoELayer(router, pf, fp8_mine)(x, logits)
                        want = MoELayer(router, SingleGpu(E), fp8_full)(x, logits)
                    elif experts == "cutlass_block":
                        got = MoELayer(router, pf, block_mine)(x, logits)
                        want = MoELayer(router, SingleGpu(E), block_full)(x, logits)
                    else:
                        got = MoELayer(router, pf, TorchExperts(deq1[mine], deq2[mine]))(x, logits)
                        xin = x
                        if dispatch == FP8:  # the same per-token quantization on the reference side
                            q, s = moe_kernels.scaled_fp8_quant(x, None, True)
                            xin = (q.float() * s).to(torch.bfloat16)
                        want = MoELayer(router, SingleGpu(E), TorchExperts(deq1, deq2))(xin, logits)
                    if capacity:
                        pf.check_overflow()
                    err = all_ranks(rel_err(got, want), device)
                    ok = err < 1e-2
                except Exception:
                    traceback.print_exc()
                    err, ok = float("nan"), False
                ok = all_ranks(0.0 if ok else 1.0, device) == 0.0
                rows.append({"case": name, "rel_err": err, "ok": ok})
    # Overflow: capacity 1 < tokens per rank pair on every rank. finalize raises at the first
    # host-visible point: the first call on CPU; on CUDA the next call after the counter's copy
    # landed (the synchronize makes that deterministic here); check_overflow() raises at once.
    raised_at, checked = None, False
    try:
        pf = AllToAll(E, dispatch_dtype=FP8, capacity=1)
        ep = MoELayer(router, pf, fp8_mine)
        for call in range(2):
            try:
                ep(x, logits)
            except CapacityOverflowError as e:
                raised_at = call if "dropped" in str(e) else None
                break
            sync(device)
        try:
            pf.check_overflow()
        except CapacityOverflowError:
            checked = True
    except Exception:
        traceback.print_exc()
    ok = checked and raised_at == (1 if device.type == "cuda" else 0)
    ok = all_ranks(0.0 if ok else 1.0, device) == 0.0
    rows.append({"case": "capacity overflow raises", "rel_err": None, "ok": ok})
    return rows


# ---------------------------------------------------------------- (b) dispatch + combine vs raw

def comm(args, rank, world, device):
    rows = []
    H, K = args.hidden, args.topk
    for T in args.tokens:
        weights, ids = route(T, args, device, seed=1000 * T + rank)
        x = torch.randn(T, H, device=device).to(torch.bfloat16)
        # Partial outputs of the experts (bf16, one row per received record): at most W * T records.
        y = torch.randn(world * T, H, device=device).to(torch.bfloat16)
        for dispatch in (None, FP8):
            for capacity in (None, T):
                pf = AllToAll(args.experts, dispatch_dtype=dispatch, capacity=capacity)
                state = {}

                def roundtrip():
                    d = pf.prepare(x, weights, ids)
                    state["sent"] = d.state.num_send
                    pf.finalize(y[:d.x.shape[0]], d)

                ours = timed(roundtrip, args, device)
                rec_bytes = moe_kernels.ep_record_bytes(H, FP8 if dispatch else torch.bfloat16, 1 if dispatch else 0, K)
                disp = all_ranks(state["sent"] * rec_bytes, device, dist.ReduceOp.SUM) / world
                comb = all_ranks(state["sent"] * H * 2, device, dist.ReduceOp.SUM) / world
                raw = raw_pair(args, world, device, disp, comb)
                rows.append({
                    "T": T, "dispatch": "fp8" if dispatch else "bf16", "mode": "capacity" if capacity else "variable",
                    "records_per_rank": disp / rec_bytes, "dispatch_MB": disp / 1e6, "combine_MB": comb / 1e6,
                    "us": ours * 1e6, "raw_us": raw * 1e6, "GB/s": (disp + comb) / ours / 1e9,
                    "raw_GB/s": (disp + comb) / raw / 1e9, "frac_raw": raw / ours, "x_raw": ours / raw,
                })
                if capacity:
                    pf.check_overflow()  # capacity = T never overflows
    return rows


def raw_pair(args, world, device, dispatch_bytes, combine_bytes):
    """Two all_to_all_single calls in equal splits moving the given bytes per rank."""
    def buf(nbytes):
        split = max(16, int(nbytes / world) // 16 * 16)
        return torch.empty(world * split, dtype=torch.uint8, device=device)
    s1, r1, s2, r2 = buf(dispatch_bytes), buf(dispatch_bytes), buf(combine_bytes), buf(combine_bytes)

    def two_calls():
        dist.all_to_all_single(r1, s1)
        dist.all_to_all_single(r2, s2)
    return timed(two_calls, args, device)


def graphs(args, rank, world, device):
    """Fixed capacity under CUDA graphs (its point: no host sync, capturable): dispatch + combine
    captured once per T and replayed, against the two raw calls captured the same way. Run last:
    a capture that fails can leave the CUDA context unusable."""
    rows = []
    H, K = args.hidden, args.topk
    for T in args.tokens:
        weights, ids = route(T, args, device, seed=1000 * T + rank)
        x = torch.randn(T, H, device=device).to(torch.bfloat16)
        y = torch.randn(world * T, H, device=device).to(torch.bfloat16)
        for dispatch in (None, FP8):
            pf = AllToAll(args.experts, dispatch_dtype=dispatch, capacity=T)
            sent = {}

            def roundtrip():
                d = pf.prepare(x, weights, ids)
                sent["n"] = d.state.num_send
                pf.finalize(y[:d.x.shape[0]], d)

            ours = timed_graph(roundtrip, args, device)
            pf.check_overflow()
            rec_bytes = moe_kernels.ep_record_bytes(H, FP8 if dispatch else torch.bfloat16, 1 if dispatch else 0, K)
            disp, comb = sent["n"] * rec_bytes, sent["n"] * H * 2  # equal on every rank (W * T records)
            def buf(nbytes):
                return torch.empty(nbytes, dtype=torch.uint8, device=device)
            s1, r1, s2, r2 = buf(disp), buf(disp), buf(comb), buf(comb)

            def two_calls():
                dist.all_to_all_single(r1, s1)
                dist.all_to_all_single(r2, s2)
            raw = timed_graph(two_calls, args, device)
            rows.append({"T": T, "dispatch": "fp8" if dispatch else "bf16", "mode": "capacity+graph",
                         "records_per_rank": float(sent["n"]), "dispatch_MB": disp / 1e6, "combine_MB": comb / 1e6,
                         "us": ours * 1e6, "raw_us": raw * 1e6, "GB/s": (disp + comb) / ours / 1e9,
                         "raw_GB/s": (disp + comb) / raw / 1e9, "frac_raw": raw / ours, "x_raw": ours / raw})
    return rows


def timed_graph(fn, args, device) -> float:
    """Seconds per call of fn captured in a CUDA graph (after eager warm-up), replayed `iters` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(1, args.warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    sync(device)
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    sync(device)
    dist.barrier()
    return timed(graph.replay, args, device)


# ---------------------------------------------------------------- (c) the whole layer

def layer(args, rank, world, device):
    """CutlassFp8Experts with per-expert weight scales and with 128x128 block scales (DeepSeek-V3's
    checkpoint format; the dispatch then quantizes per 1x128 group): EP over the ranks against all
    experts on one GPU, each rank's T tokens."""
    E, H, I = args.experts, args.hidden, args.inter
    w1, s1 = fp8_weights(E, 2 * I, H, device, 7)
    w2, s2 = fp8_weights(E, H, I, device, 8)
    local = E // world
    mine = slice(rank * local, (rank + 1) * local)  # leading-dim slices of contiguous tensors: contiguous
    kinds = {"per_expert": (s1, s2), "block": (block_scales(s1, 2 * I, H), block_scales(s2, H, I))}
    rows = []
    for kind, (sc1, sc2) in kinds.items():
        full = CutlassFp8Experts(w1, w2, sc1, sc2)
        part = CutlassFp8Experts(w1[mine], w2[mine], sc1[mine], sc2[mine])
        for T in args.tokens:
            weights, ids = route(T, args, device, seed=1000 * T + rank)
            x = torch.randn(T, H, device=device).to(torch.bfloat16)
            single = MoELayer(None, SingleGpu(E), full)
            t_single = timed(lambda: single.forward_routed(x, weights, ids), args, device)
            for dispatch in (None, FP8):
                for capacity in (None, T):
                    group = 128 if dispatch and kind == "block" else None
                    pf = AllToAll(E, dispatch_dtype=dispatch, capacity=capacity, quant_group_size=group)
                    ep = MoELayer(None, pf, part)
                    t_ep = timed(lambda: ep.forward_routed(x, weights, ids), args, device)
                    if capacity:
                        pf.check_overflow()
                    rows.append({"experts": kind, "T": T, "dispatch": "fp8" if dispatch else "bf16",
                                 "mode": "capacity" if capacity else "variable", "ep_us": t_ep * 1e6,
                                 "single_us": t_single * 1e6, "ep/single": t_ep / t_single})
    return rows


# ---------------------------------------------------------------- report

def print_table(title, rows, columns):
    print(f"\n{title}")
    if not rows:
        print("  (none)")
        return

    def fmt(v):
        if isinstance(v, float):
            return "nan" if v != v else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")
        return "" if v is None else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def environment(args, world, device):
    env = base_environment()
    env.update(backend=args.backend, world_size=world, nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(device), nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        env["device"] = "cpu"
    return env


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init(args)
    stages = [st for st in ("check", "comm", "align", "layer", "chunked", "graph") if st in args.stages.split(",")]
    if device.type != "cuda" and "graph" in stages:
        stages.remove("graph")
    results = {"args": vars(args), "errors": {}}
    runs = {"check": check, "comm": comm, "layer": layer, "graph": graphs, "chunked": chunked_stage,
            "align": align_stage}
    try:
        for stage in stages:
            if stage == "graph" and rank == 0:
                report(results)  # before the captures: a capture that hangs keeps the table
            # A stage that raises is recorded and the next one runs (every rank runs the same code,
            # so they fail alike); the JSON is rewritten after each stage, so a later failure
            # keeps the earlier results.
            try:
                results[stage] = runs[stage](args, rank, world, device)
            except Exception:
                results["errors"][stage] = traceback.format_exc()
                print(f"[rank {rank}] stage {stage} failed:\n{results['errors'][stage]}", flush=True)
            if rank == 0:
                save(args, results, world, device)
        if rank == 0:
            if "graph" in stages:
                print_table("(graph) fixed capacity, dispatch + combine captured in a CUDA graph vs the raw calls "
                            "captured alike", results.get("graph", []), COMM_COLUMNS)
                print_outcome(results)
            else:
                report(results)
    finally:
        dist.destroy_process_group()
    check_failed = "check" in stages and not all(r["ok"] for r in results.get("check", [{"ok": False}]))
    return 1 if check_failed or results["errors"] else 0


def save(args, results, world, device):
    results["env"] = environment(args, world, device)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = results["env"]["device"].replace(" ", "_")
    path = out / f"bench_ep_dist_{name}_x{world}_{results['env']['date'][:10]}.json"
    path.write_text(json.dumps(results, indent=1))
    results["path"] = str(path)


COMM_COLUMNS = ["T", "dispatch", "mode", "records_per_rank", "dispatch_MB", "combine_MB", "us", "raw_us", "GB/s",
                "raw_GB/s", "frac_raw", "x_raw"]


def report(results):
    print(f"\nsaved {results.get('path')}")
    print_table("(a) EP layer vs single device (rel err < 1e-2)", results.get("check", []), ["case", "rel_err", "ok"])
    print_table("(c) whole layer, CutlassFp8Experts: EP vs single GPU (same tokens per rank)",
                results.get("layer", []), ["experts", "T", "dispatch", "mode", "ep_us", "single_us", "ep/single"])
    print_table("(b) dispatch + combine vs two raw all_to_all_single of the same bytes (targets: frac_raw >= 0.6 "
                "at T=4096; capacity x_raw <= 2 at T=128; fp8 dispatch_MB ~ half of bf16)",
                results.get("comm", []), COMM_COLUMNS)
    if "align" in results:
        from moe_kernels.bench import ep_chunked
        print_table("(align) raw all_to_all_single, variable splits of a real routing by record size vs equal "
                    "splits", results["align"], ep_chunked.ALIGN_COLUMNS)
    if "chunked" in results:
        from moe_kernels.bench import ep_chunked
        print_table("(chunked) EP layer with ChunkedAllToAll vs unchunked and single GPU (targets: ep/single <= 1.0 "
                    "at T=4096, <= 0.8 at T <= 1024)", results["chunked"], ep_chunked.COLUMNS)
    print_outcome(results)


def chunked_stage(args, rank, world, device):
    from moe_kernels.bench import ep_chunked
    return ep_chunked.chunked(args, rank, world, device, fp8_weights=fp8_weights, block_scales=block_scales,
                              route=route, timed=timed, timed_graph=timed_graph, all_ranks=all_ranks)


def align_stage(args, rank, world, device):
    from moe_kernels.bench import ep_chunked
    return ep_chunked.alignment(args, rank, world, device, route=route, timed=timed, all_ranks=all_ranks)


def print_outcome(results):
    for stage, err in results["errors"].items():
        print(f"\nSTAGE {stage} FAILED: {err.strip().splitlines()[-1]}")
    if "check" in results:
        print("\nCHECK " + ("PASSED" if all(r["ok"] for r in results["check"]) else "FAILED"))


if __name__ == "__main__":
    sys.exit(main())
