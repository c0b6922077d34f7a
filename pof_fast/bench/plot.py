"""The speed-up chart: each implementation over the reference loop and over eager, per case (Matplotlib)."""
from __future__ import annotations

import math
from typing import Any, Dict

from .report import label
from .targets import TARGETS

__all__ = ["plot"]


def plot(results: Dict[str, Any], path: str) -> None:
    """Write the bar chart of ``results`` (what :func:`pof_fast.bench.suite.run` returns) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    cases = list(results["cases"].values())
    name = lambda r: f"{label(r)} {r['method']}"  # noqa: E731
    labels = list(dict.fromkeys(name(r) for c in cases for r in c["rows"]
                                if r["kind"] != "floor" and r["name"] != "script"))
    colors = plt.get_cmap("tab20")  # 20 distinct colours: a call and its graph replay get two shades of one
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(labels))
    for ax, baseline in zip(axes, ("script", "eager")):
        for i, bar in enumerate(labels):
            values = [next((r["speedup"][baseline] for r in c["rows"] if name(r) == bar), float("nan")) for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], values, width, label=bar, color=colors(i % 20))
        minimum = [t for t in TARGETS if t.device == results["device"] and t.baseline == baseline]
        if minimum:
            ax.axhline(minimum[0].minimum, color="k", linestyle="--", linewidth=1)
            ax.set_title(f"dashed: target {minimum[0].minimum:g}x", fontsize=9)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(cases))])
        ax.set_xticklabels([f"{c['name']}\nC={c['classes']}" for c in cases])
        ax.set_ylabel(f"speed-up vs {'reference loop' if baseline == 'script' else 'vectorised eager'}")
    handles, names = axes[0].get_legend_handles_labels()
    columns = min(len(names), 5)
    fig.legend(handles, names, loc="lower center", ncol=columns, fontsize=8)
    env = results["env"]
    where = env.get("gpu") or f"{env['cpu']}, torch threads {env['torch_threads']}"
    fig.suptitle(f"PoF line search, one full search ({results['device']}: {where}; torch {env['torch']})")
    legend_rows = math.ceil(len(names) / max(1, columns))
    fig.tight_layout(rect=(0, max(0.1, 0.05 * legend_rows), 1, 1))  # room for the legend below
    fig.savefig(path, dpi=110)
    plt.close(fig)
