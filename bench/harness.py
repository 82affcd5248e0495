"""The benchmark harness shared by every bench file: graph-captured timing with rotating inputs,
the device ceilings measured in the same run, and JSON results.

Timing: each measured op is captured in a CUDA graph once per input set (sets rotate so that their
total size exceeds L2 and every call reads from memory), the graph is replayed `reps` times, each
replay timed with CUDA events; the median replay time divided by the number of sets is the time of
one call. Graphs remove the CPU launch gaps, so small-T numbers are kernel time, not Python time.
"""

import datetime
import json
import math
import platform
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_ROTATION_BYTES = 256 << 20  # rotate inputs until this many bytes: several times the H100/H200 L2


def sets_for(bytes_per_set: int, max_sets: int = 64) -> int:
    """How many input sets to rotate through so that they do not fit in L2 together."""
    return max(1, min(max_sets, math.ceil(L2_ROTATION_BYTES / max(1, bytes_per_set))))


def _capture(fn: Callable, arg_sets: Sequence[tuple]) -> "torch.cuda.CUDAGraph":
    """A CUDA graph that calls fn once per arg set (warmed up outside the capture first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets[:2]:  # warm-up outside capture (lazy init, allocator)
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in arg_sets:
            fn(*args)
    return graph


def _replay_ms(graph, reps: int) -> List[float]:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        graph.replay()
        end[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(start, end)]


def time_per_call(fn: Callable, arg_sets: Sequence[tuple], reps: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of fn(*args), over graph replays that call it once per arg set."""
    graph = _capture(fn, arg_sets)
    for _ in range(warmup):
        graph.replay()
    times = sorted(_replay_ms(graph, reps))
    del graph
    return times[len(times) // 2] / 1e3 / len(arg_sets)


def time_interleaved(fns: Dict[str, Callable], reps: int = 8, rounds: int = 3) -> Dict[str, float]:
    """Median seconds per call of each fn(), replayed in turns (rounds x reps each): long FP8 GEMMs
    move the GPU clock with power and temperature by up to ~20% within a run, and turns make that
    drift fall on every contender alike, so their ratio is fair."""
    graphs = {name: _capture(fn, [()]) for name, fn in fns.items()}
    for g in graphs.values():
        g.replay()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, g in graphs.items():
            times[name] += _replay_ms(g, reps)
    del graphs
    return {name: sorted(t)[len(t) // 2] / 1e3 for name, t in times.items()}


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = time_per_call(lambda: dst.copy_(src), [()], reps=10)
    return 2 * nbytes / t


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save(name: str, ceilings: dict, rows: List[dict]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp = env["date"][:10]
    device = env["device"].replace(" ", "_")
    path = RESULTS_DIR / f"{name}_{device}_{stamp}.json"
    path.write_text(json.dumps({"env": env, "ceilings": ceilings, "rows": rows}, indent=1))
    return path


def print_table(rows: List[dict], columns: List[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
