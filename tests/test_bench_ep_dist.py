"""The two-GPU EP benchmark's logic (python -m moe_kernels.bench.ep_dist, run by scripts/ep-check.sh
under torchrun with NCCL) on CPU: 2 ranks over gloo, tiny shapes; every stage runs, the check
passes, and the JSON holds the rows the table prints."""

import json
import os

import torch
import torch.multiprocessing as mp

from moe_kernels.bench import ep_dist
from helpers import free_port


def _rank_main(rank, world, port, out_dir, codes):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    codes[rank] = ep_dist.main(["--backend", "gloo", "--device", "cpu", "--small", "--tokens", "8",
                                "--results", out_dir])


def test_ep_dist_runs_on_cpu_with_gloo(tmp_path):
    with mp.Manager() as manager:
        codes = manager.dict()
        mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path), codes), nprocs=2)
        assert dict(codes) == {0: 0, 1: 0}
    (path,) = tmp_path.glob("bench_ep_dist_cpu_x2_*.json")
    results = json.loads(path.read_text())
    assert results["errors"] == {} and results["env"]["world_size"] == 2
    assert len(results["check"]) == 13 and all(r["ok"] for r in results["check"])
    comm = results["comm"]
    assert {(r["dispatch"], r["mode"]) for r in comm} == {(d, m) for d in ("bf16", "fp8")
                                                         for m in ("variable", "capacity")}
    bf16 = next(r for r in comm if r["dispatch"] == "bf16" and r["mode"] == "variable")
    fp8 = next(r for r in comm if r["dispatch"] == "fp8" and r["mode"] == "variable")
    # fp8 rows: about half the dispatch bytes (the records also carry K weights and ids and a scale).
    assert 0.5 < fp8["dispatch_MB"] / bf16["dispatch_MB"] < 0.6
    assert all(r["us"] > 0 and r["raw_us"] > 0 for r in comm)
    assert len(results["layer"]) == 8  # one T: 2 kinds of experts x 2 dtypes x 2 modes
