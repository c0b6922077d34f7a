"""Device-side search drivers: bracket_grid, grid and newton on top of any ``line_stats``.

A driver sees the problem only through ``stats(steps) -> [3, K]`` (loss, slope, curvature at each
candidate; see :func:`pof_fast.reference.line_stats`). Every driver launches a fixed number of
``stats`` calls, keeps all decisions in device tensors and never synchronises with the host, so
a search costs a handful of launches, not one round trip per candidate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .reference import CURVATURE, LOSS, SLOPE

StatsFn = Callable[[Tensor], Tensor]

METHODS = ("newton", "bracket_grid", "grid")
DIRECTIONS = ("normalized", "raw")


@dataclass(frozen=True)
class SearchPlan:
    """What to search for; validated by :func:`pof_fast.line_search`.

    newton_iterations x newton_points candidates are scored by ``method="newton"`` after the
    two end points: each iteration scores one safeguarded Newton point plus ``newton_points - 1``
    points spread evenly inside the current bracket, so the bracket shrinks at least
    ``newton_points``-fold per iteration whatever Newton does. ``logits_free``: None lets the
    backend decide whether to store z0 and d (see :mod:`pof_fast.backend_triton`); True/False forces it.
    """

    method: str = "newton"
    normalized: bool = True
    init_step: float = 1.0
    max_step: float = 100.0
    partitions: int = 16
    ignore_index: int = -100
    newton_iterations: int = 8
    newton_points: int = 8
    logits_free: Optional[bool] = None


class SearchOutcome(NamedTuple):
    """0-d device tensors: t*, l(0), l(t*), capped (bool); evaluations is a host int."""

    step: Tensor
    loss0: Tensor
    loss: Tensor
    capped: Tensor
    evaluations: int


def bracket_steps(plan: SearchPlan) -> list[float]:
    """The candidates the reference script may score while bracketing, then the kept end.

    It scores init, 2 init, 4 init, ... and stops doubling once the doubled value reaches
    ``max_step``; that last doubled value is the bracket end when no scored one rose above l(0).
    """
    steps = [plan.init_step]
    while steps[-1] * 2.0 < plan.max_step:
        steps.append(steps[-1] * 2.0)
    return steps + [steps[-1] * 2.0]


def evaluations(plan: SearchPlan) -> int:
    """Candidate steps ``plan.method`` scores, l(0) included (no host sync, so the same for every backend).

    For newton it is an upper bound on the compiled backends (``cpp``, ``cuda``): they stop iterating once
    the outcome is decided (capped, no descent at t = 0, or l' = 0 found), where these drivers run them all.
    """
    if plan.method == "newton":
        return 2 + plan.newton_iterations * plan.newton_points
    if plan.method == "grid":
        return 1 + plan.partitions
    return len(bracket_steps(plan)) + plan.partitions  # l(0), the bracket but its kept end (never scored), the grid


def _at(values: Tensor, index: Tensor) -> Tensor:
    """``values[..., index]`` for a 0-d device index, without the host sync of Python indexing."""
    return values.index_select(-1, index.reshape(1)).squeeze(-1)


def _grid_pick(stats: StatsFn, end: Tensor, plan: SearchPlan):
    """Score ``partitions`` points end*k/P, k = 1..P; return (t*, l(t*), argmin is last, slope there)."""
    p = plan.partitions
    fractions = torch.arange(1, p + 1, device=end.device, dtype=end.dtype) / p
    steps = end * fractions
    s = stats(steps)
    best = torch.argmin(s[LOSS])  # first minimum on ties
    return _at(steps, best), _at(s[LOSS], best), best == p - 1, s[SLOPE, p - 1]


def bracket_grid(stats: StatsFn, plan: SearchPlan, loss0: Tensor) -> SearchOutcome:
    """The reference script's search, with all bracket candidates scored in one call."""
    candidates = bracket_steps(plan)
    scored = torch.tensor(candidates[:-1], device=loss0.device, dtype=loss0.dtype)
    rose = stats(scored)[LOSS] > loss0
    first_rise = torch.argmax(rose.to(torch.int8))
    end = torch.where(rose.any(), _at(scored, first_rise), torch.full_like(loss0, candidates[-1]))
    step, loss, last, slope = _grid_pick(stats, end, plan)
    capped = (~rose.any()) & last & (slope < 0)
    return SearchOutcome(step, loss0, loss, capped, evaluations(plan))


def grid(stats: StatsFn, plan: SearchPlan, loss0: Tensor) -> SearchOutcome:
    """``partitions`` points linspace(0, max_step, partitions + 1)[1:], first argmin."""
    end = torch.full_like(loss0, plan.max_step)
    step, loss, last, slope = _grid_pick(stats, end, plan)
    return SearchOutcome(step, loss0, loss, last & (slope < 0), evaluations(plan))


def newton(stats: StatsFn, plan: SearchPlan, loss0: Tensor) -> SearchOutcome:
    """The minimiser of the convex l on [0, max_step]: bracketed Newton with a K-point safeguard.

    l' is non-decreasing, so the root of l' is bracketed by [lo, hi] with l'(lo) < 0 <= l'(hi).
    If l'(max_step) < 0 the loss still falls at the cap: t* = max_step, capped. If l'(0) >= 0
    (g = 0): t* = 0. Otherwise the best point is the scored one with the smallest |l'|.
    """
    dev, dt = loss0.device, loss0.dtype
    ends = torch.tensor([0.0, plan.max_step], device=dev, dtype=dt)
    s = stats(ends)
    slope0, slope_max, loss_max = s[SLOPE, 0], s[SLOPE, 1], s[LOSS, 1]
    capped = slope_max < 0
    lo, hi = ends[0], ends[1]
    best_t, best_loss, best_slope, best_curv = ends[0], s[LOSS, 0], slope0, s[CURVATURE, 0]
    k = plan.newton_points
    spread = torch.arange(1, k, device=dev, dtype=dt) / k
    for _ in range(plan.newton_iterations):
        newton_t = best_t - best_slope / best_curv.clamp_min(torch.finfo(dt).tiny)
        newton_t = torch.where(torch.isfinite(newton_t), newton_t, (lo + hi) / 2)
        newton_t = torch.minimum(torch.maximum(newton_t, lo), hi)
        steps = torch.cat([newton_t[None], lo + (hi - lo) * spread])
        s = stats(steps)
        slope = s[SLOPE]
        falling = slope < 0
        lo = torch.maximum(lo, torch.where(falling, steps, lo).max())
        hi = torch.minimum(hi, torch.where(falling, hi, steps).min())
        i = torch.argmin(slope.abs())
        picked = _at(s, i)  # [3]: loss, slope, curvature at the smallest |l'|
        better = picked[SLOPE].abs() < best_slope.abs()
        best_t = torch.where(better, _at(steps, i), best_t)
        best_loss = torch.where(better, picked[LOSS], best_loss)
        best_slope = torch.where(better, picked[SLOPE], best_slope)
        best_curv = torch.where(better, picked[CURVATURE], best_curv)
    descent = slope0 < 0
    step = torch.where(capped, ends[1], torch.where(descent, best_t, ends[0]))
    loss = torch.where(capped, loss_max, torch.where(descent, best_loss, loss0))
    return SearchOutcome(step, loss0, loss, capped, evaluations(plan))


DRIVERS = {"bracket_grid": bracket_grid, "grid": grid, "newton": newton}


def run(stats: StatsFn, plan: SearchPlan, device: torch.device) -> SearchOutcome:
    """Score l(0), then run ``plan.method`` with the given scorer."""
    loss0 = stats(torch.zeros(1, device=device))[LOSS, 0]
    return DRIVERS[plan.method](stats, plan, loss0)
