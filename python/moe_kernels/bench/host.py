"""Host overhead of every op: eager wall time per call at T = 1 on tiny shapes, on the CPU and (where
there is one) on CUDA, median over many calls. What it measures is the glue around the kernels: the
dispatcher, argument checks, allocation and the launch (issue 16: the stable-ABI port, whose boxed
calls cost host time on every call, must not make any op more than 1 us slower).

Each call is timed alone with time.perf_counter_ns, without synchronizing: a CUDA op returns once
its kernels are queued, so the time is the host's, not the GPU's (the queue is drained outside the
timed calls every SYNC_EVERY calls, so that it never fills and blocks a launch). On the CPU the
time includes the reference computation on the tiny shapes (a few microseconds at most; the same
before and after a change of the glue). Ops are timed in turns, ROUNDS rounds of CALLS calls each,
so that drift of a shared machine falls on every op alike; the row's `us` is the median of all
calls through torch.ops.moe_kernels.<op>.default (the dispatcher and the glue alone), `wrapper_us`
the median through the Python function users call (moe_kernels.<op>: its checks included), p10/p90
the spread. Ops that this build lacks (the 4-bit layers before branch fp4, the activation keywords
before branch act) get a row saying so. The CPU rows run with one intra-op thread (the number is
recorded), so that a tiny call is not spread over threads that other processes hold.

Shapes: E = 8 experts, top-2, H = 256, I = 128 for the data movers; the GEMM and the layers (whose
CPU references are plain loops, ~3 ns a multiply-add) on H = 64, I = 32 (block mode: H = I = 128,
its least), so that the reference's arithmetic stays small beside the glue.
"""

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import moe_kernels

from . import features, fourbit

TOKENS = [1]
QUICK_TOKENS = [1]
CPU_OK = True  # runs without a GPU (the CPU rows)
CALLS = 400
ROUNDS = 5
WARMUP = 50
SYNC_EVERY = 100
E, K, H, I = 8, 2, 256, 128
FP8 = torch.float8_e4m3fn


def steps(ctx) -> int:
    return 2 if torch.cuda.is_available() else 1


