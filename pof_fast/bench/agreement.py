"""Agreement with the script: every row's t* scored on the script's own line in float64.

A row agrees when its t* is no worse there than the script's pick, within the dtype's noise
(1e-5 x max(1, l(0)) in float32, 4e-3 x max(1, l(0)) in bfloat16). Newton's t* is in units of g/||g||,
hence the division by ||g|| before scoring. ``same_point`` (bracket_grid rows): the script's very grid point.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence

import torch

from .. import reference
from .._types import LOSS
from .cases import IGNORE_INDEX, Problem

__all__ = ["ScriptLine", "annotate"]


class ScriptLine:
    """l(t) in float64 along the raw gradient (the script's line) of one problem: the agreement oracle."""

    def __init__(self, problem: Problem) -> None:
        h, w, b = problem.features.double(), problem.weight.double(), problem.bias.double()
        self.target = problem.target
        self.grad = reference.head_gradient(h, w, b, self.target, IGNORE_INDEX, normalized=False)
        self.direction = reference.direction_logits(h, self.grad.grad_weight, self.grad.grad_bias, self.grad.scale)
        self.grad_norm = float(self.grad.grad_norm)
        loss0 = self.losses([0.0])[0]
        self.tolerance = (1e-5 if problem.features.dtype == torch.float32 else 4e-3) * max(1.0, abs(loss0))

    def losses(self, steps: Sequence[float]) -> List[float]:
        t = torch.tensor(list(steps), dtype=torch.float64, device=self.direction.device)
        return reference.line_stats(self.grad.logits, self.direction, self.target, t, IGNORE_INDEX)[LOSS].tolist()

    def judge(self, t_star: float, direction: str, method: str, script_t: float) -> Dict[str, Any]:
        """``loss_gap`` (l at the row's t* minus l at the script's), ``agrees`` and, for bracket_grid, ``same_point``."""
        raw_t = t_star / self.grad_norm if direction == "normalized" else t_star
        at_script, at_row = self.losses([script_t, raw_t])
        out: Dict[str, Any] = dict(loss_gap=at_row - at_script, agrees=at_row <= at_script + self.tolerance)
        if method == "bracket_grid":
            out["same_point"] = abs(t_star - script_t) <= 1e-6 * max(1.0, script_t)
        return out


def annotate(rows: Iterable[Dict[str, Any]], problem: Problem, script_t: float) -> None:
    """Add the agreement keys to every row but the floors."""
    line = ScriptLine(problem)
    for row in (r for r in rows if r["kind"] != "floor"):
        row.update(line.judge(row["t_star"], row["direction"], row["method"], script_t))
