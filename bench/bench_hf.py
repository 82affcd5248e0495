"""One HF transformers MoE experts layer through each experts implementation: HF's eager,
batched_mm and grouped_mm against moe_kernels' "moe_kernels" (bf16) and "moe_kernels_fp8"
(per-channel FP8 weights, per-token activations), in the same run.

The layer is HF's own experts module (Qwen3MoeExperts, MixtralExperts) with the real shapes of
Qwen3-30B-A3B, Qwen3-235B-A22B and Mixtral-8x7B, random bf16 weights and uniform random routing
(the router is not timed). Times are per call, median over rounds that take the implementations
in turn (clock drift falls on all alike), launched eagerly as HF runs them (HF's eager loop syncs
the host and cannot be captured in a CUDA graph); "graph" columns give the CUDA-graph-replayed
time of the implementations that capture. batched_mm copies each token's expert weights and is
skipped where that copy would exceed BATCHED_MM_BYTES.

The floor: the bytes of the weights of the experts that the tokens hit, read once at the copy
bandwidth measured in the same run (what decode cannot beat in bf16; fp8 halves it).
Run: python bench/bench_hf.py [--tokens 16,1024,4096] [--configs qwen3-30b-a3b,...]
"""

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from moe_kernels.integrations.transformers import register  # noqa: E402

CONFIGS = {  # name: (experts class, E, top-k, H, I)
    "qwen3-30b-a3b": ("qwen3_moe", 128, 8, 2048, 768),
    "qwen3-235b-a22b": ("qwen3_moe", 128, 8, 4096, 1536),
    "mixtral-8x7b": ("mixtral", 8, 2, 4096, 14336),
}
TOKENS = [16, 1024, 4096]
IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm", "moe_kernels", "moe_kernels_fp8"]
BATCHED_MM_BYTES = 16 << 30


def experts_module(kind, E, H, I):
    if kind == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)
    with torch.device("cuda"):
        module = cls(config).to(torch.bfloat16)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, H ** -0.5)
        module.down_proj.normal_(0, I ** -0.5)
    return module


def routing(T, K, E):
    ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :K]
    return ids, torch.softmax(torch.randn(T, K, device="cuda"), dim=-1)


def time_eager(fns, reps=10, rounds=3):
    """Median seconds per call of each fn(), launched eagerly, the fns taken in turns."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for i in range(reps):
                start[i].record()
                fn()
                end[i].record()
            torch.cuda.synchronize()
            times[name] += [s.elapsed_time(e) / 1e3 for s, e in zip(start, end)]
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def time_graphs(fns):
    """CUDA-graph replay time of the fns that capture (None for the others)."""
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = harness.time_interleaved({name: fn})[name]
        except RuntimeError:  # host syncs (HF's eager loop) cannot be captured
            torch.cuda.synchronize()
            out[name] = None
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = p.parse_args()
    register()
    bandwidth = harness.copy_bandwidth()
    rows = []
    for name in args.configs.split(","):
        kind, E, K, H, I = CONFIGS[name]
        module = experts_module(kind, E, H, I)
        expert_bytes = 3 * H * I * 2
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            ids, w = routing(T, K, E)

            def call(implementation):
                def fn():
                    module.config._experts_implementation = implementation
                    with torch.no_grad():
                        return module(x, ids, w)
                return fn

            fns = {impl: call(impl) for impl in IMPLEMENTATIONS
                   if impl != "batched_mm" or T * K * expert_bytes <= BATCHED_MM_BYTES}
            eager = time_eager(fns)
            graph = time_graphs({impl: fns[impl] for impl in fns if impl != "eager"})
            hit = ids.unique().numel()
            row = {"config": name, "T": T, "floor_us": hit * expert_bytes / bandwidth * 1e6}
            for impl in IMPLEMENTATIONS:
                row[impl] = eager[impl] * 1e6 if impl in eager else None
                if graph.get(impl) is not None:
                    row[impl + "_graph"] = graph[impl] * 1e6
            row["mk_vs_grouped"] = eager["grouped_mm"] / eager["moe_kernels"]
            row["fp8_vs_grouped"] = eager["grouped_mm"] / eager["moe_kernels_fp8"]
            rows.append(row)
            print(row, flush=True)
        del module
        torch.cuda.empty_cache()
    harness.print_table(rows, ["config", "T", "floor_us"] + IMPLEMENTATIONS + ["mk_vs_grouped", "fp8_vs_grouped"])
    print("CUDA-graph replay (us):")
    harness.print_table(rows, ["config", "T"] + [i + "_graph" for i in IMPLEMENTATIONS[1:]])
    print(f"saved {harness.save('hf', {'copy_bandwidth_GBps': bandwidth / 1e9}, rows)}")


if __name__ == "__main__":
    main()
