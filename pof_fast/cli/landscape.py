"""``pof-fast landscape``: the paper's figure: the loss along each batch's normalised head gradient.

For random training batches and random test batches, ``l(t) = L(theta0 - t g/||g||)`` along the batch's own
normalised head gradient, its minimiser ``t*`` (exact, Newton), and ``median t*(test) / median t*(train)``: the
paper reports about 2 (why PoF perturbs with gamma = 2). Appends one JSON line to ``OUT/landscape.jsonl`` and
writes ``OUT/landscape.png`` (mean curves and the histogram of t*; ``--no-plot`` skips it).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (add_data_options, add_model_options, add_run_options, command, log, plot_or_say, positive_int,
                     write_json_line)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_data_options(p, None)
    g = p.add_argument_group("landscape")
    g.add_argument("--batch-size", type=positive_int, default=128, help="rows per batch (default 128)")
    g.add_argument("--batches", type=positive_int, default=32, help="batches of each split (default 32)")
    g.add_argument("--max-step", type=float, default=100.0, help="largest t searched (default 100)")
    g.add_argument("--no-plot", action="store_true", help="do not write landscape.png")
    add_run_options(p, None, None, resumable=False)


@command("landscape")
def run(args: argparse.Namespace) -> int:
    import torch

    from ..training import PostTrainConfig, RunError, landscape_of, prepare_posttrain, resolve_device
    from .common import config
    from .evaluate import fill_data_from_checkpoint

    device = resolve_device(args.device)
    if not args.checkpoint:
        raise RunError("--checkpoint FILE is needed (the model to look at)")
    if not (0.0 < args.max_step < float("inf")):
        raise RunError(f"--max-step must be a finite number > 0, got {args.max_step}")
    fill_data_from_checkpoint(args)
    torch.manual_seed(args.seed)
    model, phi, head, data, _ = prepare_posttrain(config(PostTrainConfig, args), device)
    result = landscape_of(phi, head, data, device, batch_size=args.batch_size, batches=args.batches,
                          max_step=args.max_step, seed=args.seed, workers=args.workers)
    s = result.summary()
    log(f"{args.checkpoint} on {data.name}: {s['batches_train']} train / {s['batches_test']} test batches of "
        f"{min(args.batch_size, len(data.test))} rows")
    log(f"median t*: train {s['t_star_train']:.4g}, test {s['t_star_test']:.4g}; test / train = {s['ratio']:.3f} "
        f"(the paper: about 2); capped searches: train {s['capped_train']}, test {s['capped_test']}")
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent
    write_json_line(out / "landscape.jsonl", {"checkpoint": str(args.checkpoint), "data": data.name,
                                              "seed": args.seed, **s, "t_train": result.t_train,
                                              "t_test": result.t_test, "steps": result.steps,
                                              "curve_train": result.curve_train, "curve_test": result.curve_test})
    log(f"metrics: {out / 'landscape.jsonl'}")
    if not args.no_plot:
        from . import plots

        plot_or_say(lambda: plots.landscape(result, out / "landscape.png", f"landscape: {args.checkpoint}"))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("landscape", help="loss along the normalised head gradient on train and test batches; "
                                                "the t* ratio (the paper: about 2) and a PNG",
                              description=__doc__.splitlines()[0].replace("``", ""))
    add_arguments(p)
    p.set_defaults(func=run)
