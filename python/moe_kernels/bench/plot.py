"""--plot: our speedup over each peer (peer time / our time) against T, one panel per op, log-x;
and for every op whose rows carry a roofline (gemm*, layer*), a panel of the fraction of the
roofline (roof = roof_us / us; 1.0 is the floor) against T, one line per model."""

import math
from pathlib import Path
from typing import List

MISSING = "--plot needs matplotlib, which is not installed: pip install matplotlib"


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def plot(rows: List[dict], path: Path) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise RuntimeError(MISSING) from e
    ops = list(dict.fromkeys(r["op"] for r in rows))
    roof_ops = [op for op in ops if any(r["op"] == op and r.get("roof") is not None for r in rows)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    peers = list(dict.fromkeys(p for r in rows for p in r.get("speedup", {})))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(peers)}
    markers = {m: "osD^vP*X"[i % 8] for i, m in enumerate(models)}
    panels = len(ops) + len(roof_ops)
    cols = min(4, max(1, panels))
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, op in zip(list(axes.flat)[len(ops):], roof_ops):
        for model in models:
            pts = sorted((r["T"], r["roof"]) for r in rows
                         if r["op"] == op and r["model"] == model and r.get("roof") is not None)
            if pts:
                ax.plot(*zip(*pts), color="black", marker=markers[model], markersize=4, linewidth=1)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        tops = [r["roof"] for r in rows if r["op"] == op and r.get("roof") is not None]
        ax.set_ylim(0, max([1.2] + [1.05 * v for v in tops]))  # a suspect above 1.0 stays in view
        ax.set_title(f"{op}: fraction of roofline", fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("roof_us / us")
    for ax, op in zip(axes.flat, ops):
        for model in models:
            mine = sorted((r for r in rows if r["op"] == op and r["model"] == model), key=lambda r: r["T"])
            for peer in peers:
                pts = [(r["T"], r["speedup"][peer]) for r in mine if r.get("speedup", {}).get(peer) is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colors[peer], marker=markers[model], markersize=4, linewidth=1)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # ratios from 0.5x to 50x: equal factors look equal
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("speedup (peer / ours)")
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[p], label=p) for p in peers]
    handles += [plt.Line2D([], [], color="black", marker=markers[m], linestyle="", label=m) for m in models]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    legend_inches = 0.15 + 0.22 * math.ceil(len(handles) / 6)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
