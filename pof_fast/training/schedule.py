"""Learning-rate schedules: the multiplier at a point of the run, and setting it on an optimizer."""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["SCHEDULES", "lr_factor", "set_lr"]

SCHEDULES = ("constant", "cosine", "step")


def lr_factor(schedule: str, epoch_progress: float, epochs: int, milestones: Sequence[int] = (),
              decay: float = 0.1) -> float:
    """The learning-rate multiplier at ``epoch_progress`` (epochs done, fractional) of ``epochs``.

    constant: 1. cosine: ``(1 + cos(pi * progress / epochs)) / 2``, per step. step: ``decay ** k``, ``k`` the
    number of ``milestones`` (epochs) passed; no milestones means half and three quarters of the run.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch_progress / epochs, 1.0)))
    if schedule == "step":
        marks = list(milestones) or [epochs // 2, (3 * epochs) // 4]
        return decay ** sum(epoch_progress >= m for m in marks)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor
    return base_lr * factor
