"""Soak: many expert-layer calls with random shapes and routings, checking that nothing fails, that
the allocator's live memory stays flat, and that a sample equals the CPU reference.

  python3 scripts/soak.py                        # CUDA, 10,000 calls (SOAK_CALLS lowers it)
  python3 scripts/soak.py --device cpu --calls 20 --max-tokens 32   # the script's logic on the CPU

Each call draws a weight set (a few layer shapes, built once), a weight format and mode (every one
this build has: FP8 with static per-tensor, dynamic per-tensor, dynamic per-token, per-channel,
128x128 block-scaled, pre-quantized input and expert_map; with the activation keywords: silu, gelu,
swigluoai, interleaved or not, with or without biases; MXFP4 with bf16 or e4m3 activations; INT4 x
FP8 with static or dynamic scales), T from 0 to --max-tokens (a tenth of the calls T = 0, the rest
log-uniform, so decode and prefill sizes both come often) and a routing (uniform, or every token on
one expert, or with choices of other ranks' experts under expert_map).

Checks:
- no call raises (each error is recorded with its case; the run stops after 50);
- every output has shape [T, H] and is finite (counted on the device, read at checkpoints: no host
  sync per call);
- memory: torch.cuda.memory_allocated() after warm-up (every case once at the largest T and at
  T = 0) is the baseline; at every checkpoint the live memory minus the baseline stays within
  --mem-bound-mib (the layer keeps nothing between calls: its workspace comes from the caching
  allocator and returns to it);
- every --check-every calls, one call on a small T is compared with the CPU reference of the same
  op on the same inputs (relative max error within 5e-2, the e4m3 requantization bound of
  tests/test_generated.py). On the CPU (--device cpu) the reference is the op itself: the sample is
  compared with a second call, which must be bit-identical.

Prints a summary line last and writes a small JSON (--json); exit status 1 on any failure.
"""

import argparse
import json
import math
import os
import random
import sys
import time
import traceback

import torch

import moe_kernels
from moe_kernels.bench.features import accepts  # whether this build has a function / keyword

FP8 = torch.float8_e4m3fn
TOL = 5e-2  # tests/test_generated.py CUDA_VS_CPU_LAYER_TOL: e4m3 requantization flips, derived there
MAX_ERRORS = 50
ACTIVATIONS = ("silu", "gelu", "swigluoai")


