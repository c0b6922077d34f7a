"""``pof-fast posttrain``: PoF post-training of a trained classifier's feature extractor (its head stays fixed).

Writes into --out: ``last.pt`` (a checkpoint after every epoch: model, optimizer, PoF state, RNG, epoch;
``--resume`` continues from it exactly), ``metrics.jsonl`` (per epoch: mean t*, perturbation norm, ||g||,
capped and skipped rates, train loss, test error, NLL and ECE), ``best.pt`` (lowest test NLL), ``model.pt``
(the final model; the best one when ``--stop-on-runaway`` stopped the run) and, with ``--plot``, ``curves.png``.

Under ``torchrun --nproc_per_node N`` every rank trains on its share of the rows (``--batch-size`` and
``--search-batch-size`` per rank) and PoF searches the union of the ranks' search batches; rank 0 evaluates,
prints and writes --out (see ``pof_fast.training.world``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..training import BASE_OPTIMIZERS, SCHEDULES, PostTrainConfig
from .common import (add_data_options, add_model_options, add_run_options, command, config, defaults_from, given,
                     int_list, log, positive_int)

D = PostTrainConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_data_options(p, None)
    g = p.add_argument_group("PoF (see pof_fast.PoF)")
    g.add_argument("--gamma", type=float, default=D.gamma, help=f"perturbation factor (default {D.gamma})")
    g.add_argument("--gamma-sampling", choices=("uniform", "fixed"), default=D.gamma_sampling,
                   help="uniform: gamma ~ U(0, --gamma) every step (stable; default); fixed: --gamma itself")
    g.add_argument("--method", choices=("newton", "bracket_grid", "grid"), default=D.method, help="line search")
    g.add_argument("--direction", choices=("normalized", "raw"), default=D.direction, help="u = g/||g|| or g")
    g.add_argument("--max-step", type=float, default=D.max_step, help=f"largest t searched (default {D.max_step})")
    g.add_argument("--on-capped", choices=("skip", "clip"), default=D.on_capped,
                   help="a search that hit --max-step: no perturbation (skip, default) or t* = --max-step (clip)")
    g.add_argument("--norm-stats", choices=("frozen", "update"), default=D.norm_stats,
                   help="BatchNorm in the search forward: batch statistics with running statistics kept (frozen, "
                        "default) or moved (update, as the authors' script)")
    g.add_argument("--search-batch-size", type=positive_int, default=D.search_batch_size,
                   help=f"rows of the search batch (default {D.search_batch_size})")
    g.add_argument("--backend", default=D.backend, help="auto, torch, cpp, triton or cuda (default auto)")
    t = p.add_argument_group("training")
    t.add_argument("--base-optimizer", choices=BASE_OPTIMIZERS, default=D.base_optimizer,
                   help="sgd (momentum, Nesterov, weight decay; default), adam or adamw")
    t.add_argument("--lr", type=float, default=D.lr, help=f"(default {D.lr})")
    t.add_argument("--momentum", type=float, default=D.momentum, help=f"sgd (default {D.momentum})")
    t.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="sgd: plain momentum")
    t.add_argument("--weight-decay", type=float, default=D.weight_decay, help=f"(default {D.weight_decay})")
    t.add_argument("--schedule", choices=SCHEDULES, default=D.schedule, help=f"(default {D.schedule})")
    t.add_argument("--milestones", type=int_list, default=D.milestones, help="step schedule: epochs, comma-separated")
    t.add_argument("--lr-decay", type=float, default=D.lr_decay, help=f"step schedule factor (default {D.lr_decay})")
    t.add_argument("--epochs", type=positive_int, default=D.epochs, help=f"(default {D.epochs})")
    t.add_argument("--batch-size", type=positive_int, default=D.batch_size,
                   help=f"rows of the training batch (default {D.batch_size})")
    r = p.add_argument_group("runaway guard")
    r.add_argument("--runaway-window", type=positive_int, default=D.runaway_window,
                   help="warn when the mean t* (or perturbation norm) grew and the test NLL rose for this many "
                        f"epochs in a row (each by >= 10%% in all) (default {D.runaway_window})")
    r.add_argument("--stop-on-runaway", action="store_true", help="then stop, and keep the best epoch as model.pt")
    add_run_options(p, "runs/posttrain", "curves.png")


@command("posttrain")
def run(args: argparse.Namespace) -> int:
    from ..training import RunError, launch, posttrain
    from .evaluate import fill_data_from_checkpoint
    from .pretrain import plot_curves

    with launch(args.device) as world:  # under torchrun: the process group, for the whole run
        if not args.resume:
            if not args.checkpoint:
                raise RunError("--checkpoint FILE is needed (the trained model to post-train)")
            if not Path(args.checkpoint).is_file():
                raise RunError(f"checkpoint not found: {args.checkpoint}")
            fill_data_from_checkpoint(args)
        cfg = config(PostTrainConfig, args)
        result = posttrain(cfg, args.out, device=world.device, resume=args.resume,
                           overrides=given(PostTrainConfig, args), force=args.force, progress=not args.no_progress,
                           log=log, world=world)
    if not world.main:
        return 0
    before = result["before"]
    if "test_error" in result:
        log(f"test error {before['test_error']:.2%} -> {result['test_error']:.2%}, NLL {before['test_nll']:.4f} -> "
            f"{result['test_nll']:.4f}, ECE {before['test_ece']:.4f} -> {result['test_ece']:.4f}"
            + (f"; runaway warnings at epochs {result['runaway']}" if result["runaway"] else ""))
    log(f"model: {Path(args.out) / 'model.pt'}; metrics: {Path(args.out) / 'metrics.jsonl'}")
    if args.plot:
        plot_curves(Path(args.out), "posttrain (PoF)")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("posttrain", help="PoF post-training of a trained classifier's feature extractor",
                              description=__doc__.splitlines()[0].replace("``", ""))
    add_arguments(p)
    defaults_from(p, PostTrainConfig)
    p.set_defaults(func=run)
