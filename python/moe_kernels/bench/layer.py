"""The whole FP8 expert layer (cutlass_moe_fp8: quantize, permute, GEMM1, activation + quantize,
GEMM2, weighted unpermute) against the layers a user writes from torch ops alone (FP8 through
torch._scaled_grouped_mm, bf16 through torch._grouped_mm) and Hugging Face transformers' bf16
experts backends (grouped_mm, batched_mm; "n/a" without transformers; SwiGLU experts only), with
the time of each of its steps on the same routing, and the FP8 dense peak.

Each model's own experts: silu(gate) * up, or gpt-oss's "swigluoai" on interleaved gate/up rows with
fp32 biases on both GEMMs (rows skipped, saying so, where this build's cutlass_moe_fp8 lacks those
keywords).

FLOPs: 6*M*H*I (GEMM1 2*M*2I*H + GEMM2 2*M*H*I), M = T*K. Roofline: roofline.moe_layer with the
experts the row's routing touches (per-expert fp8 weight scales, biases where the model has them).
"""

import torch

import moe_kernels

from . import features, hf_experts, roofline
from ..modular.experts import gated_activation
from .gemm import chosen_config, routed_offsets
from .harness import FP8, ROTATION_MAX_SETS, Context, Times, forced_gemm_config, fused_gemm1, kernel_times_us, sets_for

# Every contender's CUDA graph holds its intermediates at once: beyond 4096 tokens DeepSeek-V3's
# (34 GB of bf16 + fp8 weights, ~10 GB per torch layer) would not fit an 80 GB H100.
TOKENS = [16, 128, 1024, 4096]
QUICK_TOKENS = [16, 1024, 4096]
STEPS = ("gemm1", "gemm2", "quant", "permute", "silu_quant", "unpermute")
FUSED_GEMM1_CONFIGS = ("gated_pingpong_128x128x128_c1x2", "gated_coop_128x256x128_c1x2")
PEERS = ["torch_fp8", "torch_bf16", "hf_grouped_mm", "hf_batched_mm"]
HF_CHECK_TOL = 0.05  # HF's bf16 layer vs ours in bf16: relative max error of a correct call ~1e-2


def _plain_permute(ids, E):
    """Stable argsort of the flat ids and the int32 cumulative row ends of each expert."""
    order = torch.argsort(ids.view(-1), stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, ids.view(-1).long(), torch.ones_like(ids.view(-1), dtype=torch.int32))
    return order, torch.cumsum(counts, 0, dtype=torch.int32)


def _plain_unpermute(o, order, w):
    T, K = w.shape
    out = torch.empty_like(o)
    out[order] = o
    return (out.view(T, K, -1).float() * w.unsqueeze(-1)).sum(1)


def gated(h, activation="silu", gate_up_interleaved=False, alpha=1.702, limit=7.0):
    """The gated activation of GEMM1's output h [M, 2I] in plain torch: the torch peers use the
    formulas of moe_kernels.modular.gated_activation (DESIGN.md; silu, exact-erf gelu, swigluoai)."""
    return gated_activation(h, activation, gate_up_interleaved, alpha, limit)


def _row_bias(bias, ids, order):
    """bias [E, N] of each permuted row's expert (rows in `order`), or 0 without a bias."""
    if bias is None:
        return 0
    return bias.index_select(0, ids.view(-1).long()[order]).to(torch.bfloat16)


def quant_rows(x):
    """Per-row fp8 quantization in plain torch: (q, scale [rows])."""
    s = (x.abs().amax(dim=1).float() / 448.0).clamp(min=1e-12)
    return (x.float() / s[:, None]).clamp(-448, 448).to(FP8), s