class WeightSet:
    """One layer shape with its weights in every format this build runs (made once)."""

    def __init__(self, E, K, H, I, device, g):
        self.E, self.K, self.H, self.I, self.device = E, K, H, I, device

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device)

        self.w1 = (randn(E, 2 * I, H) * 0.05).to(FP8)
        self.w2 = (randn(E, H, I) * 0.05).to(FP8)
        self.s_e = torch.rand(E, generator=g).add(0.5).to(device)
        self.s_c1, self.s_c2 = torch.rand(E, 2 * I, generator=g).add(0.5).to(device), \
            torch.rand(E, H, generator=g).add(0.5).to(device)
        self.block = H % 128 == 0 and I % 128 == 0
        if self.block:
            self.b1 = torch.rand(E, 2 * I // 128, H // 128, generator=g).add(0.5).to(device)
            self.b2 = torch.rand(E, H // 128, I // 128, generator=g).add(0.5).to(device)
        self.bias1, self.bias2 = randn(E, 2 * I) * 0.1, randn(E, H) * 0.1
        self.mx = None
        if accepts("cutlass_moe_mxfp4") and H % 32 == 0 and I % 32 == 0:
            self.mx = tuple(t.to(device) for t in (
                torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, generator=g),
                torch.randint(0, 256, (E, H, I // 2), dtype=torch.uint8, generator=g),
                torch.randint(118, 123, (E, 2 * I, H // 32), dtype=torch.uint8, generator=g),
                torch.randint(118, 123, (E, H, I // 32), dtype=torch.uint8, generator=g)))
        self.int4 = None
        if accepts("cutlass_moe_w4a8") and self.block:
            self.int4 = tuple(t.to(device) for t in (
                torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, generator=g),
                torch.randint(0, 256, (E, H, I // 2), dtype=torch.uint8, generator=g),
                torch.rand(E, 2 * I, H // 128, generator=g) * 0.01 + 0.005,
                torch.rand(E, H, I // 128, generator=g) * 0.01 + 0.005))

    def name(self):
        return f"E{self.E}K{self.K}H{self.H}I{self.I}"


def modes(ws, with_act):
    """(format, mode) pairs this weight set and build can run."""
    out = [("fp8", m) for m in ("tensor_static", "tensor_dynamic", "token", "channel", "prequant_token",
                                 "expert_map")]
    if ws.block:
        out += [("fp8", "block"), ("fp8", "prequant_block")]
    if ws.mx is not None:
        out += [("mxfp4", "bf16"), ("mxfp4", "fp8")]
    if ws.int4 is not None:
        out += [("w4a8", "static"), ("w4a8", "dynamic")]
    return out


def draw_tokens(rng, max_tokens):
    if rng.random() < 0.1:
        return 0
    return min(max_tokens, int(math.exp(rng.uniform(0, math.log(max_tokens + 1)))))


def draw_routing(rng, T, E, K, device, g):
    """(topk_ids [T, K] int32, topk_weights [T, K] fp32, kind), drawn on the device (g: its generator)."""
    kind = rng.choice(["uniform", "uniform", "uniform", "one_expert"])
    ids = torch.rand(T, E, generator=g, device=device).argsort(1)[:, :K].to(torch.int32)
    if kind == "one_expert" and T:
        e = rng.randrange(E)
        ids[:, 0] = e  # every token's first choice on one expert; the others stay distinct of it
        ids[:, 1:] = (e + 1 + torch.arange(K - 1, dtype=torch.int32, device=device)) % E
    return ids.contiguous(), torch.rand(T, K, generator=g, device=device), kind


def draw_x(T, H, device, g):
    return torch.randn(T, H, generator=g, device=device, dtype=torch.bfloat16)


def act_keywords(rng, ws, with_act):
    if not with_act:
        return {}
    kw = {"activation": rng.choice(ACTIVATIONS), "gate_up_interleaved": rng.random() < 0.5}
    if rng.random() < 0.5:
        kw.update(w1_bias=ws.bias1, w2_bias=ws.bias2)
    return kw


def layer_call(ws, fmt, mode, x, ids, w, kw, device):
    """The layer call of (format, mode) as a callable of the inputs (so that the CPU reference can
    run it on copies)."""
    E = ws.E
    static = torch.tensor([0.02], device=device)
    if fmt == "fp8":
        f = moe_kernels.cutlass_moe_fp8
        if mode == "tensor_static":
            return lambda x, ids, w: f(x, ws.w1, ws.w2, w, ids, ws.s_e, ws.s_e, static, static, **kw)
        if mode == "tensor_dynamic":
            return lambda x, ids, w: f(x, ws.w1, ws.w2, w, ids, ws.s_e, ws.s_e, **kw)
        if mode == "token":
            return lambda x, ids, w: f(x, ws.w1, ws.w2, w, ids, ws.s_e, ws.s_e, None, None, True, **kw)
        if mode == "channel":
            return lambda x, ids, w: f(x, ws.w1, ws.w2, w, ids, ws.s_c1, ws.s_c2, None, None, True, True, **kw)
        if mode == "block":
            return lambda x, ids, w: f(x, ws.w1, ws.w2, w, ids, ws.b1, ws.b2, **kw)
        if mode == "prequant_token":
            def call(x, ids, w):
                q, s = moe_kernels.scaled_fp8_quant(x, None, True)
                return f(q, ws.w1, ws.w2, w, ids, ws.s_e, ws.s_e, s, None, True, **kw)
            return call
        if mode == "prequant_block":
            def call(x, ids, w):
                q, s = moe_kernels.per_token_group_quant_fp8(x, 128)
                return f(q, ws.w1, ws.w2, w, ids, ws.b1, ws.b2, s, **kw)
            return call
        if mode == "expert_map":
            n = E // 2
            emap = torch.full((E,), -1, dtype=torch.int32, device=device)
            emap[E - n:] = torch.arange(n, dtype=torch.int32, device=device)  # this rank: the last n
            local = {k: v[E - n:] for k, v in kw.items() if k.endswith("_bias")}
            return lambda x, ids, w: f(x, ws.w1[E - n:], ws.w2[E - n:], w, ids, ws.s_e[E - n:], ws.s_e[E - n:],
                                       None, None, True, expert_map=emap, num_local_experts=n, **dict(kw, **local))
    if fmt == "mxfp4":
        w1, w2, s1, s2 = ws.mx
        a_dtype = torch.bfloat16 if mode == "bf16" else FP8
        return lambda x, ids, w: moe_kernels.cutlass_moe_mxfp4(x, w1, w2, w, ids, s1, s2, a_dtype=a_dtype, **kw)
    if fmt == "w4a8":
        w1, w2, s1, s2 = ws.int4
        scales = (static, static) if mode == "static" else (None, None)
        return lambda x, ids, w: moe_kernels.cutlass_moe_w4a8(x, w1, w2, w, ids, s1, s2, *scales, **kw)
    raise ValueError(f"soak: unknown format {fmt} / mode {mode}")


def to_cpu(obj):
    """A WeightSet's tensors on the CPU (for the reference)."""
    out = WeightSet.__new__(WeightSet)
    for k, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            v = v.cpu()
        elif isinstance(v, tuple):
            v = tuple(t.cpu() for t in v)
        setattr(out, k, v)
    out.device = "cpu"
    return out


def rel_err(got, want):
    got, want = got.float().cpu(), want.float().cpu()
    if want.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--calls", type=int, default=int(os.environ.get("SOAK_CALLS", 10000)))
    p.add_argument("--max-tokens", type=int, default=None, help="largest T (default 8192 on CUDA, 32 on the CPU)")
    p.add_argument("--check-every", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=500, help="memory and finiteness read every N calls")
    p.add_argument("--mem-bound-mib", type=float, default=float(os.environ.get("SOAK_MEM_BOUND_MIB", 16)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device, cuda = a.device, a.device == "cuda"
    max_tokens = a.max_tokens or (8192 if cuda else 32)
    rng, g = random.Random(a.seed), torch.Generator().manual_seed(a.seed)  # g: the weights (CPU)
    gd = torch.Generator(device=device).manual_seed(a.seed)  # inputs and routings, drawn where they are used
    with_act = accepts("cutlass_moe_fp8", "activation", "gate_up_interleaved", "w1_bias", "w2_bias")
    # Shapes: block-capable ones, and (where the activation branch lets the layer take sizes that are
    # no multiple of 128) one like gpt-oss's. Small on the CPU, where the references are plain loops.
    shapes = [(16, 4, 512, 256), (8, 2, 1024, 512)] if cuda else [(8, 2, 128, 128), (4, 2, 256, 128)]
    if with_act:
        shapes.append((16, 4, 576, 320) if cuda else (4, 2, 96, 64))
    sets = [WeightSet(*s, device, g) for s in shapes]
    cases = [(ws, fmt, mode) for ws in sets for fmt, mode in modes(ws, with_act)]
    summary = {"device": device, "calls_asked": a.calls, "max_tokens": max_tokens, "with_activation_keywords": with_act,
               "formats": sorted({f"{fmt}:{mode}" for _, fmt, mode in cases}), "shapes": [ws.name() for ws in sets],
               "errors": [], "checks": 0, "check_failures": [], "max_check_err": 0.0, "nonfinite_outputs": 0,
               "bad_shapes": 0, "mem": None}
    start = time.time()
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)

    def record_error(i, case, T, e):
        ws, fmt, mode = case
        summary["errors"].append({"call": i, "case": f"{ws.name()} {fmt}:{mode}", "T": T,
                                  "error": f"{type(e).__name__}: {str(e).strip()[:300]}"})

    # Warm-up: every case at the largest T and at T = 0 (the allocator's pools and any lazy state).
    for case in cases:
        ws = case[0]
        for T in (max_tokens, 0):
            ids, w, _ = draw_routing(rng, T, ws.E, ws.K, device, gd)
            x = draw_x(T, ws.H, device, gd)
            try:
                layer_call(*case, x, ids, w, act_keywords(rng, ws, with_act), device)(x, ids, w)
            except Exception as e:  # noqa: BLE001
                record_error(-1, case, T, e)
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        mem = {"baseline_bytes": baseline, "max_delta_bytes": 0, "final_delta_bytes": 0,
               "bound_bytes": int(a.mem_bound_mib * 2**20), "reserved_max_bytes": torch.cuda.memory_reserved()}
    counts = {}
    done = 0
    for i in range(a.calls):
        if len(summary["errors"]) >= MAX_ERRORS:
            break
        case = rng.choice(cases)
        ws, fmt, mode = case
        check = a.check_every > 0 and i % a.check_every == a.check_every - 1
        T = rng.randint(1, 16) if check else draw_tokens(rng, max_tokens)
        ids, w, routing = draw_routing(rng, T, ws.E, ws.K, device, gd)
        x = draw_x(T, ws.H, device, gd)
        kw = act_keywords(rng, ws, with_act)
        key = f"{fmt}:{mode}"
        counts[key] = counts.get(key, 0) + 1
        try:
            out = layer_call(ws, fmt, mode, x, ids, w, kw, device)(x, ids, w)
            if tuple(out.shape) != (T, ws.H):
                summary["bad_shapes"] += 1
                raise RuntimeError(f"output shape {tuple(out.shape)}, expected {(T, ws.H)}")
            nonfinite += (~torch.isfinite(out.float())).sum()
            if check:
                summary["checks"] += 1
                if cuda:
                    cw = to_cpu(ws)
                    ckw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                    want = layer_call(cw, fmt, mode, x.cpu(), ids.cpu(), w.cpu(), ckw, "cpu")(x.cpu(), ids.cpu(),
                                                                                               w.cpu())
                    err = rel_err(out, want)
                    ok = err <= TOL
                else:
                    again = layer_call(ws, fmt, mode, x, ids, w, kw, device)(x, ids, w)
                    err = rel_err(out, again)
                    ok = torch.equal(out, again)
                summary["max_check_err"] = max(summary["max_check_err"], err)
                if not ok:
                    summary["check_failures"].append({"call": i, "case": f"{ws.name()} {key}", "T": T,
                                                      "kw": sorted(kw), "rel_err": err})
        except Exception as e:  # noqa: BLE001  (recorded with its case; the soak goes on)
            record_error(i, case, T, e)
            if os.environ.get("SOAK_TRACEBACK"):
                traceback.print_exc()
        out = None  # the output is the caller's: dropped, its memory returns to the allocator
        done = i + 1
        if cuda and (done % a.checkpoint_every == 0 or done == a.calls):
            del x, ids, w
            torch.cuda.synchronize()
            delta = torch.cuda.memory_allocated() - baseline
            mem["max_delta_bytes"] = max(mem["max_delta_bytes"], delta)
            mem["final_delta_bytes"] = delta
            mem["reserved_max_bytes"] = max(mem["reserved_max_bytes"], torch.cuda.memory_reserved())
            print(f"soak: {done}/{a.calls} calls, {time.time() - start:.0f} s, live memory {delta / 2**20:+.2f} MiB "
                  f"over the baseline, errors {len(summary['errors'])}", flush=True)
    if cuda:
        torch.cuda.synchronize()
        summary["mem"] = mem
    summary.update({"calls": done, "per_format": counts, "seconds": round(time.time() - start, 1),
                    "nonfinite_outputs": int(nonfinite.item())})
    # Inputs are random normals and weights small: a finite layer never overflows, so a NaN or Inf is
    # an unwritten or wrongly indexed element.
    leak = cuda and mem["max_delta_bytes"] > mem["bound_bytes"]
    ok = not summary["errors"] and not summary["check_failures"] and not summary["nonfinite_outputs"] and not leak
    summary["pass"] = ok
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    for e in summary["errors"][:5]:
        print(f"soak: error at call {e['call']} ({e['case']}, T={e['T']}): {e['error']}")
    for c in summary["check_failures"][:5]:
        print(f"soak: CPU-reference check failed at call {c['call']} ({c['case']}, T={c['T']}): rel err {c['rel_err']:.3g}")
    memtext = (f"live memory max {mem['max_delta_bytes'] / 2**20:+.2f} MiB over the baseline (bound "
               f"{a.mem_bound_mib:g} MiB)" if cuda else "memory not tracked on the CPU")
    print(f"SOAK {'PASS' if ok else 'FAIL'}: {done} calls on {device} in {summary['seconds']} s, "
          f"{len(counts)} of {len(summary['formats'])} format/modes, T up to {max_tokens}, errors {len(summary['errors'])}, "
          f"checks {summary['checks']} ({len(summary['check_failures'])} failed, max rel err "
          f"{summary['max_check_err']:.3g}), non-finite outputs {summary['nonfinite_outputs']}, {memtext}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
