"""One HF transformers experts layer through each experts implementation, in the same run: our
"moe_kernels" (moe_permute, torch._grouped_mm, moe_unpermute) and "moe_kernels_fp8" (per-channel
FP8 weights, per-token activations, cutlass_moe_fp8) against HF's own eager loop, grouped_mm and
batched_mm (transformers >= 5; "n/a" with the reason otherwise).

The layer is HF's own experts module of the model (Qwen3MoeExperts, MixtralExperts,
DeepseekV3Experts) with random bf16 weights of the model's shapes and uniform random routing; the
router is not timed. Every contender is checked against HF's grouped_mm on the same inputs before
it is timed. HF's eager loop syncs the host (it lists the experts hit), so it cannot be captured
in a CUDA graph and is timed eagerly, launch gaps included (the row's timing_notes say so).

weights_floor_us: the bf16 weights of the experts the tokens hit, read once at the copy ceiling:
what no bf16 implementation can beat at decode sizes (the fp8 weights are half of it). No FLOP
fraction: the fp8 peak is no ceiling for the bf16 layer, and the layer benchmark (`--ops layer`)
gives cutlass_moe_fp8's.
"""

import torch

from .harness import Context, Times

TOKENS = [16, 1024, 4096]
QUICK_TOKENS = [16, 4096]
OURS = "moe_kernels"
PEERS = ["moe_kernels_fp8", "hf_eager", "hf_grouped_mm", "hf_batched_mm"]
# Against HF's grouped_mm on the same inputs (relative norm error): bf16 roundings ~5e-3; fp8
# ~6% (tests/test_hf_transformers.py derives it). A wrongly called contender is off by order 1.
CHECK_TOL = {"moe_kernels": 2e-2, "moe_kernels_fp8": 1.5e-1, "hf_eager": 2e-2, "hf_batched_mm": 2e-2}


def hf_experts_module(m):
    """HF's experts module of model m on the meta device, with the implementation to call it
    through; or why it is not available."""
    try:
        import transformers

        from ..integrations.transformers import register
        register()
        if m.name.startswith("qwen3"):
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
            config = transformers.Qwen3MoeConfig(hidden_size=m.H, moe_intermediate_size=m.I, num_experts=m.E)
        elif m.name.startswith("mixtral"):
            from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
            config = transformers.MixtralConfig(hidden_size=m.H, intermediate_size=m.I, num_local_experts=m.E)
        elif m.name.startswith("deepseek"):
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts as cls
            config = transformers.DeepseekV3Config(hidden_size=m.H, moe_intermediate_size=m.I,
                                                   n_routed_experts=m.E)
        else:
            return f"n/a (no HF experts class known for {m.name})"
        with torch.device("meta"):
            return cls(config)
    except Exception as e:  # noqa: BLE001  (transformers missing, older, or an API this code does not know)
        return f"n/a ({type(e).__name__}: {str(e)[:80]})"


def random_weights(module, m, device="cuda"):
    """bf16 weights of unit-scale outputs in place of the meta ones."""
    w1 = torch.randn(m.E, 2 * m.I, m.H, device=device, dtype=torch.bfloat16).mul_(m.H ** -0.5)
    w2 = torch.randn(m.E, m.H, m.I, device=device, dtype=torch.bfloat16).mul_(m.I ** -0.5)
    module.gate_up_proj = torch.nn.Parameter(w1, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w2, requires_grad=False)


def contenders(module, m, T, x, ids, w):
    """Name -> callable of no arguments, or why it is n/a. batched_mm gathers each choice's expert
    weights (T*K copies of w1 and w2) and is n/a where that would not fit comfortably."""
    def call(implementation):
        def fn():
            module.config._experts_implementation = implementation
            with torch.no_grad():
                return module(x, ids, w)
        return fn

    fns = {"moe_kernels": call("moe_kernels"), "moe_kernels_fp8": call("moe_kernels_fp8"),
           "hf_eager": call("eager"), "hf_grouped_mm": call("grouped_mm"), "hf_batched_mm": call("batched_mm")}
    need = T * m.K * 3 * m.I * m.H * 2
    if need > torch.cuda.mem_get_info()[0] // 4:
        fns["hf_batched_mm"] = f"n/a (batched_mm would gather {need / 2**30:.0f} GiB of weights)"
    try:
        want = fns["hf_grouped_mm"]().float()
    except Exception as e:  # noqa: BLE001
        fns["hf_grouped_mm"] = f"n/a ({type(e).__name__}: {str(e)[:80]})"
        return fns
    for name, tol in CHECK_TOL.items():
        if isinstance(fns[name], str):
            continue
        try:
            got = fns[name]().float()
        except Exception as e:  # noqa: BLE001
            fns[name] = f"n/a ({type(e).__name__}: {str(e)[:80]})"
            continue
        err = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
        if not err < tol:
            fns[name] = f"n/a (output differs from HF's grouped_mm: relative error {err:.2g})"
    return fns


def run(ctx: Context) -> list:
    rows = []
    for m in ctx.models:
        module = hf_experts_module(m)
        if not isinstance(module, str):
            random_weights(module, m)
        for T in ctx.tokens_for(TOKENS, QUICK_TOKENS):
            if ctx.progress:
                ctx.progress(f"{m.name} T={T}")
            if isinstance(module, str):
                times = Times()
                times[OURS] = module
                rows.append(ctx.row("hf", m, T, times, peers=[]))
                continue
            x = torch.randn(T, m.H, device="cuda", dtype=torch.bfloat16)
            ids = torch.rand(T, m.E, device="cuda").argsort(dim=1)[:, :m.K]  # int64, as HF's routers give
            w = torch.softmax(torch.randn(T, m.K, device="cuda"), dim=-1).to(torch.bfloat16)
            fns = contenders(module, m, T, x, ids, w)
            times = ctx.measure({name: fn for name, fn in fns.items() if not isinstance(fn, str)})
            times.update({name: why for name, why in fns.items() if isinstance(why, str)})
            floor = ids.unique().numel() * 3 * m.H * m.I * 2 / ctx.ceiling("copy")
            rows.append(ctx.row("hf", m, T, times, ours=OURS, peers=PEERS, weights_floor_us=floor * 1e6))
        del module
        torch.cuda.empty_cache()
    return rows
