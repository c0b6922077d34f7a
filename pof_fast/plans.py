"""Newton's search plan for each backend and storage path: rounds x points, each with the measurement behind it.

One table, read by every layer: :func:`resolve` fills a :class:`~pof_fast._types.SearchPlan` whose
``newton_iterations``/``newton_points`` are None (what :func:`pof_fast.line_search` forms) from the row of the path
that runs; :func:`pof_fast.drivers.evaluations`, the C++ driver (which gets the two numbers as arguments) and
:func:`pof_fast.distributed.collectives` then read the resolved plan. A backend names its path with
``Backend.plan_path``; ``benchmarks/plan_sweep.py`` measures every plan on every path and writes the numbers these
rows cite (docs/search-plans.md).

Accuracy every plan must meet on the problem set of ``benchmarks/plan_sweep.py`` and ``tests/test_conformance.py``:
``|t* - t_exact| <= 1e-3 max(1, t_exact)``, t_exact a float64 bisection on l' to 1e-12.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from ._types import SearchPlan

__all__ = ["NewtonPlan", "NEWTON_PLANS", "PATHS", "TOLERANCE", "resolve", "within_tolerance"]

# |t* - t_exact| <= TOLERANCE max(1, t_exact): PoF multiplies t* by a random gamma in [0, 2], so a t* within 1e-3 of
# the exact minimiser serves as well as one within 1e-7.
TOLERANCE = 1e-3


class NewtonPlan(NamedTuple):
    """``rounds`` scoring calls of ``points`` candidates after the first call (t = 0 and max_step)."""

    rounds: int
    points: int
    source: str  # the measurement that chose it


NEWTON_PLANS: dict[str, NewtonPlan] = {
    # CPU scorer, rows of C <= 32 classes (csrc/line_stats.cpp kNarrow): the 16 SIMD lanes hold candidates, so a call
    # costs the same for 1 to 16 points and the rounds are the cost. 3 x 16 is the fewest rounds that met the
    # accuracy on every problem of the sweep (2 x 16 missed 27 of 63).
    "cpp-narrow": NewtonPlan(3, 16, "benchmarks/plan_sweep.py --device cpu, 2026-12-07 (docs/search-plans.md)"),
    # CPU scorer, wider fp32/fp64 rows: every candidate is a pass of exps over the row, in groups of 4 sharing loads.
    "cpp-wide": NewtonPlan(5, 4, "benchmarks/plan_sweep.py --device cpu, 2026-12-07 (docs/search-plans.md)"),
    # CPU scorer on 16-bit z0 and d (large 16-bit heads): as wide rows, plus a 16-bit to fp32 load per call.
    "cpp-16bit": NewtonPlan(5, 4, "benchmarks/plan_sweep.py --device cpu, 2026-12-07 (docs/search-plans.md)"),
    # Vectorised eager PyTorch under the Python driver: a [K, n, C] chunk per call plus ~30 Python ops per round.
    "torch": NewtonPlan(4, 8, "benchmarks/plan_sweep.py --device cpu, 2026-12-07 (docs/search-plans.md)"),
    # GPU paths: the plan of before the per-path table (8 x 8, launch-bound scoring of a small head), kept until
    # `benchmarks/plan_sweep.py --device cuda` is run on a GPU; on the problem set it meets the accuracy (CPU sweep,
    # Triton's interpreter in tests/test_conformance.py).
    "triton": NewtonPlan(8, 8, "not yet swept on a GPU: the earlier default"),
    "triton-logits-free": NewtonPlan(8, 8, "not yet swept on a GPU: the earlier default"),
    "cuda": NewtonPlan(8, 8, "not yet swept on a GPU: the earlier default"),
}
PATHS = tuple(NEWTON_PLANS)


def resolve(plan: SearchPlan, path: str) -> SearchPlan:
    """``plan`` with the table's rounds x points for ``path`` where it leaves them None (explicit values are kept)."""
    if path not in NEWTON_PLANS:
        raise ValueError(f"unknown search path {path!r}; choose from {', '.join(PATHS)}")
    row = NEWTON_PLANS[path]
    rounds = row.rounds if plan.newton_iterations is None else plan.newton_iterations
    points = row.points if plan.newton_points is None else plan.newton_points
    return dataclasses.replace(plan, newton_iterations=rounds, newton_points=points)


def within_tolerance(step: float, exact: float) -> bool:
    """The accuracy criterion: ``|step - exact| <= TOLERANCE max(1, exact)``."""
    return abs(step - exact) <= TOLERANCE * max(1.0, exact)
