"""The loop behind ``pof-fast pretrain``: a built-in model trained from scratch with SGD or SAM."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from .. import data as datasets
from ..models import build_model
from ..norm import frozen_norm_stats
from .checkpoints import data_spec, model_spec, rng_state, save_checkpoint, set_rng_state
from .config import PretrainConfig
from .errors import RunError
from .evaluation import evaluate
from .loading import load_run_data
from .run import open_run, progress_bar
from .sampling import epoch_generator, index_batches
from .sam import SAM
from .schedule import lr_factor, set_lr

__all__ = ["pretrain"]


def pretrain(cfg: Optional[PretrainConfig], out: str, *, device: torch.device, resume: bool = False,
             overrides: Optional[Dict[str, Any]] = None, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train a built-in model from scratch with SGD or SAM into the run folder ``out``; returns the last epoch's
    metrics. ``resume``: continue the run in ``out`` with its saved configuration (``cfg`` is not needed);
    ``overrides`` may change the settings of :data:`RESUMABLE` (others are ignored with a warning)."""
    run, state, cfg = open_run("pretrain", PretrainConfig, cfg, out, resume, force, overrides, log)
    data = load_run_data(cfg)
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    run.start()
    base_kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                       weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sam":
        opt: torch.optim.Optimizer = SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, **base_kwargs)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), **base_kwargs)
    else:
        raise RunError(f"--optimizer must be sgd or sam, got {cfg.optimizer!r}")
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start = state["epoch"]
        run.history(start)
    else:
        run.log({"epoch": 0, **{f"test_{k}": v for k, v in evaluate(model, data, device, cfg.workers).items()}})
    spec = model_spec(cfg.model, data)
    log(f"pretrain: {cfg.model} on {data.name} ({len(data.train)} train / {len(data.test)} test rows), "
        f"{cfg.optimizer}{f' rho={cfg.rho}' if cfg.optimizer == 'sam' else ''}, lr {cfg.lr} {cfg.schedule}, "
        f"batch {cfg.batch_size}, {cfg.epochs} epochs" + (f", resumed after epoch {start}" if start else ""))
    row: Dict[str, Any] = {}
    for epoch in range(start + 1, cfg.epochs + 1):
        began = time.perf_counter()
        gen = epoch_generator(cfg.seed, epoch)
        index = index_batches(len(data.train), cfg.batch_size, gen, drop_last=True)
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        rows = 0
        for i, (x, y) in enumerate(progress_bar(datasets.batches(data.train, index, cfg.workers), len(index),
                                             f"pretrain {epoch}/{cfg.epochs}", progress)):
            x, y = datasets.prepare(data, x, y, device, gen)
            lr = set_lr(opt, cfg.lr, lr_factor(cfg.schedule, epoch - 1 + i / len(index), cfg.epochs,
                                               cfg.milestones, cfg.lr_decay))

            def closure() -> Tensor:
                opt.zero_grad()
                if getattr(opt, "second_pass", False):  # SAM's second pass: BatchNorm statistics move once
                    with frozen_norm_stats(model):
                        loss = nn.functional.cross_entropy(model(x), y)
                        loss.backward()
                else:
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                return loss

            loss = opt.step(closure)
            total += loss.detach().double() * len(y)
            rows += len(y)
        test = evaluate(model, data, device, cfg.workers)
        row = {"epoch": epoch, "lr": lr, "train_loss": float(total) / max(rows, 1),
               **{f"test_{k}": v for k, v in test.items()}, "seconds": time.perf_counter() - began}
        run.log(row)
        save_checkpoint(run.last, {"kind": "pretrain", "config": asdict(cfg), "model_spec": spec,
                                   "data_spec": data_spec(cfg), "model": model.state_dict(),
                                   "optimizer": opt.state_dict(), "rng": rng_state(), "epoch": epoch})
        log(f"epoch {epoch:>4}  lr {lr:.4g}  train loss {row['train_loss']:.4f}  test error {test['error']:.2%}  "
            f"NLL {test['nll']:.4f}  ECE {test['ece']:.4f}")
    save_checkpoint(run.dir / "model.pt", {"kind": "model", "model_spec": spec, "data_spec": data_spec(cfg),
                                           "model": model.state_dict(), "config": asdict(cfg)})
    return row
