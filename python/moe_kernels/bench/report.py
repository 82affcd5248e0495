"""What a run leaves: the environment it ran in, one table, the JSON of every row."""

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import List, Optional

import torch


def git_commit() -> Optional[str]:
    """The commit of the source tree we run from (the current directory's, else the package's)."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return None


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({"device": props.name, "sm_count": props.multi_processor_count})
    # Host timings depend on the CPU and on what else runs on it.
    env.update({"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None})
    return env


def default_out_dir() -> Path:
    """bench/results when run from the repository's root, else the current directory."""
    results = Path("bench") / "results"
    return results if results.is_dir() else Path(".")


def result_path(out_dir: Path, env: dict, ops: List[str], quick: bool) -> Path:
    device = env.get("device", "cpu").replace(" ", "_")
    tag = "-".join(ops) + ("_quick" if quick else "")
    return Path(out_dir) / f"bench_{tag}_{device}_{env['date'][:10]}.json"


def save(path: Path, env: dict, ceilings: dict, rows: List[dict], args: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "args": args, "ceilings": ceilings, "rows": rows}, indent=1))
    return path


SUSPECT = "CEILING SUSPECT"


def _num(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def cells(r: dict) -> List[str]:
    rate = f"{_num(r['rate'])} {r['unit']}" if r.get("rate") is not None else "-"
    frac = f"{r['frac']:.2f} {r['ceiling']}" if r.get("frac") is not None else "-"
    if r.get("ceiling_suspect"):
        frac += f" {SUSPECT}"
    roof = "-"
    if r.get("roof_us") is not None:
        roof = f"{r['roof']:.2f} of {_num(r['roof_us'])}us" if r.get("roof") is not None else f"{_num(r['roof_us'])}us"
        if r.get("roof") is not None and r["roof"] > 1.0:
            roof += f" {SUSPECT}"
    peers = "  ".join(f"{name} {_num(x)}x" if x is not None else f"{name} n/a"
                      for name, x in r.get("speedup", {}).items())
    if r.get("wrapper_us") is not None or r.get("p90_us") is not None:  # host rows
        peers = f"wrapper {_num(r.get('wrapper_us'))} us, p10 {_num(r.get('p10_us'))} p90 {_num(r.get('p90_us'))}"
    us = _num(r["us"]) if r.get("us") is not None else f"error: {r.get('error', '?')}"
    if r.get("us") is None and str(r.get("error", "")).startswith("skipped"):
        us, peers = "skipped", str(r["error"])[len("skipped: "):]  # the reason last: the columns stay narrow
    return [r["op"], r["model"], str(r["T"]), us, rate, frac, roof, peers]


HEADER = ["op", "model", "T", "us", "rate", "of ceiling", "of roofline", "peer time / ours"]


def format_table(rows: List[dict]) -> str:
    table = [HEADER] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER) - 1)]
    lines = []
    for line in table:
        left = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(left + [line[-1]]).rstrip())
    return "\n".join(lines)


def suspects(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r.get("ceiling_suspect")]


def suspect_text(r: dict) -> str:
    """Which fraction of a suspect row is above 1.0."""
    parts = []
    if r.get("frac") is not None and r["frac"] > 1.0:
        parts.append(f"{r['frac']:.2f} of {r['ceiling']}")
    if r.get("roof") is not None and r["roof"] > 1.0:
        parts.append(f"{r['roof']:.2f} of its roofline ({r['roof_us']:.3g} us)")
    return f"{r['op']} {r['model']} T={r['T']}: " + ", ".join(parts)


def ceiling_text(name: str, value: float, details: Optional[dict] = None) -> str:
    details = details or {}
    if name == "copy":
        forms = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in details.get("forms_Bps", {}).items())
        memcpy = details.get("graph_memcpy_Bps")
        memcpy = f"; graph memcpy {memcpy / 1e9:.0f} GB/s, not used" if isinstance(memcpy, float) else ""
        return f"{value / 1e9:.0f} GB/s read + write, best SM copy kernel of: {forms}{memcpy}"
    if name == "read":
        forms = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in details.get("forms_Bps", {}).items())
        return f"{value / 1e9:.0f} GB/s read only, best read-only SM kernel of: {forms}"
    return f"{value / 1e12:.0f} TFLOP/s ({details.get('how', '')})"