def torch_fp8_layer(x, w1, w2, s1, s2, w, ids, E, act=None, b1=None, b2=None):
    """Plain permute, per-token quant, torch._scaled_grouped_mm (rowwise), the gated activation
    (act: gated()'s keywords; default silu), requant, torch._scaled_grouped_mm, unpermute: the fp8
    layer a user writes from torch ops alone. b1, b2: fp32 biases [E, 2I], [E, H] or None."""
    K = ids.shape[1]
    order, offs = _plain_permute(ids, E)
    xq, xs = quant_rows(x)
    h = torch._scaled_grouped_mm(xq.index_select(0, order // K), w1.transpose(1, 2), xs[order // K], s1, offs=offs,
                                 out_dtype=torch.bfloat16, use_fast_accum=True) + _row_bias(b1, ids, order)
    yq, ys = quant_rows(gated(h, **(act or {})))
    o = torch._scaled_grouped_mm(yq, w2.transpose(1, 2), ys, s2, offs=offs, out_dtype=torch.bfloat16,
                                 use_fast_accum=True) + _row_bias(b2, ids, order)
    return _plain_unpermute(o, order, w).to(x.dtype)


def torch_bf16_layer(x, w1, w2, w, ids, E, act=None, b1=None, b2=None):
    """Plain permute (argsort + index_select), torch._grouped_mm, the gated activation (act:
    gated()'s keywords; default silu), torch._grouped_mm, unpermute; b1, b2 as torch_fp8_layer."""
    K = ids.shape[1]
    order, offs = _plain_permute(ids, E)
    h = torch._grouped_mm(x.index_select(0, order // K), w1.transpose(1, 2), offs=offs) + _row_bias(b1, ids, order)
    o = torch._grouped_mm(gated(h, **(act or {})), w2.transpose(1, 2), offs=offs) + _row_bias(b2, ids, order)
    return _plain_unpermute(o, order, w).to(x.dtype)


def biases(m):
    """fp32 expert biases (b1 [E, 2I], b2 [E, H]) where the model has them, else (None, None)."""
    if not m.expert_bias:
        return None, None
    return (torch.randn(m.E, 2 * m.I, device="cuda") * 0.1, torch.randn(m.E, m.H, device="cuda") * 0.1)


def weights(m):
    """bf16 weights (the bf16 peers), their fp8 copies (w1 [E, 2I, H], w2 [E, H, I]) and the
    model's expert biases."""
    w1b = torch.randn(m.E, 2 * m.I, m.H, device="cuda", dtype=torch.bfloat16).mul_(0.05)
    w2b = torch.randn(m.E, m.H, m.I, device="cuda", dtype=torch.bfloat16).mul_(0.05)
    return (w1b, w2b, w1b.to(FP8), w2b.to(FP8), *biases(m))


def hf_peer(impl, m, T, w1b, w2b, x, ids, w):
    """HF's `impl` experts backend, fn(x, ids as int64, weights as bf16), checked against the bf16
    torch layer on these inputs (a wrongly called peer would be timed on wrong work); or why it is
    n/a."""
    if m.layer_kwargs() or m.expert_bias:
        return "n/a (the HF peer runs SwiGLU experts without biases only)"
    if impl == "batched_mm":  # it gathers each choice's expert weights: T*K copies of w1 and w2
        need = T * m.K * 3 * m.I * m.H * 2
        if need > torch.cuda.mem_get_info()[0] // 4:
            return f"n/a (batched_mm would gather {need / 2**30:.0f} GiB of weights)"
    fn = hf_experts.experts(impl, w1b, w2b)
    if isinstance(fn, str):
        return fn
    ids64, wb = ids.long(), w.to(torch.bfloat16)  # what HF's routers hand their experts
    try:
        got = fn(x, ids64, wb).float()
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__}: {str(e)[:80]})"
    want = torch_bf16_layer(x, w1b, w2b, w, ids, m.E).float()
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
    if err > HF_CHECK_TOL:
        return f"n/a (output differs from the torch layer: relative max error {err:.2g})"
    return fn  # called as fn(x, ids as int64, weights as bf16)


def routing_sets(T, K, E, traffic_of):
    """The routings a row's graph cycles through: (ids [T, K] int32, weights [T, K] fp32, expert
    offsets [E+1]) each, and the mean experts they touch. One, unless the weights one routing
    touches are fewer bytes than L2_ROTATION_BYTES (decode on the smaller models): then more
    routings, each drawn afresh, so that one graph replay makes several calls (the graph launch's
    latency, ~5-10 us, is no longer timed as the layer's) that read mostly different experts (not
    the previous call's experts from L2). traffic_of(touched) gives the bytes of one call."""
    sets = []
    while True:
        offsets, ids = routed_offsets(T, K, E)
        sets.append((ids, torch.rand(T, K, device="cuda"), offsets))
        touched = [roofline.touched_experts(s[0], E) for s in sets]
        if len(sets) >= sets_for(traffic_of(touched[0]).read, ROTATION_MAX_SETS):
            return sets, sum(touched) / len(touched)


def layer_row(ctx, m, T, w1b, w2b, w1, w2, b1, b2):
    E, K, H, I = m.E, m.K, m.H, m.I
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    s = torch.ones(E, device="cuda")
    a1, a2 = torch.tensor([0.02], device="cuda"), torch.tensor([0.02], device="cuda")
    M = T * K

    def traffic_of(touched):
        return roofline.moe_layer(T, K, H, I, touched, roofline.FP8_TENSOR, biases=m.expert_bias)

    routings, touched = routing_sets(T, K, E, traffic_of)
    traffic = traffic_of(touched)
    ids, w, offsets = routings[0]
    act = m.layer_kwargs()
    kw = dict(act, **({"w1_bias": b1, "w2_bias": b2} if m.expert_bias else {}))
    skipped = features.missing("cutlass_moe_fp8", *features.layer_needs(m), where="activation keywords: branch act")
    if skipped:
        t = Times()
        t["ours"] = skipped
        return ctx.row("layer", m, T, t, peers=[], traffic=traffic)
    sr1, sr2 = torch.ones(E, 2 * I, device="cuda"), torch.ones(E, H, device="cuda")
    # The layer's steps alone, on these routings and the layer's scales.
    xq = torch.randn(M, H, device="cuda").to(FP8)
    yq = torch.randn(M, I, device="cuda").to(FP8)
    h1 = torch.randn(M, 2 * I, device="cuda", dtype=torch.bfloat16)
    h2 = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    xq_tokens, _ = moe_kernels.scaled_fp8_quant(x, a1)
    # One argument set per routing: (ids, w, offsets, inv, ids as int64 and w as bf16 for HF).
    sets = [(i, wt, o, moe_kernels.moe_permute(xq_tokens, i, E)[2], i.long(), wt.to(torch.bfloat16))
            for i, wt, o in routings]
    # The activation step with the model's activation where the op takes it (else silu's time).
    act_quant = act if features.accepts("silu_and_mul_quant_fp8", *act) else {}
    hf = {f"hf_{impl}": hf_peer(impl, m, T, w1b, w2b, x, ids, w) for impl in ("grouped_mm", "batched_mm")}
    # The layer with GEMM1's activation and quantization in its epilogue (the default where it
    # applies: static a2_scale, interleaved gate/up, > 32 rows per expert; each configuration forced
    # too) against the same layer with GEMM1 and the activation kernel apart (MOE_KERNELS_FUSED_GEMM1=0).
    # Models with concatenated gate/up rows are timed with their w1 read as interleaved: the same
    # work, the rows paired differently (a user interleaves w13 once at load: interleave_gate_up).
    fused_kw = dict(kw, gate_up_interleaved=True)
    gemm1_pair = {}
    if M // E > 32 and features.function("cutlass_grouped_gemm_fp8_act_quant") is not None:
        def with_config(config, fused=True):
            def call(i, wt, *_):
                with forced_gemm_config(config), fused_gemm1(fused):
                    return moe_kernels.cutlass_moe_fp8(x, w1, w2, wt, i, s, s, a1, a2, **fused_kw)
            return call
        gemm1_pair = {"fused_gemm1": with_config(None),
                      "fused_gemm1_pingpong": with_config(FUSED_GEMM1_CONFIGS[0]),
                      "fused_gemm1_coop": with_config(FUSED_GEMM1_CONFIGS[1]),
                      "unfused_gemm1": with_config(None, fused=False)}
    t = ctx.measure({
        "ours": lambda i, wt, o, inv, i64, wb: moe_kernels.cutlass_moe_fp8(x, w1, w2, wt, i, s, s, a1, a2, **kw),
        "torch_fp8": lambda i, wt, o, inv, i64, wb: torch_fp8_layer(x, w1, w2, sr1, sr2, wt, i, E, act, b1, b2),
        "torch_bf16": lambda i, wt, o, inv, i64, wb: torch_bf16_layer(x, w1b, w2b, wt, i, E, act, b1, b2),
        **{name: (lambda i, wt, o, inv, i64, wb, f=fn: f(x, i64, wb)) for name, fn in hf.items()
           if not isinstance(fn, str)},
        "gemm1": lambda i, wt, o, inv, i64, wb: moe_kernels.cutlass_grouped_gemm_fp8(xq, w1, a1, s, o),
        "gemm2": lambda i, wt, o, inv, i64, wb: moe_kernels.cutlass_grouped_gemm_fp8(yq, w2, a2, s, o),
        "quant": lambda *_: moe_kernels.scaled_fp8_quant(x, a1),
        "permute": lambda i, *_: moe_kernels.moe_permute(xq_tokens, i, E),
        "silu_quant": lambda *_: moe_kernels.silu_and_mul_quant_fp8(h1, a2, **act_quant),
        "unpermute": lambda i, wt, o, inv, i64, wb: moe_kernels.moe_unpermute(h2, wt, inv),
        **gemm1_pair,
    }, sets)
    steps = {f"{k}_us": t[k] * 1e6 if isinstance(t[k], float) else None for k in STEPS}
    for k in gemm1_pair:
        steps[f"{k}_us"] = t[k] * 1e6 if isinstance(t[k], float) else None
    gemm_share = None
    if all(isinstance(t[k], float) for k in ("ours", "gemm1", "gemm2")):
        gemm_share = (t["gemm1"] + t["gemm2"]) / t["ours"]
    t.update({name: why for name, why in hf.items() if isinstance(why, str)})
    # Where the layer's time goes, kernel by kernel (GPU time of one eager call, launch order): the
    # step rows above time each step alone, on inputs of their own.
    kernels = kernel_times_us(lambda: moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, s, s, a1, a2, **kw))
    # The same for each fused GEMM1 configuration: where its layer's time goes.
    for name in gemm1_pair:
        if name.startswith("fused"):
            steps[f"{name}_kernels_us"] = kernel_times_us(lambda f=gemm1_pair[name]: f(ids, w))
    extra = {"activation": m.activation, "gate_up_interleaved": m.gate_up_interleaved,
             "expert_bias": m.expert_bias} if (act or m.expert_bias) else {}
    if act and not act_quant:
        extra["silu_quant_note"] = "silu_and_mul_quant_fp8 takes no activation keyword in this build: silu's time"
    row = ctx.row("layer", m, T, t, 6 * M * H * I, "fp8", peers=PEERS, traffic=traffic,
                  gemm_share=gemm_share, routings=len(sets), touched_experts=touched,
                  gemm1_config=chosen_config(M, E, H), gemm2_config=chosen_config(M, E, I), **steps,
                  kernels_us=kernels, **extra)
    # The roofline fraction a user reaches with w13 interleaved at load (the fused GEMM1's layer).
    fused_us = steps.get("fused_gemm1_us")
    if fused_us and row.get("roof_us"):
        row["fused_roof"] = row["roof_us"] / fused_us
    return row


def run(ctx: Context) -> list:
    return [layer_row(ctx, m, T, *w) for m, T, w in ctx.grid_with(TOKENS, QUICK_TOKENS, weights)]
