"""The harness every benchmark shares: graph-captured timing with rotating inputs, the device
ceilings measured in the same run, and the result rows.

Timing: each contender is captured in a CUDA graph that calls it once per input set (sets rotate
so that their total size exceeds L2 and every call reads from memory); the graphs are replayed in
turns, `rounds` times `reps` replays each, each replay timed with CUDA events; the median replay
time divided by the number of calls in the graph is the time of one call. Graphs remove the CPU
launch gaps, so small-T numbers are kernel time, not Python time. A graph shorter than
MIN_REPLAY_S is captured again with the sets repeated until it is not: a replay timed by events
also holds the host's launch of the graph (~5-20 us while the GPU idles), which measured a
4 us quantization pass at 10-27 us (H100 layer steps, 2026-12-05). Turns make clock drift (long FP8 GEMMs move the
clock with power and temperature by up to ~20% within a run) fall on every contender alike. A
contender that cannot be captured (it syncs the host) is timed eagerly, launch gaps included, and
the row says so.
"""

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .models import Model
from .roofline import Traffic

L2_ROTATION_BYTES = 256 << 20  # rotate inputs until this many bytes: several times the H100/H200 L2
# Routings a gemm/layer row cycles through at most (routing_sets in layer.py): at decode a call
# reads a few experts, and 16 calls per replay leave the graph launch ~1/16 of one call's time.
ROTATION_MAX_SETS = 16
# A replay shorter than this is re-captured with its calls repeated: the graph launch (host time
# the events see while the GPU waits) stays under ~2% of what is timed.
MIN_REPLAY_S = 1e-3
MAX_REPEATS = 256
FP8 = torch.float8_e4m3fn


def sets_for(bytes_per_set: float, max_sets: int = 64) -> int:
    """How many input sets to rotate through so that they do not fit in L2 together."""
    return max(1, min(max_sets, math.ceil(L2_ROTATION_BYTES / max(1, bytes_per_set))))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:80] if text else ''}"


def _capture(fn: Callable, arg_sets: Sequence[tuple], repeats: int = 1) -> "torch.cuda.CUDAGraph":
    """A CUDA graph that calls fn once per arg set, `repeats` times over (warmed up outside the
    capture first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets[:2]:  # warm-up outside capture (lazy init, allocator, autotuning)
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for args in arg_sets:
                fn(*args)
    return graph


def _captured_runner(fn: Callable, arg_sets: Sequence[tuple]) -> Tuple[Callable[[], None], int]:
    """A replay of fn over the arg sets lasting at least MIN_REPLAY_S, and how many calls it makes.
    Repeats call fn on the same sets again; sets that rotate through more than L2 still read from
    memory, and a fixed input (one set) is L2-resident across replays either way."""
    repeats = 1
    graph = _capture(fn, arg_sets)
    # A replay's event time includes the graph launch, so a short one overstates its calls: grow
    # the repeats until the replay itself is long enough (a few rounds at most).
    for _ in range(4):
        graph.replay()
        took = min(_timed_ms(graph.replay, 3)) / 1e3
        if took >= MIN_REPLAY_S or repeats >= MAX_REPEATS:
            break
        repeats = min(MAX_REPEATS, repeats * max(2, math.ceil(MIN_REPLAY_S / max(took, 1e-7))))
        del graph
        graph = _capture(fn, arg_sets, repeats)
    return graph.replay, repeats * len(arg_sets)


def _timed_ms(run: Callable[[], None], reps: int) -> List[float]:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        run()
        end[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(start, end)]


class Times(dict):
    """Contender name -> seconds per call, or the error that stopped it; `notes` says which
    contenders were timed eagerly (launch gaps included) because they could not be captured."""

    def __init__(self):
        super().__init__()
        self.notes: Dict[str, str] = {}


def _eager(fn: Callable, arg_sets: Sequence[tuple]) -> Callable[[], None]:
    def run():
        for args in arg_sets:
            fn(*args)
    return run


def measure(fns: Dict[str, Callable], arg_sets: Sequence[tuple] = ((),), reps: int = 10, rounds: int = 3) -> Times:
    """Median seconds per call of each fn(*args) over the arg sets, timed in turns."""
    arg_sets = list(arg_sets)
    runners: Dict[str, Callable[[], None]] = {}
    calls: Dict[str, int] = {}
    result = Times()
    for name, fn in fns.items():
        try:
            runners[name], calls[name] = _captured_runner(fn, arg_sets)
        except Exception as e:  # noqa: BLE001  (a peer may be missing, or sync the host)
            try:
                torch.cuda.synchronize()
                _eager(fn, arg_sets[:2])()
                torch.cuda.synchronize()
            except Exception as e2:  # noqa: BLE001
                result[name] = _first_line(e2)
                continue
            runners[name], calls[name] = _eager(fn, arg_sets), len(arg_sets)
            result.notes[name] = f"timed eagerly, not capturable ({_first_line(e)})"
    for run in runners.values():
        run()
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name] += _timed_ms(run, reps)
    runners.clear()
    for name, t in times.items():
        result[name] = sorted(t)[len(t) // 2] / 1e3 / calls[name]
    ordered = Times()
    ordered.update((name, result[name]) for name in fns)
    ordered.notes = result.notes
    return ordered


def _short_kernel_name(name: str) -> str:
    """A kernel's name without namespaces, template arguments and parameters: CUTLASS kernels
    become "cutlass_gemm" (their template is several kilobytes long)."""
    if name.startswith("_ZN7cutlass") or name.startswith("void cutlass::device_kernel"):
        return "cutlass_gemm"
    if not name.startswith("void "):  # memset, memcpy and extern "C" kernels keep their names
        return name
    base = name.removeprefix("void ").split("<", 1)[0].split("(", 1)[0]
    return base.rsplit("::", 1)[-1] or name[:40]


def _device_events(fn: Callable) -> Optional[list]:
    """The device activities (kernels, memcpy, memset) of one call of fn, in start order, as the
    profiler's events; None where the profiler cannot say (no CUPTI)."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    except Exception:  # noqa: BLE001  (no CUPTI: the caller goes without)
        return None


