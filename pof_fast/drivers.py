"""The search specification: bracket_grid, grid and newton on top of any ``line_stats``.

A driver sees the problem only through ``stats(steps) -> [3, K]`` (loss, slope, curvature at each
candidate; see :func:`pof_fast.reference.line_stats`). Every driver makes a fixed number of ``stats``
calls on candidates formed on the device, keeps all decisions in device tensors and never
synchronises with the host. ``csrc/search_driver.h`` follows these drivers step for step (same
candidates, same calls up to its chunking of K), so :func:`evaluations` is exact on every backend.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._types import CURVATURE, LOSS, SLOPE, SearchOutcome, SearchPlan

__all__ = ["StatsFn", "bracket_steps", "newton_rounds", "evaluations", "bracket_grid", "grid", "newton", "run"]

StatsFn = Callable[[Tensor], Tensor]


def bracket_steps(plan: SearchPlan) -> list[float]:
    """The candidates the reference script may score while bracketing, then the kept end.

    It scores init, 2 init, 4 init, ... and stops doubling once the doubled value reaches
    ``max_step``; that last doubled value is the bracket end when no scored one rose above l(0).
    """
    steps = [plan.init_step]
    while steps[-1] * 2.0 < plan.max_step:
        steps.append(steps[-1] * 2.0)
    return steps + [steps[-1] * 2.0]


def newton_rounds(plan: SearchPlan) -> tuple[int, int]:
    """(rounds, points) of a resolved newton plan; None in either (the default) is the plan table's to fill."""
    if plan.newton_iterations is None or plan.newton_points is None:
        raise ValueError("a newton plan's rounds and points are those of its path: pof_fast.plans.resolve it first")
    return plan.newton_iterations, plan.newton_points


def evaluations(plan: SearchPlan) -> int:
    """Candidate steps ``plan.method`` scores, l(0) included, on every backend (newton: a plan resolved by
    :func:`pof_fast.plans.resolve`, whose rounds x points depend on the path that runs)."""
    if plan.method == "newton":
        rounds, points = newton_rounds(plan)
        return 2 + rounds * points
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


def bracket_grid(stats: StatsFn, plan: SearchPlan, device: torch.device, dtype: torch.dtype) -> SearchOutcome:
    """The reference script's search: l(0) and every bracket candidate in one call, then the grid."""
    candidates = bracket_steps(plan)
    # [0, init, 2 init, ...]: doublings formed on the device (exact: powers of two), never copied from the host.
    doublings = torch.full((len(candidates) - 1,), 2.0, device=device, dtype=dtype).cumprod(0) * (plan.init_step / 2)
    steps = torch.cat([torch.zeros(1, device=device, dtype=dtype), doublings])
    losses = stats(steps)[LOSS]
    loss0, scored = losses[0], losses[1:]
    rose = scored > loss0
    first_rise = torch.argmax(rose.to(torch.int8))
    end = torch.where(rose.any(), _at(doublings, first_rise), torch.full_like(loss0, candidates[-1]))
    step, loss, last, slope = _grid_pick(stats, end, plan)
    capped = (~rose.any()) & last & (slope < 0)
    return SearchOutcome(step, loss0, loss, capped)


def grid(stats: StatsFn, plan: SearchPlan, device: torch.device, dtype: torch.dtype) -> SearchOutcome:
    """l(0), then ``partitions`` points linspace(0, max_step, partitions + 1)[1:], first argmin."""
    loss0 = stats(torch.zeros(1, device=device, dtype=dtype))[LOSS, 0]
    end = torch.full_like(loss0, plan.max_step)
    step, loss, last, slope = _grid_pick(stats, end, plan)
    return SearchOutcome(step, loss0, loss, last & (slope < 0))


def newton(stats: StatsFn, plan: SearchPlan, device: torch.device, dtype: torch.dtype) -> SearchOutcome:
    """The minimiser of the convex l on [0, max_step]: bracketed Newton with a K-point safeguard.

    l' is non-decreasing, so the root of l' is bracketed by [lo, hi] with l'(lo) < 0 <= l'(hi).
    If l'(max_step) < 0 the loss still falls at the cap: t* = max_step, capped. If l'(0) >= 0
    (g = 0): t* = 0. Otherwise the best point is the scored one with the smallest |l'|. A round scores
    Newton's step from the best point so far (the first from t = 0, with l'(0) and l''(0)) and the safeguard
    lo + (hi - lo) (j / K)^2, j = 1..K-1: squares, so that the points reach down to small t, where a line whose
    curvature falls along it leaves Newton short (measured: benchmarks/plan_sweep.py, docs/search-plans.md).
    Every round runs, decided or not: stopping early would need a host sync.
    """
    ends = torch.arange(2, device=device, dtype=dtype) * plan.max_step  # [0, max_step]
    s = stats(ends)
    loss0, slope0, slope_max, loss_max = s[LOSS, 0], s[SLOPE, 0], s[SLOPE, 1], s[LOSS, 1]
    capped = slope_max < 0
    lo, hi = ends[0], ends[1]
    best_t, best_loss, best_slope, best_curv = ends[0], loss0, slope0, s[CURVATURE, 0]
    rounds, k = newton_rounds(plan)
    spread = torch.arange(1, k, device=device, dtype=dtype).square() / (k * k)  # exact: small integers
    for _ in range(rounds):
        newton_t = best_t - best_slope / best_curv.clamp_min(torch.finfo(dtype).tiny)
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
    return SearchOutcome(step, loss0, loss, capped)


DRIVERS = {"bracket_grid": bracket_grid, "grid": grid, "newton": newton}


def run(stats: StatsFn, plan: SearchPlan, device: torch.device, dtype: torch.dtype = torch.float32) -> SearchOutcome:
    """Run ``plan.method`` with the given scorer; candidate steps in ``dtype`` (the accumulation dtype)."""
    return DRIVERS[plan.method](stats, plan, torch.device(device), dtype)
