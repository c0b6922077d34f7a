"""``pof-fast eval``: test error, NLL, calibration (ECE) and head-space sharpness of a trained classifier.

Sharpness is the largest eigenvalue of the Hessian of the training loss with respect to the head's parameters
(``--hessian head``, the space PoF flattens), optionally with respect to every parameter of the network
(``--hessian network`` or ``both``), by Lanczos (or power iteration) on Hessian-vector products from a seeded
start vector; the iterations, the residual and whether it converged are reported. Appends one JSON line to
``OUT/eval.jsonl``; ``--plot`` writes ``OUT/eval.png`` (reliability diagram, eigenvalue estimates).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

from .common import (add_data_options, add_model_options, add_run_options, command, log, plot_or_say,
                     positive_int, write_json_line)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_data_options(p, None)
    g = p.add_argument_group("sharpness")
    g.add_argument("--hessian", choices=("head", "network", "both", "none"), default="head",
                   help="lambda_max of the training-loss Hessian w.r.t. the head (default), the whole network, both")
    g.add_argument("--hessian-method", choices=("lanczos", "power"), default="lanczos", help="(default lanczos)")
    g.add_argument("--hessian-iters", type=positive_int, default=50, help="most iterations (default 50)")
    g.add_argument("--hessian-tol", type=float, default=1e-3,
                   help="converged when ||H v - lambda v|| <= tol * lambda (default 1e-3)")
    g.add_argument("--hessian-samples", type=positive_int, default=2048,
                   help="training rows the Hessian is taken over (a seeded choice; default 2048)")
    g.add_argument("--bins", type=positive_int, default=15, help="ECE bins (default 15)")
    add_run_options(p, None, "eval.png", resumable=False)


def measure(model: Any, phi: Any, head: Any, data: Any, device: Any, *, hessian: str = "head",
            method: str = "lanczos", iters: int = 50, tol: float = 1e-3, samples: int = 2048, seed: int = 0,
            bins: int = 15, workers: int = 0, progress: bool = False) -> Dict[str, Any]:
    """Test error, NLL, ECE (+ per-bin rows) and the requested sharpness, as one flat dict."""
    from tqdm.auto import tqdm

    from ..metrics import calibration_bins, classification_metrics
    from ..training import head_sharpness, network_sharpness, predict

    logits, labels = predict(model, data, "test", device, workers=workers)
    row: Dict[str, Any] = {f"test_{k}": v for k, v in classification_metrics(logits, labels, bins).items()}
    row["calibration"] = calibration_bins(logits, labels, bins)
    histories = {}
    for part, run in (("head", head_sharpness), ("network", network_sharpness)):
        if hessian not in (part, "both"):
            continue
        with tqdm(total=iters, desc=f"{part} Hessian ({method})", disable=not progress, leave=False) as bar:
            def tick(i: int, value: float, residual: float) -> None:
                bar.update(1)
                bar.set_postfix(lambda_max=f"{value:.5g}", residual=f"{residual:.1e}")

            args = (phi, head) if part == "head" else (model,)
            eig = run(*args, data, device, samples=samples, method=method, iters=iters, tol=tol, seed=seed,
                      workers=workers, on_iteration=tick)
        row.update(eig.as_dict(f"{part}_"))
        histories[part] = eig.history
    row["histories"] = histories
    return row


def describe(row: Dict[str, Any]) -> str:
    lines = [f"test error {row['test_error']:.2%}   NLL {row['test_nll']:.4f}   ECE {row['test_ece']:.4f}"]
    for part in ("head", "network"):
        if f"{part}_lambda_max" in row:
            state = "converged" if row[f"{part}_converged"] else "NOT converged (raise --hessian-iters)"
            lines.append(f"{part} sharpness lambda_max {row[f'{part}_lambda_max']:.6g}  ({row[f'{part}_method']}, "
                         f"{row[f'{part}_iterations']} iterations, residual {row[f'{part}_residual']:.2e}, {state})")
    return "\n".join(lines)


@command("eval")
def run(args: argparse.Namespace) -> int:
    from ..training import PostTrainConfig, RunError, prepare_posttrain, resolve_device
    from .common import config

    device = resolve_device(args.device)
    if not args.checkpoint:
        raise RunError("--checkpoint FILE is needed (the model to evaluate)")
    if not (0.0 < args.hessian_tol < 1.0):
        raise RunError(f"--hessian-tol must be in (0, 1), got {args.hessian_tol}")
    fill_data_from_checkpoint(args)
    import torch

    torch.manual_seed(args.seed)
    model, phi, head, data, _ = prepare_posttrain(config(PostTrainConfig, args), device)
    row = measure(model, phi, head, data, device, hessian=args.hessian, method=args.hessian_method,
                  iters=args.hessian_iters, tol=args.hessian_tol, samples=args.hessian_samples, seed=args.seed,
                  bins=args.bins, workers=args.workers, progress=not args.no_progress)
    log(f"{args.checkpoint} on {data.name} ({len(data.test)} test rows)")
    log(describe(row))
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent
    write_json_line(out / "eval.jsonl", {"checkpoint": str(args.checkpoint), "data": data.name, "seed": args.seed,
                                         **{k: v for k, v in row.items() if k != "histories"},
                                         "histories": row["histories"]})
    log(f"metrics: {out / 'eval.jsonl'}")
    if args.plot:
        from . import plots

        plot_or_say(lambda: plots.evaluation(row["calibration"], row["histories"], out / "eval.png",
                                             f"eval: {args.checkpoint}"))
    return 0


def fill_data_from_checkpoint(args: argparse.Namespace) -> None:
    """--data not given: the checkpoint's data (its --data-dir and --image-size too), else digits."""
    from ..training import checkpoint_data_spec

    if args.data is None:
        spec = checkpoint_data_spec(args.checkpoint) or {"data": "digits"}
        args.data = spec["data"]
        if args.data_dir is None:
            args.data_dir = spec.get("data_dir")
        args.image_size = spec.get("image_size", args.image_size)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="test error, NLL, ECE and head-space sharpness (Hessian lambda_max)",
                              description=__doc__.splitlines()[0].replace("``", ""))
    add_arguments(p)
    p.set_defaults(func=run)
