"""python -m moe_kernels.bench [--ops permute,routing,ep,quant,gemm,layer] [--models mixtral,qwen3,deepseek-v3]
[--quick] [--T 16,1024,4096] [--json FILE] [--out DIR]"""

import argparse
import sys
import time

import torch

from . import OPS, load, models, report


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m moe_kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)} (default: all)")
    p.add_argument("--models", default="", help="comma-separated model names or prefixes: "
                   + ", ".join(m.name for m in models.MODELS) + " (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer token counts and replays (a few minutes)")
    p.add_argument("--T", default="", help="comma-separated token counts, overriding every benchmark's own")
    p.add_argument("--json", default=None, help="results file (default: DIR/bench_<ops>_<device>_<date>.json)")
    p.add_argument("--out", default=None, help="results directory (default: bench/results in the repository, "
                   "else the current directory)")
    p.add_argument("--gemm-configs", default="", help="gemm: force these compiled configurations "
                   "(comma-separated, 'all': every one; default: the automatic choice)")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {', '.join(unknown)}: choose from {', '.join(OPS)}")
    try:
        args.model_list = models.select(args.models)
    except ValueError as e:
        p.error(str(e))
    args.tokens = [int(t) for t in args.T.split(",") if t.strip()] or None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_kernels.bench: no CUDA GPU found, nothing to benchmark.")
        return 0
    from .harness import Context
    import moe_kernels

    configs = [c for c in args.gemm_configs.split(",") if c]
    if configs == ["all"]:
        configs = moe_kernels.grouped_gemm_fp8_configs()
    ctx = Context(models=args.model_list, tokens=args.tokens, quick=args.quick, gemm_configs=configs or [None])
    start = time.time()
    rows = []
    for name in args.ops:
        rows += load(name).run(ctx)
    env = report.environment()
    print(report.format_table(rows))
    for name, value in ctx.ceilings.items():
        print(f"ceiling {name}: {report.ceiling_text(name, value, ctx.ceiling_details.get(name))}")
    out_dir = args.out or report.default_out_dir()
    path = args.json or report.result_path(out_dir, env, args.ops, args.quick)
    ceilings = {name: {"value": v, **ctx.ceiling_details.get(name, {})} for name, v in ctx.ceilings.items()}
    saved = report.save(path, env, ceilings, rows, {k: v for k, v in vars(args).items() if k != "model_list"})
    print(f"{len(rows)} rows in {time.time() - start:.0f} s, saved {saved}")
    bad = report.suspects(rows)
    if bad:
        print(f"\n!!! {report.SUSPECT}: {len(bad)} row(s) above 1.0 of a ceiling measured in this run "
              "(the ceiling or the byte count is wrong):", file=sys.stderr)
        for r in bad:
            print(f"!!!   {r['op']} {r['model']} T={r['T']}: {r['frac']:.2f} of {r['ceiling']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
