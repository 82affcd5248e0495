"""python -m moe_kernels.bench [--ops permute,routing,ep,quant,gemm,gemm_block,layer,layer_block,hf,
gemm_mxfp4,layer_mxfp4,layer_w4a8,host] [--models mixtral,qwen3,deepseek-v3,gpt-oss] [--quick]
[--T 16,1024,4096] [--json FILE] [--plot FILE.png] [--out DIR]

Times each op on the MoE shapes of real models against its peers in the same run (the plain torch
formulas, torch._grouped_mm / torch._scaled_grouped_mm, Hugging Face transformers' experts when
installed, our FP8 layer for the 4-bit ones) and against the device ceilings measured in the same
run (an SM copy kernel, an SM read-only kernel, the FP8 and bf16 dense peaks; gemm and layer rows
also against their roofline); prints one table and writes the JSON of every row. Without a GPU it
runs the ops that run on the CPU (`--ops host`) when asked for them alone, else a short CPU check
of the modular layer.
"""

import argparse
import sys
import time

import torch

from . import OPS, load, models, plot, report


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m moe_kernels.bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)} (default: all)")
    p.add_argument("--models", default="", help="comma-separated model names or prefixes: "
                   + ", ".join(m.name for m in models.MODELS) + " (default: all)")
    p.add_argument("--quick", action="store_true", help="three token counts, fewer replays (under 3 minutes "
                   "on an H100), every op against every peer")
    p.add_argument("--T", default="", help="comma-separated token counts, overriding every benchmark's own")
    p.add_argument("--json", default=None, help="results file (default: DIR/bench_<ops>_<device>_<date>.json)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="speedup over each peer against T, one panel per op (needs matplotlib)")
    p.add_argument("--out", default=None, metavar="DIR", help="results directory (default: bench/results when "
                   "run from the repository, else the current directory)")
    p.add_argument("--gemm-configs", default="", help="gemm: force these compiled configurations "
                   "(comma-separated, 'all': every one; default: the automatic choice)")
    args = p.parse_args(argv)
    args.ops_given = args.ops != p.get_default("ops")
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {', '.join(unknown)}: choose from {', '.join(OPS)}")
    try:
        args.model_list = models.select(args.models)
    except ValueError as e:
        p.error(str(e))
    try:
        args.tokens = [int(t) for t in args.T.split(",") if t.strip()] or None
    except ValueError:
        p.error(f"--T takes comma-separated integers, got {args.T!r}")
    if args.plot and not plot.available():
        p.error(plot.MISSING)  # before the run, not after minutes of it
    return args


def benchmark(args) -> int:
    import moe_kernels

    from .harness import Context
    from .progress import Progress

    configs = [c for c in args.gemm_configs.split(",") if c]
    if configs == ["all"]:
        configs = moe_kernels.grouped_gemm_fp8_configs()
    ctx = Context(models=args.model_list, tokens=args.tokens, quick=args.quick, gemm_configs=configs or [None])
    modules = {name: load(name) for name in args.ops}
    steps = sum(mod.steps(ctx) if hasattr(mod, "steps") else len(ctx.models) * len(ctx.tokens_for(mod.TOKENS, mod.QUICK_TOKENS))
                for mod in modules.values())
    progress = Progress(steps)
    start = time.time()
    env = report.environment()
    tag = ["all"] if args.ops == list(OPS) else args.ops
    path = args.json or report.result_path(args.out or report.default_out_dir(), env, tag, args.quick)
    run_args = {k: v for k, v in vars(args).items() if k not in ("model_list", "ops_given")}

    def save(partial: bool):
        ceilings = {name: {"value": v, **ctx.ceiling_details.get(name, {})} for name, v in ctx.ceilings.items()}
        return report.save(path, env, ceilings, rows, dict(run_args, partial=partial))

    rows = []
    try:
        for name, mod in modules.items():
            ctx.progress = lambda label, name=name: progress(f"{name} {label}")
            rows += mod.run(ctx)
            save(partial=True)  # a run stopped later (a time limit) keeps the ops that finished
    finally:
        progress.close()
    print(report.format_table(rows))
    for name, value in ctx.ceilings.items():
        print(f"ceiling {name}: {report.ceiling_text(name, value, ctx.ceiling_details.get(name))}")
    saved = save(partial=False)
    print(f"{len(rows)} rows in {time.time() - start:.0f} s on {env.get('device') or 'the CPU'}, saved {saved}")
    if args.plot:
        print(f"plot: {plot.plot(rows, args.plot)}")
    bad = report.suspects(rows)
    if bad:
        lines = [f"!!! {report.SUSPECT}: {len(bad)} row(s) above 1.0 of a ceiling or roofline measured in this "
                 "run (the ceiling or the byte count is wrong):"]
        lines += [f"!!!   {report.suspect_text(r)}" for r in bad]
        print("\n".join(lines))
        print("\n".join(lines), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if args.ops_given and all(getattr(load(o), "CPU_OK", False) for o in args.ops):
            print(f"moe_kernels.bench: no CUDA GPU here: {','.join(args.ops)} on the CPU only.")
            return benchmark(args)
        print("moe_kernels.bench: no CUDA GPU here, so no benchmarks; running the CPU check instead.")
        from . import cpu_check
        return 0 if cpu_check.run() else 1
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