def cases(device: str) -> Dict[str, Tuple[Optional[Callable], Callable, str]]:
    """Op -> (torch.ops overload call, wrapper call, note) on `device`, or (None, None, why) where
    this build cannot run it. Every call has all its arguments positional, as the schema lists them."""
    d = device
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(d)

    ops = torch.ops.moe_kernels
    x = rnd(1, H, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5]], dtype=torch.int32, device=d)
    w = torch.rand(1, K, generator=g).to(d)
    scale = torch.tensor([0.02], device=d)
    permuted, offsets, inv, _ = moe_kernels.moe_permute(x, ids, E)
    h = rnd(K, 2 * I, dtype=torch.bfloat16)
    scores = rnd(1, E)
    epr, world = E // 2, 2
    _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, E)
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, world)
    n_records = K  # capacity -1: one record per (token, choice) kept, here every choice
    records = moe_kernels.ep_pack_records(x, None, w, ids, slots, counts, n_records, epr)
    Hs, Is, Hb = 64, 32, 128  # the GEMM and layer shapes (per-expert and block mode)
    xs, xb = rnd(1, Hs, dtype=torch.bfloat16), rnd(1, Hb, dtype=torch.bfloat16)
    a8 = rnd(K, Hs).to(FP8)
    b8 = rnd(E, 2 * Is, Hs).mul(0.05).to(FP8)
    w1, w2 = rnd(E, 2 * Is, Hs).mul(0.05).to(FP8), rnd(E, Hs, Is).mul(0.05).to(FP8)
    wb1, wb2 = rnd(E, 2 * Hb, Hb).mul(0.05).to(FP8), rnd(E, Hb, Hb).mul(0.05).to(FP8)
    s_e = torch.ones(E, device=d)
    blk1, blk2 = torch.ones(E, 2, 1, device=d), torch.ones(E, 1, 1, device=d)
    gemm_offsets = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2], dtype=torch.int64, device=d)

    table = {
        "moe_sort_tokens": ((ids, E, None, -1, 0), moe_kernels.moe_sort_tokens),
        "moe_permute": ((x, ids, E, None, -1, 0, None), moe_kernels.moe_permute),
        "moe_unpermute": ((permuted, w, inv), moe_kernels.moe_unpermute),
        "compute_problem_sizes": ((offsets, I, H, False), moe_kernels.compute_problem_sizes),
        "scaled_fp8_quant": ((x, scale, False), moe_kernels.scaled_fp8_quant),
        "per_token_group_quant_fp8": ((x, 128, False), moe_kernels.per_token_group_quant_fp8),
        "silu_and_mul_quant_fp8": ((h, scale, False, 0), moe_kernels.silu_and_mul_quant_fp8),
        "ep_pre_reorder": ((x, src2dst, ids, 0, epr - 1, None, None), moe_kernels.ep_pre_reorder),
        "ep_post_reorder": ((permuted, src2dst, ids, w, 0, epr - 1), moe_kernels.ep_post_reorder),
        "ep_dispatch_plan": ((ids, epr, world, -1), moe_kernels.ep_dispatch_plan),
        "ep_pack_records": ((x, None, w, ids, slots, counts, n_records, epr, -1), moe_kernels.ep_pack_records),
        "ep_unpack_records": ((records, H, torch.bfloat16, 0, K), moe_kernels.ep_unpack_records),
        "moe_fused_gate": ((scores, None, 1, 1, K, "softmax", True, 0, 1.0, False), moe_kernels.moe_fused_gate),
        "cutlass_grouped_gemm_fp8": ((a8, b8, scale, s_e, gemm_offsets, None), moe_kernels.cutlass_grouped_gemm_fp8),
        "grouped_gemm_fp8_configs": ((), moe_kernels.grouped_gemm_fp8_configs),
        "cutlass_moe_fp8": ((xs, w1, w2, w, ids, s_e, s_e, scale, scale, False, False, None, -1, False),
                            moe_kernels.cutlass_moe_fp8),
        "cutlass_moe_fp8 block": ((xb, wb1, wb2, w, ids, blk1, blk2, None, None, False, False, None, -1, False),
                                  moe_kernels.cutlass_moe_fp8),
    }
    out = {}
    for name, (args, wrapper) in table.items():
        op = getattr(ops, name.split()[0]).default
        out[name] = (lambda op=op, args=args: op(*args), lambda f=wrapper, args=args: f(*args), "")

    # This wave's additions, through their Python functions (keywords), where the build has them.
    act = {"activation": "swigluoai", "gate_up_interleaved": True}
    bias = {"w1_bias": rnd(E, 2 * Is), "w2_bias": rnd(E, Hs)}
    why = features.missing("cutlass_moe_fp8", *act, *bias, where="branch act")
    fp8_args = (xs, w1, w2, w, ids, s_e, s_e, scale, scale)
    out["cutlass_moe_fp8 swigluoai+bias"] = (None, None, why) if why else (
        None, lambda: moe_kernels.cutlass_moe_fp8(*fp8_args, **act, **bias), "wrapper only (keywords)")
    why = features.missing("silu_and_mul_quant_fp8", *act, where="branch act")
    out["silu_and_mul_quant_fp8 swigluoai"] = (None, None, why) if why else (
        None, lambda: moe_kernels.silu_and_mul_quant_fp8(h, scale, **act), "wrapper only (keywords)")
    why = features.missing("cutlass_moe_mxfp4", where="branch fp4")
    if why:
        out["cutlass_moe_mxfp4"] = (None, None, why)
    else:
        m1, ms1 = fourbit.mxfp4_weight(E, 2 * Is, Hs, d)
        m2, ms2 = fourbit.mxfp4_weight(E, Hs, Is, d)
        out["cutlass_moe_mxfp4"] = (None, lambda: moe_kernels.cutlass_moe_mxfp4(xs, m1, m2, w, ids, ms1, ms2),
                                    "wrapper only (keywords)")
    for gemm_name, make, k_dim, a in (("grouped_gemm_mxfp4", fourbit.mxfp4_weight, Hs, rnd(K, Hs, dtype=torch.bfloat16)),
                                      ("grouped_gemm_w4a8", fourbit.int4_weight, Hb, rnd(K, Hb).to(FP8))):
        why = features.missing(gemm_name, where="branch fp4")
        if why:
            out[gemm_name] = (None, None, why)
            continue
        gw, gs = make(E, 2 * Is, k_dim, d)
        a_scale = None if a.dtype == torch.bfloat16 else scale
        out[gemm_name] = (None, lambda f=features.function(gemm_name), a=a, gw=gw, gs=gs, a_scale=a_scale:
                          fourbit.call_gemm(f, a, gw, gs, gemm_offsets, a_scale), "wrapper only")
    why = features.missing("cutlass_moe_w4a8", where="branch fp4")
    if why:
        out["cutlass_moe_w4a8"] = (None, None, why)
    else:
        q1, qs1 = fourbit.int4_weight(E, 2 * Hb, Hb, d)  # 1x128 groups: K a multiple of 128
        q2, qs2 = fourbit.int4_weight(E, Hb, Hb, d)
        out["cutlass_moe_w4a8"] = (None, lambda: moe_kernels.cutlass_moe_w4a8(xb, q1, q2, w, ids, qs1, qs2, scale, scale),
                                   "wrapper only (keywords)")
    return out


