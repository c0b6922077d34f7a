"""PoF in Lightning's automatic optimisation: a callback that searches before each optimizer step.

Lightning runs ``optimizer.step(closure)``, the closure being ``training_step`` plus ``backward``; the
callback perturbs the head in ``on_train_batch_start``, before that closure's forward, so the training
loss is taken at theta0 - gamma t* u, and :meth:`pof_fast.PoF.step` puts theta0 back after the base step.
With ``accumulate_grad_batches = k`` it perturbs once per optimizer step (at the first of the k batches).
Telemetry goes through ``LightningModule.log``.

The LightningModule returns a :class:`pof_fast.PoF` from ``configure_optimizers`` and defines
``pof_search_batch(self, batch) -> (search_features [n, D], search_target [n])``, typically with
``self.optimizers().search_features(self.phi, x)`` so that BatchNorm statistics do not move.
Manual optimisation needs no callback: call ``opt.perturb(...)``, ``manual_backward``, ``opt.step()``
on ``self.optimizers()`` (PoF's telemetry is shared with Lightning's wrapper).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import lightning.pytorch as pl

from ..optim import PoF

__all__ = ["PoFCallback"]

LOGGED = ("step", "gamma", "perturbation_norm", "grad_norm", "loss0", "loss", "capped", "skipped")


class PoFCallback(pl.Callback):
    """Perturb the head before every optimizer step of automatic optimisation.

    search_batches: an iterable of search batches (e.g. a DataLoader of 256-row batches), cycled; None
    (default) searches on each step's own training batch. Each batch goes through the module's
    ``pof_search_batch``. log_prefix: the prefix of the logged telemetry keys (``pof/step``, ...).
    """

    def __init__(self, search_batches: Optional[Iterable[Any]] = None, log_prefix: str = "pof/") -> None:
        self.search_batches = search_batches
        self.log_prefix = log_prefix
        self._iterator: Optional[Iterator[Any]] = None

    def _next_search_batch(self, batch: Any) -> Any:
        if self.search_batches is None:
            return batch
        if self._iterator is None:
            self._iterator = iter(self.search_batches)
        try:
            return next(self._iterator)
        except StopIteration:  # cycle
            self._iterator = iter(self.search_batches)
            return next(self._iterator)

    @staticmethod
    def _pof(trainer: "pl.Trainer") -> PoF:
        found = [opt for opt in trainer.optimizers if isinstance(opt, PoF)]
        if len(found) != 1:
            raise TypeError(f"PoFCallback needs exactly one pof_fast.PoF among the optimizers, got {len(found)}")
        return found[0]

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if not pl_module.automatic_optimization:
            raise TypeError("PoFCallback is for automatic optimisation; with manual optimisation call "
                            "self.optimizers().perturb(...) in training_step")
        if batch_idx % trainer.accumulate_grad_batches:
            return  # one perturbation per optimizer step: the head stays perturbed across the window
        if not hasattr(pl_module, "pof_search_batch"):
            raise TypeError(f"{type(pl_module).__name__} must define pof_search_batch(self, batch) -> "
                            "(search_features, search_target) for PoFCallback")
        features, target = pl_module.pof_search_batch(self._next_search_batch(batch))
        self._pof(trainer).perturb(features, target)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = self._pof(trainer).last
        if last is None:
            return
        for key in LOGGED:
            pl_module.log(self.log_prefix + key, getattr(last, key).float(), on_step=True, on_epoch=True)