def kernel_times_us(fn: Callable) -> Optional[List[Tuple[str, float]]]:
    """The device activities of one eager call of fn (after one unprofiled call) in launch order, as
    (short name, microseconds on the GPU), or None where the profiler cannot say. Each duration is
    the kernel's own time, so launch gaps between them do not count; their sum can be below the
    graph-timed call."""
    fn()
    torch.cuda.synchronize()
    events = _device_events(fn)
    return [(_short_kernel_name(e.name), e.time_range.elapsed_us()) for e in events] if events else None


def _kernel_names(fn: Callable) -> Optional[List[str]]:
    """Names of the device activities of one call of fn (kernels, memcpy, memset), or None where
    the profiler cannot say."""
    events = _device_events(fn)
    return sorted({e.name for e in events}) or None if events is not None else None


def copy_forms(x: torch.Tensor, y: torch.Tensor) -> Dict[str, Callable]:
    """Ways to copy x into y (same bytes, fp32) through an SM kernel. A plain y.copy_(x) of equal
    dtypes becomes cudaMemcpyAsync, which a CUDA graph records as a memcpy node run by the copy
    engines: on an H100 it reaches ~2.4 TB/s where an SM kernel reaches ~3.0 TB/s, so it would
    inflate every fraction by ~24%. A dtype conversion or an arithmetic op forces an elementwise
    kernel (vectorized on contiguous tensors)."""
    xb, yb = x.view(torch.bfloat16), y.view(torch.bfloat16)
    yi = y.view(torch.int32)
    return {
        "add fp32": lambda: torch.add(x, 0, out=y),
        "add bf16": lambda: torch.add(xb, 0, out=yb),
        "copy_ fp32->int32": lambda: yi.copy_(x),
    }


