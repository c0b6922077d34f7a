"""``pof-fast pretrain``: train a built-in classifier from scratch with SGD or SAM (the model PoF starts from).

Writes into --out: ``last.pt`` (a checkpoint after every epoch; ``--resume`` continues from it exactly),
``metrics.jsonl`` (one line per epoch), ``model.pt`` (the trained model, for ``posttrain``/``eval``) and, with
``--plot``, ``curves.png``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..training import PretrainConfig, SCHEDULES
from .common import (add_data_options, add_run_options, command, config, defaults_from, given, int_list, log,
                     plot_or_say, positive_int)

D = PretrainConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..models import MODELS

    add_data_options(p, "digits")
    g = p.add_argument_group("training")
    g.add_argument("--model", choices=list(MODELS), default=D.model,
                   help=f"mlp, cnn (small, with BatchNorm), wrn16-4, wrn28-10, resnet18 (32x32) (default {D.model})")
    g.add_argument("--optimizer", choices=("sgd", "sam"), default=D.optimizer,
                   help="sgd (momentum, Nesterov, weight decay) or sam (SAM around that SGD) (default sgd)")
    g.add_argument("--rho", type=float, default=D.rho, help=f"SAM's neighbourhood radius (default {D.rho})")
    g.add_argument("--lr", type=float, default=D.lr, help=f"peak learning rate (default {D.lr})")
    g.add_argument("--momentum", type=float, default=D.momentum, help=f"(default {D.momentum})")
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum instead of Nesterov")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay, help=f"(default {D.weight_decay})")
    g.add_argument("--schedule", choices=SCHEDULES, default=D.schedule,
                   help="learning-rate schedule: cosine (per step), step (x --lr-decay at --milestones) or constant")
    g.add_argument("--milestones", type=int_list, default=D.milestones,
                   help="step schedule: comma-separated epochs (default: half and three quarters of --epochs)")
    g.add_argument("--lr-decay", type=float, default=D.lr_decay, help=f"step schedule factor (default {D.lr_decay})")
    g.add_argument("--epochs", type=positive_int, default=D.epochs, help=f"(default {D.epochs})")
    g.add_argument("--batch-size", type=positive_int, default=D.batch_size, help=f"(default {D.batch_size})")
    add_run_options(p, "runs/pretrain", "curves.png")


@command("pretrain")
def run(args: argparse.Namespace) -> int:
    from ..training import pretrain, resolve_device

    device = resolve_device(args.device)
    cfg = config(PretrainConfig, args)
    pretrain(cfg, args.out, device=device, resume=args.resume, overrides=given(PretrainConfig, args), force=args.force,
             progress=not args.no_progress, log=log)
    log(f"model: {Path(args.out) / 'model.pt'}; metrics: {Path(args.out) / 'metrics.jsonl'}")
    if args.plot:
        plot_curves(Path(args.out), "pretrain")
    return 0


def plot_curves(out: Path, title: str) -> None:
    from . import plots

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plot_or_say(lambda: plots.curves(rows, out / "curves.png", f"{title}: {out}"))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("pretrain", help="train a classifier from scratch with SGD or SAM",
                              description=__doc__.splitlines()[0].replace("``", ""))
    add_arguments(p)
    defaults_from(p, PretrainConfig)
    p.set_defaults(func=run)
