"""PNG figures of the commands (matplotlib, imported here only, with the Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

__all__ = ["curves", "landscape", "evaluation"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(rows: List[Dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per logged quantity over the epochs of a run (``metrics.jsonl`` rows)."""
    plt = _pyplot()
    panels = [("test_error", "test error"), ("test_nll", "test NLL"), ("test_ece", "test ECE"),
              ("train_loss", "train loss"), ("step", "mean t*"), ("perturbation_norm", "mean ||gamma t* u||"),
              ("grad_norm", "mean ||g||"), ("capped_rate", "capped rate"), ("skipped_rate", "skipped rate")]
    panels = [(k, label) for k, label in panels if any(k in r for r in rows)]
    cols = 3
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(panels) + 2) // 3)),
                             squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["epoch"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def landscape(result: Any, path: Path, title: str) -> Path:
    """The loss along the normalised head gradient (mean over batches) and the histogram of t*."""
    plt = _pyplot()
    summary = result.summary()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(result.steps, result.curve_train, label=f"train batches (median t* {summary['t_star_train']:.3g})")
    left.plot(result.steps, result.curve_test, label=f"test batches (median t* {summary['t_star_test']:.3g})")
    for t, color in ((summary["t_star_train"], "C0"), (summary["t_star_test"], "C1")):
        left.axvline(t, color=color, linestyle="--", linewidth=1)
    left.set_xlabel("t along -g/||g|| (head space)")
    left.set_ylabel("l(t) - l(0), mean over batches")
    left.legend()
    left.grid(alpha=0.3)
    high = max(result.t_train + result.t_test)
    bins = [high * i / 30 for i in range(31)] if high > 0 else 10
    right.hist(result.t_train, bins=bins, alpha=0.6, label="train batches")
    right.hist(result.t_test, bins=bins, alpha=0.6, label="test batches")
    right.set_xlabel("t* of a batch")
    right.set_title(f"test / train = {summary['ratio']:.2f} (the paper: about 2)")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluation(confidence_bins: Sequence[Dict[str, float]], histories: Dict[str, List[float]], path: Path,
               title: str) -> Path:
    """A reliability diagram and the eigenvalue estimates per iteration."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    filled = [b for b in confidence_bins if b["count"] > 0]
    left.bar([b["confidence"] for b in filled], [b["accuracy"] for b in filled], width=0.05, alpha=0.7,
             label="accuracy per bin")
    left.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    left.set_xlabel("confidence")
    left.set_ylabel("accuracy")
    left.legend()
    for name, history in histories.items():
        right.plot(range(1, len(history) + 1), history, marker="o", markersize=3, label=name)
    right.set_xlabel("iteration")
    right.set_ylabel("lambda_max estimate")
    if histories:
        right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