def copy_bandwidth(nbytes: int = 1 << 30) -> Tuple[float, dict]:
    """The copy ceiling in bytes/s, counting bytes read plus bytes written: the best of the SM copy
    kernels of copy_forms over buffers of nbytes (far larger than L2). Forms the profiler shows as
    a memcpy are dropped. The graph memcpy rate is recorded beside it for reference, not used."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_(-1, 1)
    y = torch.empty_like(x)
    small_x, small_y = x[: 1 << 20], y[: 1 << 20]
    forms, kernels = copy_forms(x, y), {}
    for name, fn in copy_forms(small_x, small_y).items():
        kernels[name] = _kernel_names(fn)
        if kernels[name] is not None and any("memcpy" in k.lower() for k in kernels[name]):
            forms.pop(name)
    t = measure(forms, reps=10, rounds=2)
    rates = {name: 2 * nbytes / s for name, s in t.items() if isinstance(s, float)}
    if not rates:
        raise RuntimeError(f"copy ceiling: no SM copy kernel could be timed: {dict(t)}, kernels {kernels}")
    xs = x.view(torch.uint8)
    memcpy = measure({"memcpy": lambda: y.view(torch.uint8).copy_(xs)}, reps=10, rounds=1)["memcpy"]
    details = {"forms_Bps": rates, "kernels": kernels, "buffer_bytes": nbytes,
               "graph_memcpy_Bps": 2 * nbytes / memcpy if isinstance(memcpy, float) else memcpy,
               "note": "graph_memcpy_Bps: the copy engines (a memcpy node), recorded for reference, not the ceiling"}
    return max(rates.values()), details


def read_forms(x: torch.Tensor) -> Dict[str, Tuple[Callable, int]]:
    """Ways to read all of x (fp32, contiguous) through an SM kernel that writes almost nothing,
    each with the bytes it moves (read plus its small output):
    - PyTorch's reductions: each byte read once with vectorized loads from every SM, one value
      written per output (a scalar, or one per 64 KiB row), negligible arithmetic per byte.
    - cuBLAS's FP8 GEMM of 16 rows against x seen as an e4m3 [N, 16384] weight: the stream a
      decode GEMM's weights are (TMA loads, read once, never written), by a kernel that is not
      ours. Added after the H200 run of 2026-12-04, where the reductions reached 4279 GB/s and our
      GEMM1 on DeepSeek-V3 streamed its weights at 1.00-1.01 of that: the reductions alone
      undercount what the memory system gives a TMA read stream.
    - Our own grouped FP8 GEMM, 16 rows per expert over x seen as 64 experts' e4m3 [N, 4096]
      weights: the TMA stream of the configuration our GEMM1 runs at 16-32 rows per expert. Added
      after the H200 runs of 2026-12-05, where GEMM1 on DeepSeek-V3 at T = 16-128 still read its
      weights at 1.00-1.03 of the best of the forms above (rows flagged CEILING SUSPECT): the
      memory system gives a warp-specialized TMA read stream more than any of them reaches.
    No copy engine takes part (a memcpy node would both read and write)."""
    from ..ops.gemm import cutlass_grouped_gemm_fp8

    n = x.numel() * 4
    rows = x.view(-1, 16384)
    k = 16384
    w = x.view(torch.uint8).view(FP8).view(-1, k)  # [N, K]: N = bytes / 16 KiB
    a = torch.ones(16, k, device=x.device).to(FP8)
    one = torch.ones((), device=x.device)
    mm_bytes = n + a.numel() + 16 * w.shape[0] * 2  # weights + activations read, bf16 output written
    experts, gk, per_expert = 64, 4096, 16
    gw = x.view(torch.uint8).view(FP8).view(experts, -1, gk)  # [E, N, K]
    ga = torch.ones(experts * per_expert, gk, device=x.device).to(FP8)
    g_offsets = torch.arange(0, experts + 1, device=x.device, dtype=torch.int64) * per_expert
    g_scale = torch.ones(1, device=x.device)
    g_wscale = torch.ones(experts, device=x.device)
    g_bytes = n + ga.numel() + ga.shape[0] * gw.shape[1] * 2
    return {
        "sum fp32": (lambda: torch.sum(x), n),
        "amax bf16": (lambda: torch.amax(x.view(torch.bfloat16)), n),
        "sum rows fp32": (lambda: rows.sum(dim=1), n),
        "scaled_mm fp8 16 rows": (lambda: torch._scaled_mm(a, w.t(), one, one, out_dtype=torch.bfloat16), mm_bytes),
        "grouped_gemm fp8 16 rows/expert (ours)":
            (lambda: cutlass_grouped_gemm_fp8(ga, gw, g_scale, g_wscale, g_offsets), g_bytes),
    }


def read_bandwidth(nbytes: int = 1 << 30) -> Tuple[float, dict]:
    """The read ceiling in bytes/s, counting bytes moved (read, and the few written): the best of
    read_forms over a buffer of nbytes (far larger than L2, so every replay reads from memory)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_(-1, 1)
    kernels = {name: _kernel_names(fn) for name, (fn, _) in read_forms(x[: 1 << 20]).items()}
    forms = read_forms(x)
    t = measure({name: fn for name, (fn, _) in forms.items()}, reps=10, rounds=3)
    rates = {name: forms[name][1] / s for name, s in t.items() if isinstance(s, float)}
    if not rates:
        raise RuntimeError(f"read ceiling: no read-only kernel could be timed: {dict(t)}")
    return max(rates.values()), {"forms_Bps": rates, "kernels": kernels, "buffer_bytes": nbytes,
                                 "how": "torch reductions (sum, amax), a 16-row cuBLAS FP8 GEMM and our grouped FP8 "
                                        "GEMM at 16 rows per expert over a 1 GiB tensor: SM kernels that only read (the "
                                        "GEMMs write 0.2% of it)"}


