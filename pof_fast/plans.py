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


# The accuracy runs: `python benchmarks/plan_sweep.py --device cpu --no-timing` on 2026-12-07 (the problem set, each
# problem in its own dtype and in bf16, cpp and torch backends) and 60 further random lines (docs/search-plans.md).
SWEPT = "plan_sweep.py --device cpu, 2026-12-07: met on the problem set and 60 held-out lines (docs/search-plans.md)"
NEWTON_PLANS: dict[str, NewtonPlan] = {
    # CPU scorer, fp32 rows of C <= 32 classes (csrc/line_stats.cpp kNarrow): the 16 SIMD lanes hold candidates, so a
    # call costs the same for 1 to 16 points and the calls are the cost. 4 x 16 (5 calls, 9 before): 3 x 16 met the
    # problem set but missed 3 held-out lines by up to 2e-3; case A 0.72x the time of 8 x 8 at 3 x 16 (load 12).
    "cpp-narrow": NewtonPlan(4, 16, SWEPT),
    # CPU scorer, wider fp32/fp64 rows: every candidate is a pass of exps over the row (groups of 4 share the loads),
    # so the candidates are the cost. 6 x 4 = 26 candidates (66 before): the fewest that met both sets (5 x 4 missed
    # one held-out line by 1.8e-3, 7 x 2 two by up to 2e-2, 6 x 3 the problem set by 4.8e-3).
    "cpp-wide": NewtonPlan(6, 4, SWEPT),
    # CPU scorer on 16-bit z0 and d (large 16-bit heads, the LM-head path): as wide rows, plus a 16-bit to fp32 load
    # of both rows per call; the same plan met the problem set in bf16 (t_exact on the stored 16-bit line).
    "cpp-16bit": NewtonPlan(6, 4, SWEPT),
    # Vectorised eager PyTorch under the Python driver: ~30 Python ops per round plus [K, n, C] chunks of exps, so
    # both count; 4 x 8 (5 calls, 34 candidates) met both sets (5 x 4 and 7 x 2 missed held-out lines, see above).
    "torch": NewtonPlan(4, 8, SWEPT),
    # GPU paths: the plan of before the per-path table (8 x 8: launch-bound scoring of a small head), kept until
    # `benchmarks/plan_sweep.py --device cuda` runs on a GPU; it meets both sets (CPU sweep; Triton's interpreter in
    # tests/test_conformance.py).
    "triton": NewtonPlan(8, 8, "not yet swept on a GPU: the plan of before the table"),
    "triton-logits-free": NewtonPlan(8, 8, "not yet swept on a GPU: the plan of before the table"),
    "cuda": NewtonPlan(8, 8, "not yet swept on a GPU: the plan of before the table"),
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
