"""The configurations of the training commands, their checks, and the configuration of a resumed run."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import RunError
from .schedule import SCHEDULES

__all__ = ["BASE_OPTIMIZERS", "DataConfig", "PretrainConfig", "PostTrainConfig",
           "RESUMABLE", "check_config", "resumed_config"]

BASE_OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class DataConfig:
    data: str = "digits"
    data_dir: Optional[str] = None
    image_size: int = 32
    augment: str = "auto"  # auto (the dataset's), standard, none
    workers: int = 0


@dataclass
class OptimizerConfig(DataConfig):
    """What both loops share: the SGD-style hyperparameters, the learning-rate schedule, epochs, batch size."""

    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "constant"
    milestones: Tuple[int, ...] = ()
    lr_decay: float = 0.1
    epochs: int = 30
    batch_size: int = 64


@dataclass
class PretrainConfig(OptimizerConfig):
    """Training from scratch. The defaults suit the digits MLP (a few seconds on a CPU); CIFAR recipes use
    lr 0.1, batch 128, 200 epochs."""

    lr: float = 0.05
    schedule: str = "cosine"
    epochs: int = 60
    model: str = "mlp"
    optimizer: str = "sgd"  # sgd or sam
    rho: float = 0.05
    seed: int = 0


@dataclass
class PostTrainConfig(OptimizerConfig):
    """PoF from a checkpoint (see :class:`pof_fast.PoF` for the PoF options)."""

    checkpoint: str = ""
    head: Optional[str] = None
    model: Optional[str] = None  # the architecture of a plain state_dict checkpoint
    unsafe_load: bool = False
    base_optimizer: str = "sgd"  # sgd, adam, adamw
    search_batch_size: int = 256
    gamma: float = 2.0
    gamma_sampling: str = "uniform"
    method: str = "newton"
    direction: str = "normalized"
    max_step: float = 100.0
    on_capped: str = "skip"
    norm_stats: str = "frozen"  # BatchNorm in the search forward: frozen or update
    backend: str = "auto"
    runaway_window: int = 2
    stop_on_runaway: bool = False
    seed: int = 0


# settings a resumed run may change (they do not change what is computed)
RESUMABLE = ("epochs", "workers", "stop_on_runaway")


def check_config(cfg: DataConfig) -> None:
    """``RunError`` for values out of range (argparse checks the choices)."""
    positive = ["epochs", "batch_size", "image_size"] + (["search_batch_size", "runaway_window"]
                                                         if isinstance(cfg, PostTrainConfig) else [])
    for name in positive:
        if getattr(cfg, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "momentum"):
        value = getattr(cfg, name)
        if not (0.0 <= value < math.inf) or (name == "lr" and value == 0.0):
            raise RunError(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                           f"got {value}")
    if getattr(cfg, "schedule", "constant") not in SCHEDULES:
        raise RunError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    if isinstance(cfg, PretrainConfig) and not (0.0 <= cfg.rho < math.inf):
        raise RunError(f"--rho must be a finite number >= 0, got {cfg.rho}")
    if not (0.0 < cfg.lr_decay < math.inf):
        raise RunError(f"--lr-decay must be a finite number > 0, got {cfg.lr_decay}")
    if isinstance(cfg, PostTrainConfig):
        if not (0.0 <= cfg.gamma < math.inf):
            raise RunError(f"--gamma must be a finite number >= 0, got {cfg.gamma}")
        if not (0.0 < cfg.max_step < math.inf):
            raise RunError(f"--max-step must be a finite number > 0, got {cfg.max_step}")
    if cfg.workers < 0:
        raise RunError(f"--workers must be >= 0, got {cfg.workers}")


def resumed_config(cls: type, saved: Dict[str, Any], overrides: Optional[Dict[str, Any]],
                    warn: Callable[[str], None]) -> Any:
    """The saved configuration; from ``overrides`` (the settings given for the resumed run) those of
    :data:`RESUMABLE` are taken, and any other that differs from the saved value gets a warning and is ignored."""
    defaults = cls()
    values = {f.name: saved.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
    for name, value in (overrides or {}).items():
        if name not in values:
            continue
        if name in RESUMABLE:
            values[name] = value
        elif _norm(value) != _norm(values[name]):
            warn(f"--resume: --{name.replace('_', '-')} {value} ignored, the run continues with {values[name]}")
    return cls(**values)


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
