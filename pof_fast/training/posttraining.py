"""The loop behind ``pof-fast posttrain``: PoF post-training of a trained classifier's feature extractor."""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

from .. import data as datasets
from .checkpoints import data_spec, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import BASE_OPTIMIZERS, PostTrainConfig
from .errors import RunError
from .evaluation import evaluate
from .loading import prepare_posttrain
from .run import open_run, progress_bar
from .runaway import RunawayGuard
from .sampling import epoch_generator, index_batches, search_batches
from .schedule import lr_factor, set_lr
from .world import World

__all__ = ["posttrain"]


def _base_class(name: str) -> Tuple[Type[torch.optim.Optimizer], Callable[[PostTrainConfig], Dict[str, Any]]]:
    if name == "sgd":
        return torch.optim.SGD, lambda c: dict(lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
                                               weight_decay=c.weight_decay)
    if name == "adam":
        return torch.optim.Adam, lambda c: dict(lr=c.lr, weight_decay=c.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW, lambda c: dict(lr=c.lr, weight_decay=c.weight_decay)
    raise RunError(f"--base-optimizer must be one of {', '.join(BASE_OPTIMIZERS)}, got {name!r}")


def posttrain(cfg: Optional[PostTrainConfig], out: str, *, device: torch.device, resume: bool = False,
              overrides: Optional[Dict[str, Any]] = None, force: bool = False, progress: bool = True,
              log: Callable[[str], None] = print, world: Optional[World] = None) -> Dict[str, Any]:
    """PoF post-training of the feature extractor of ``cfg.checkpoint`` into the run folder ``out``; returns the
    final epoch's metrics (with ``"runaway"``: the epochs where the guard fired, ``"stopped"``, ``"best_epoch"``
    and ``"before"``: the starting model's test metrics). ``resume``/``overrides`` as in :func:`pretrain`.

    ``world`` (from :func:`pof_fast.training.launch`, under ``torchrun``): every rank trains on its share of each
    epoch's rows (``batch_size`` rows per rank and step) with the feature extractor in DistributedDataParallel,
    and PoF searches the union of the ranks' search batches (``search_batch_size`` rows per rank), so all ranks
    perturb the head identically. Rank 0 evaluates and its test metrics go to every rank (the runaway guard and
    the best epoch agree); rank 0 alone prints and writes the run folder.
    """
    from ..optim import PoF

    world = world or World(device)
    if not world.main:
        log, progress = _silent, False
    run, state, cfg = open_run("posttrain", PostTrainConfig, cfg, out, resume, force, overrides, log)
    torch.manual_seed(cfg.seed)
    model, phi, head, data, spec = prepare_posttrain(cfg, device)
    if "file" in spec:
        spec = dict(spec, head=cfg.head)
    base, kwargs = _base_class(cfg.base_optimizer)
    head_ids = {id(p) for p in head.parameters()}
    params = [p for p in model.parameters() if id(p) not in head_ids]
    distributed = world.group is not None
    opt = PoF(params, base, head=head, gamma=cfg.gamma, gamma_sampling=cfg.gamma_sampling, method=cfg.method,
              direction=cfg.direction, max_step=cfg.max_step, on_capped=cfg.on_capped, backend=cfg.backend,
              seed=cfg.seed, process_group=world.group, freeze_head=True if distributed else None, **kwargs(cfg))
    guard = RunawayGuard(cfg.runaway_window)
    best = {"epoch": 0, "test_nll": math.inf}
    start = 0
    if world.main:
        run.start()
    before = world.from_main(evaluate(model, data, device, cfg.workers) if world.main else None)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        guard = RunawayGuard(cfg.runaway_window, history=[tuple(h) for h in state["guard"]["history"]],
                             fired_at=list(state["guard"]["fired_at"]))
        best, start = dict(state["best"]), state["epoch"]
        if world.main:
            run.history(start)
    else:
        best = {"epoch": 0, "test_nll": before["nll"]}
        if world.main:
            run.log({"epoch": 0, **{f"test_{k}": v for k, v in before.items()}})
            save_checkpoint(run.dir / "best.pt", _final(spec, cfg, model, 0))
    extractor = world.wrap(phi)  # the training forward; the search forward (no gradients) runs phi itself
    log(f"posttrain: PoF on {data.name}, gamma {cfg.gamma} ({cfg.gamma_sampling}), {cfg.method}/{cfg.direction}, "
        f"{cfg.base_optimizer} lr {cfg.lr} {cfg.schedule}, search batch {cfg.search_batch_size}, train batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs" + (f", resumed after epoch {start}" if start else ""))
    log(f"{'epoch':>5} {'t*':>8} {'||pert||':>8} {'||g||':>7} {'capped':>6} {'skipped':>7} {'train':>7} "
        f"{'test err':>8} {'NLL':>7} {'ECE':>6}")
    row: Dict[str, Any] = {}
    trace: List[Dict[str, Any]] = []  # this rank's own numbers, for the test hook (World.dump)
    stopped = False
    loss_fn = nn.functional.cross_entropy
    for epoch in range(start + 1, cfg.epochs + 1):
        began = time.perf_counter()
        gen = epoch_generator(cfg.seed, epoch)
        index = index_batches(len(data.train), cfg.batch_size, gen, drop_last=True, rank=world.rank, ranks=world.size)
        search_index = search_batches(len(data.train), cfg.search_batch_size, len(index), gen, world.rank, world.size)
        model.train()
        phi.train()  # a split copy of the model's root keeps its own training flag
        opt.reset_summary()
        total = torch.zeros((), dtype=torch.float64, device=device)
        rows = 0
        pairs = zip(datasets.batches(data.train, index, cfg.workers),
                    datasets.batches(data.train, search_index, cfg.workers))
        for i, ((x, y), (xs, ys)) in enumerate(progress_bar(pairs, len(index), f"PoF {epoch}/{cfg.epochs}", progress)):
            x, y = datasets.prepare(data, x, y, device, gen)
            xs, ys = datasets.prepare(data, xs, ys, device, gen)
            lr = set_lr(opt, cfg.lr, lr_factor(cfg.schedule, epoch - 1 + i / len(index), cfg.epochs,
                                               cfg.milestones, cfg.lr_decay))
            opt.perturb(opt.search_features(phi, xs, norm_stats=cfg.norm_stats), ys)
            opt.zero_grad()
            loss = loss_fn(head(extractor(x)), y)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(y)
            rows += len(y)
        pof = opt.summary()
        local_loss = float(total) / max(rows, 1)
        summed = world.sum(torch.stack([total, total.new_tensor(rows)])) if distributed else None
        train_loss = float(summed[0]) / max(float(summed[1]), 1) if distributed else local_loss
        test = world.from_main(evaluate(model, data, device, cfg.workers) if world.main else None)
        runaway = guard.update(epoch, pof["step"], pof["perturbation_norm"], test["nll"])
        row = {"epoch": epoch, "lr": lr, **pof, "train_loss": train_loss,
               **{f"test_{k}": v for k, v in test.items()}, "runaway": runaway,
               "seconds": time.perf_counter() - began}
        trace.append({"epoch": epoch, "step": pof["step"], "steps": pof["steps"], "rows": rows,
                      "local_train_loss": local_loss})
        if test["nll"] < best["test_nll"]:
            best = {"epoch": epoch, "test_nll": test["nll"]}
            if world.main:
                save_checkpoint(run.dir / "best.pt", _final(spec, cfg, model, epoch))
        if world.main:
            run.log(row)
            save_checkpoint(run.last, {"kind": "posttrain", "config": asdict(cfg), "model_spec": spec,
                                       "data_spec": data_spec(cfg), "model": model.state_dict(),
                                       "optimizer": opt.state_dict(), "rng": rng_state(), "epoch": epoch,
                                       "guard": {"history": [list(h) for h in guard.history],
                                                 "fired_at": guard.fired_at}, "best": best})
        log(f"{epoch:>5} {pof['step']:>8.4f} {pof['perturbation_norm']:>8.4f} {pof['grad_norm']:>7.4f} "
            f"{pof['capped_rate']:>6.1%} {pof['skipped_rate']:>7.1%} {row['train_loss']:>7.4f} "
            f"{test['error']:>8.2%} {test['nll']:>7.4f} {test['ece']:>6.4f}")
        if runaway:
            log(f"warning: runaway at epoch {epoch}: mean t* / perturbation norm grew for {cfg.runaway_window} epochs "
                f"in a row while the test NLL rose (lower --lr or --gamma, or use --gamma-sampling uniform)" +
                ("; stopping (--stop-on-runaway)" if cfg.stop_on_runaway else
                 "; --stop-on-runaway stops here and keeps the best epoch"))
            if cfg.stop_on_runaway:
                stopped = True
                break
    if world.main:
        final = load_checkpoint(run.dir / "best.pt") if stopped else _final(spec, cfg, model, row.get("epoch", start))
        if stopped:
            log(f"kept the best epoch ({best['epoch']}, test NLL {best['test_nll']:.4f}) as {run.dir / 'model.pt'}")
        save_checkpoint(run.dir / "model.pt", final)
    world.dump({"phi": {k: v.detach().cpu() for k, v in phi.state_dict().items()}, "epochs": trace})
    return dict(row, runaway=list(guard.fired_at), stopped=stopped, best_epoch=best["epoch"],
                before={f"test_{k}": v for k, v in before.items()})


def _silent(message: str) -> None:
    """The log of the ranks other than 0."""


def _final(spec: Dict[str, Any], cfg: PostTrainConfig, model: nn.Module, epoch: int) -> Dict[str, Any]:
    return {"kind": "model", "model_spec": spec, "data_spec": data_spec(cfg), "model": model.state_dict(),
            "config": asdict(cfg), "epoch": epoch}