def _time_calls(fn: Callable, calls: int, device: str) -> List[float]:
    """Wall microseconds of each of `calls` eager calls of fn."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(calls):
        if i % SYNC_EVERY == 0:
            sync()
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    sync()
    return times


def measure(device: str, table: dict, calls: int = CALLS, rounds: int = ROUNDS) -> List[dict]:
    """One row per op of `table` (cases()) on `device`: median host microseconds per call (through
    torch.ops and through the wrapper)."""
    rows, samples, notes = [], {}, {}
    for name, (op_call, wrapper_call, note) in table.items():
        notes[name] = note
        runners = {"op": op_call, "wrapper": wrapper_call}
        for kind, fn in runners.items():
            if fn is None:
                continue
            try:
                for _ in range(WARMUP):
                    fn()
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001  (reported in the row, the other ops still run)
                notes[name] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:100] if str(e).strip() else ''}"
                samples.pop((name, "op"), None)
                break
            samples[(name, kind)] = []
    round_medians = {key: [] for key in samples}
    for _ in range(rounds):
        for (name, kind), got in samples.items():
            op_call, wrapper_call, _ = table[name]
            t = _time_calls(op_call if kind == "op" else wrapper_call, calls, device)
            got += t
            round_medians[(name, kind)].append(statistics.median(t))
    for name, note in notes.items():
        op_t, wr_t = samples.get((name, "op")), samples.get((name, "wrapper"))
        main = op_t or wr_t
        r = {"op": f"host_{device}", "model": name, "T": 1, "device": device,
             "us": statistics.median(main) if main else None,
             "wrapper_us": statistics.median(wr_t) if wr_t else None,
             "p10_us": _quantile(main, 0.1) if main else None, "p90_us": _quantile(main, 0.9) if main else None,
             "calls": len(main) if main else 0, "timed_through": "torch.ops" if op_t else ("wrapper" if wr_t else None),
             # Per-round medians: their spread says how far two runs on this machine can differ.
             "round_medians_us": round_medians.get((name, "op" if op_t else "wrapper")),
             "peers_us": {}, "speedup": {}}
        if note:
            r["note"] = note
        if not main:
            r["error"] = note or "not run"
        rows.append(r)
    return rows


def _quantile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_device(device: str, calls: int = CALLS, rounds: int = ROUNDS) -> List[dict]:
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        rows = measure(device, cases(device), calls, rounds)
    finally:
        torch.set_num_threads(threads)
    for r in rows:
        r["intra_op_threads"] = 1 if device == "cpu" else threads
    return rows


def run(ctx) -> list:
    quick = getattr(ctx, "quick", False)
    calls, rounds = (CALLS // 2, 3) if quick else (CALLS, ROUNDS)
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        if ctx is not None and ctx.progress:
            ctx.progress(f"host {device}")
        rows += run_device(device, calls, rounds)
    return rows
