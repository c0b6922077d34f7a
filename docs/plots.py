"""The site's figures, drawn from what the pages and the project's commands already hold.

    python docs/plots.py            # writes docs/images/*.png

- ``stability_grid.png``: the stability table on docs/stability.md (``benchmarks/stability.py``'s output), the change
  of test error against plain SGD per model, lr and gamma choice, each cell with its verdict.
- ``landscape.png`` and ``tstar.png``: the JSON lines ``pof-fast landscape`` wrote into docs/data/ (the commands
  are in docs/data/README.md): the loss along the head's normalised gradient, and the t* of training and test
  batches, for the pretrained model and for the same model after ``pof-fast posttrain``.
- ``benchmark_bars.png``: the table on docs/benchmarks.md, pof-fast's speed-up over each baseline per case.

The figures read the tables as published, so a figure cannot disagree with the table beside it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colors, ticker  # noqa: E402

DOCS = Path(__file__).resolve().parent
IMAGES = DOCS / "images"
LANDSCAPES = (("pretrained (SAM)", "landscape-pre.jsonl"), ("after PoF", "landscape-pof.jsonl"))
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def table(page: Path, first_header: str) -> List[Dict[str, str]]:
    """The rows of the markdown table on ``page`` whose first header cell is ``first_header``."""
    lines = page.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    header = cells(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line))))
    return rows


def stability_grid(out: Path) -> Path:
    rows = [r for r in table(DOCS / "stability.md", "model") if r["verdict"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    configs = list(dict.fromkeys(r["gamma sampling"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 3.6), squeeze=False,
                             gridspec_kw={"wspace": 0.3})
    norm = colors.TwoSlopeNorm(vmin=-1.0, vcenter=0.0, vmax=16.0)
    for ax, model in zip(axes[0], models):
        cells = [r for r in rows if r["model"] == model]
        lrs = list(dict.fromkeys(r["lr"] for r in cells))
        grid = [[float("nan")] * len(configs) for _ in lrs]
        for r in cells:
            i, j = lrs.index(r["lr"]), configs.index(r["gamma sampling"])
            grid[i][j] = float(r["d test error (points)"].split()[0])
            ax.text(j, i, f"{grid[i][j]:+.2f}\n{r['verdict']}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i][j] > 6 else "black")
        image = ax.imshow(grid, cmap="RdYlGn_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(configs)), [c.replace("uniform ", "U") for c in configs])
        ax.set_yticks(range(len(lrs)), [f"lr {lr}" for lr in lrs])
        ax.set_title(f"{model}: test error against plain SGD (points, mean of seeds)", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="points of test error")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def landscapes() -> List[Tuple[str, Dict]]:
    return [(name, json.loads((DOCS / "data" / file).read_text().splitlines()[-1])) for name, file in LANDSCAPES]


def landscape(out: Path) -> Path:
    fig, axes = plt.subplots(1, len(LANDSCAPES), figsize=(5.5 * len(LANDSCAPES), 3.8), sharey=True, squeeze=False)
    for ax, (name, run) in zip(axes[0], landscapes()):
        for split, color in (("train", "C0"), ("test", "C1")):
            ax.plot(run["steps"], run[f"curve_{split}"], color=color,
                    label=f"{split} batches (median t* {run[f't_star_{split}']:.3g})")
            ax.axvline(run[f"t_star_{split}"], color=color, linestyle="--", linewidth=1)
        ax.set_xlabel("t along -g/||g|| (head space)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("l(t) - l(0), mean over batches")
    return save(fig, out)


def tstar(out: Path) -> Path:
    runs = landscapes()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), sharex=True, squeeze=False)
    high = max(max(run["t_train"] + run["t_test"]) for _, run in runs)
    bins = [high * i / 30 for i in range(31)]
    for ax, (name, run) in zip(axes[0], runs):
        ax.hist(run["t_train"], bins=bins, alpha=0.6, label="training batches")
        ax.hist(run["t_test"], bins=bins, alpha=0.6, label="test batches")
        ax.set_title(f"{name}: median t* test / train = {run['ratio']:.2f}", fontsize=10)
        ax.set_xlabel("t* of a batch (128 rows)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("batches")
    return save(fig, out)


def seconds(cell: str) -> float:
    match = re.match(r"([\d.]+) (us|ms|s)\b", cell)
    return float(match.group(1)) * UNITS[match.group(2)] if match else float("nan")


def benchmark_bars(out: Path) -> Path:
    rows = table(DOCS / "benchmarks.md", "case (SPEC section 5)")
    baselines = ["reference loop", "vectorised eager", "`torch.compile` of eager"]
    ours = "pof-fast `auto`"
    panels = [("H200", [r for r in rows if "H200" in r["case (SPEC section 5)"]]),
              ("one CPU thread", [r for r in rows if "1 CPU thread" in r["case (SPEC section 5)"]])]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4), sharey=True, squeeze=False)
    width = 0.8 / len(baselines)
    for ax, (where, cases) in zip(axes[0], panels):
        for i, baseline in enumerate(baselines):
            speedup = [seconds(r[baseline]) / seconds(r[ours]) for r in cases]
            ax.bar([x + i * width for x in range(len(cases))], speedup, width, label=f"over {baseline.replace('`', '')}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks([x + width for x in range(len(cases))],
                      [r["case (SPEC section 5)"].split(",")[0].split(" (")[0] for r in cases])
        ax.set_title(f"{where} ({', '.join(sorted({r[ours].split('(')[-1].strip('`)') for r in cases}))} backend)")
    axes[0][0].set_ylabel("pof-fast's speed-up (bracket_grid)")
    axes[0][0].legend(fontsize=8)
    return save(fig, out)


def main() -> int:
    IMAGES.mkdir(exist_ok=True)
    for draw in (stability_grid, landscape, tstar, benchmark_bars):
        print(draw(IMAGES / f"{draw.__name__}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