def bf16_peak() -> Tuple[float, dict]:
    """Dense bf16 FLOP/s: torch.mm at 8192^3 (the ceiling of the kernels that run bf16 MMAs, such
    as the W4A16 GEMMs, which convert 4-bit weights to bf16 in registers)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = measure({"mm": lambda: torch.mm(a, b)}, reps=10, rounds=1)["mm"]
    return 2 * 8192**3 / t, {"how": "torch.mm 8192^3, bf16"}


def fp8_peak() -> Tuple[float, dict]:
    """Dense FP8 FLOP/s: torch._scaled_mm at 8192^3 with fast accumulation."""
    a = torch.randn(8192, 8192, device="cuda").to(FP8)
    b = torch.randn(8192, 8192, device="cuda").to(FP8).t()
    one = torch.ones((), device="cuda")
    t = measure({"mm": lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16, use_fast_accum=True)},
                reps=10, rounds=1)["mm"]
    return 2 * 8192**3 / t, {"how": "torch._scaled_mm 8192^3, e4m3, fast accumulation"}


CEILINGS = {  # name: (how it is measured, unit of the rate it bounds)
    "copy": (copy_bandwidth, "GB/s"),
    "read": (read_bandwidth, "GB/s"),
    "fp8": (fp8_peak, "TFLOP/s"),
    "bf16": (bf16_peak, "TFLOP/s"),
}
UNIT_SCALE = {"GB/s": 1e9, "TFLOP/s": 1e12}


@dataclass
class Context:
    """What a benchmark module gets: the models and token counts to run, how long to time, the
    ceilings (each measured once per run, on first use) and the progress bar."""

    models: List[Model]
    tokens: Optional[List[int]] = None  # overrides every module's own list
    quick: bool = False
    progress: Optional[Callable[[str], None]] = None  # called once per (model, T) step
    gemm_configs: List[Optional[str]] = field(default_factory=lambda: [None])
    ceilings: Dict[str, float] = field(default_factory=dict)
    ceiling_details: Dict[str, dict] = field(default_factory=dict)

    @property
    def reps(self) -> int:
        return 5 if self.quick else 10

    @property
    def rounds(self) -> int:
        return 2 if self.quick else 3

    def tokens_for(self, full: Sequence[int], quick: Sequence[int]) -> List[int]:
        return list(self.tokens or (quick if self.quick else full))

    def grid(self, full: Sequence[int], quick: Sequence[int]) -> Iterator[Tuple[Model, int]]:
        for model in self.models:
            for T in self.tokens_for(full, quick):
                if self.progress:
                    self.progress(f"{model.name} T={T}")
                yield model, T
            torch.cuda.empty_cache()

    def grid_with(self, full: Sequence[int], quick: Sequence[int], setup: Callable[[Model], object],
                  skip: Callable[[Model], bool] = lambda m: False) -> Iterator[Tuple[Model, int, object]]:
        """grid(), with setup(model) (its weights) made once per model and freed before the next."""
        current, state = None, None
        for model, T in self.grid(full, quick):
            if skip(model):
                continue
            if model is not current:
                current, state = model, None
                torch.cuda.empty_cache()
                state = setup(model)
            yield model, T, state

    def ceiling(self, name: str) -> float:
        if name not in self.ceilings:
            self.ceilings[name], self.ceiling_details[name] = CEILINGS[name][0]()
        return self.ceilings[name]

    def measure(self, fns: Dict[str, Callable], arg_sets: Sequence[tuple] = ((),)) -> Times:
        return measure(fns, arg_sets, reps=self.reps, rounds=self.rounds)

    def roof_us(self, traffic: Traffic, compute: str = "fp8") -> float:
        """The roofline time of `traffic` in microseconds: bytes read at the read ceiling plus bytes
        written at the copy ceiling, or the FLOPs at the `compute` peak ("fp8" or "bf16"),
        whichever is larger (roofline.py says what is counted)."""
        # The copy ceiling counts read + write bytes at one rate: a written byte costs what a
        # copied byte costs (its read is counted separately, at the read ceiling).
        return 1e6 * traffic.roof_s(self.ceiling("read"), self.ceiling("copy"), self.ceiling(compute))

    def row(self, op: str, model: Model, T: int, times: Times, work: Optional[float] = None,
            ceiling: Optional[str] = None, ours: str = "ours", peers: Optional[Sequence[str]] = None,
            traffic: Optional[Traffic] = None, compute: str = "fp8", **extra) -> dict:
        """One result row: our time (times[ours]), the rate and fraction of `ceiling` for `work`
        (bytes for "copy", FLOPs for "fp8"), the roofline of `traffic` (roof_us, and roof = roof_us /
        us: 1.0 is the floor; FLOPs against the `compute` peak) and each peer (default: every other
        contender) with its time and the ratio peer / ours (above 1: we are faster). A fraction
        above 1.0 of a ceiling or of the roofline marks the row ceiling_suspect."""
        t = times[ours]
        ok = isinstance(t, float)
        r = {"op": op, "model": model.name, "T": T, "us": t * 1e6 if ok else None}
        if not ok:
            r["error"] = t
        suspect = False
        if ceiling is not None and work is not None and ok:
            unit = CEILINGS[ceiling][1]
            rate = work / t
            r.update({"rate": rate / UNIT_SCALE[unit], "unit": unit, "ceiling": ceiling,
                      "frac": rate / self.ceiling(ceiling)})
            suspect = r["frac"] > 1.0
        if traffic is not None:
            r.update({"roof_us": self.roof_us(traffic, compute), "roof_compute": compute,
                      "bytes_read": traffic.read, "bytes_written": traffic.written, "flops": traffic.flops})
            if ok:
                r["roof"] = r["roof_us"] / r["us"]
                suspect = suspect or r["roof"] > 1.0
        if ok and (ceiling is not None and work is not None or traffic is not None):
            r["ceiling_suspect"] = suspect
        peer_us, speedup, notes = {}, {}, {}
        for name in peers if peers is not None else [n for n in times if n != ours]:
            p = times[name]
            if isinstance(p, float):
                peer_us[name] = p * 1e6
                speedup[name] = p / t if ok else None
            else:
                peer_us[name], speedup[name], notes[name] = None, None, p
        r.update({"peers_us": peer_us, "speedup": speedup})
        if notes:
            r["peer_errors"] = notes
        if getattr(times, "notes", None):
            r["timing_notes"] = dict(times.notes)
        r.update(extra)
        return r


@contextlib.contextmanager
def _env_var(name: str, value: Optional[str]):
    """The environment variable name = value inside the block (None: unset); its value from before
    is restored after. The ops read these variables on the host at each call, so a graph captured
    inside keeps what they chose."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def forced_gemm_config(config: Optional[str]):
    """MOE_KERNELS_GEMM_CONFIG=config inside the block (None: the automatic choice, or the
    configuration a user's MOE_KERNELS_GEMM_CONFIG forces for the whole run, left in place)."""
    return _env_var("MOE_KERNELS_GEMM_CONFIG", config) if config else contextlib.nullcontext()


def fused_gemm1(on: bool):
    """cutlass_moe_fp8's GEMM1 with the activation in its epilogue where it applies (on, the default)
    or apart (MOE_KERNELS_FUSED_GEMM1=0) inside the block."""
    return _env_var("MOE_KERNELS_FUSED_GEMM1", None if on else "0")
