"""Benchmarks of the moe_kernels ops on the MoE shapes of real models, each against its peers in
the same run: `python -m moe_kernels.bench --help`.

Each benchmark is a module with TOKENS, QUICK_TOKENS and run(ctx: harness.Context) -> rows;
adding one is a new module and one line in OPS. A module with CPU_OK = True also runs without a GPU
(`host`), and one with steps(ctx) counts its own progress steps.
"""

import importlib

OPS = {  # name on the command line: module
    "permute": "moe_kernels.bench.permute",
    "routing": "moe_kernels.bench.routing",
    "ep": "moe_kernels.bench.ep",
    "quant": "moe_kernels.bench.quant",
    "gemm": "moe_kernels.bench.gemm",
    "gemm_block": "moe_kernels.bench.gemm_block",
    "layer": "moe_kernels.bench.layer",
    "layer_block": "moe_kernels.bench.layer_block",
    "hf": "moe_kernels.bench.hf",
    "gemm_mxfp4": "moe_kernels.bench.gemm_mxfp4",
    "layer_mxfp4": "moe_kernels.bench.layer_mxfp4",
    "layer_w4a8": "moe_kernels.bench.layer_w4a8",
    "host": "moe_kernels.bench.host",
}


def load(name: str):
    """The benchmark module registered as `name`."""
    return importlib.import_module(OPS[name])
