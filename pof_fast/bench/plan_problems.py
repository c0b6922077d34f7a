"""The fixed problem set that Newton's search plans are held to (:mod:`pof_fast.plans`).

Each problem is a search batch and a head, drawn in float64 from a seed: features ``h ~ feature_scale N(0, 1)``, a
teacher head ``W ~ spread N(0, 1/D)`` (bias ~ 0.1 N(0, 1)), labels sampled from softmax(teacher logits /
temperature), and the head searched is ``fit`` x the teacher (under-fitted below 1, over-confident above). The set
covers the shapes of cases A-C scaled down, language-model rows (16-bit, ignored rows, no bias), ill-conditioned
lines (large logits: l'' spikes where the arg-max class changes), flat lines (l'' falls by orders of magnitude
before the minimum), minima far out (near ``max_step``, or at 1 with max_step 1000), and capped lines.
``small`` problems are the ones Triton's interpreter runs in the conformance tests.

``exact_step`` is the accuracy reference: a float64 bisection on l' to 1e-12.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference

__all__ = ["PlanProblem", "PROBLEMS", "make", "searched_line", "exact_step", "bisect_minimiser"]


class PlanProblem(NamedTuple):
    name: str
    rows: int
    dim: int
    classes: int
    spread: float
    feature_scale: float
    fit: float
    temperature: float
    seed: int
    normalized: bool = True
    max_step: float = 100.0
    ignore_every: int = 0
    bias: bool = True
    dtype: str = "float32"
    small: bool = False


PROBLEMS = (
    # cases A-C, scaled down
    PlanProblem("case A (C=10)", 128, 64, 10, 2.0, 1.0, 1.0, 1.0, 1, ignore_every=5, small=True),
    PlanProblem("case A, raw direction", 128, 64, 10, 2.0, 1.0, 1.0, 1.0, 2, normalized=False),
    PlanProblem("case B (C=100)", 128, 64, 100, 3.0, 1.0, 1.0, 1.0, 3, ignore_every=5, small=True),
    PlanProblem("case C (C=1000)", 64, 128, 1000, 4.0, 1.0, 1.0, 1.0, 4),
    PlanProblem("case C, confident labels", 32, 8, 1000, 30.0, 1.0, 0.1, 0.1, 26),
    # language-model rows: 16-bit storage on the CPU (n (D + C) >= D C), ignored rows, no bias
    PlanProblem("LM rows, bf16", 128, 64, 2048, 4.0, 1.0, 1.0, 1.0, 6, ignore_every=7, bias=False, dtype="bfloat16"),
    PlanProblem("LM rows, fp32", 128, 32, 512, 4.0, 1.0, 1.0, 1.0, 7, ignore_every=7, bias=False),
    # ill-conditioned: large logits
    PlanProblem("ill-conditioned", 96, 32, 50, 30.0, 1.0, 1.0, 10.0, 8, small=True),
    PlanProblem("ill-conditioned, C=20", 96, 16, 20, 60.0, 1.0, 1.0, 20.0, 9),
    # flat: the curvature falls by orders of magnitude before the minimum
    PlanProblem("flat at the minimum", 16, 128, 100, 4.0, 1.0, 3.0, 0.1, 76, small=True),
    PlanProblem("curvature at 0 misleads (max_step 1000)", 64, 128, 10, 0.3, 3.0, 0.1, 10.0, 42, normalized=False,
                max_step=1000.0, small=True),
    PlanProblem("few rows, C=5", 16, 8, 5, 0.3, 1.0, 1.0, 10.0, 62, small=True),
    PlanProblem("raw direction, C=5", 128, 32, 5, 0.3, 1.0, 1.0, 0.1, 28, normalized=False),
    # minima far out
    PlanProblem("minimum near max_step", 128, 32, 100, 0.3, 0.1, 1.0, 10.0, 68, normalized=False),
    PlanProblem("minimum far out (max_step 1000)", 128, 32, 100, 1.0, 0.1, 3.0, 0.1, 78, normalized=False,
                max_step=1000.0),
    # capped: the loss still falls at max_step
    PlanProblem("capped", 32, 32, 1000, 30.0, 3.0, 3.0, 10.0, 48),
)


def make(problem: PlanProblem, device="cpu") -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """(h ``[n, D]``, W ``[C, D]``, b ``[C]`` or None, y ``[n]``) of ``problem``, cast to its dtype, on ``device``."""
    p = problem
    gen = torch.Generator().manual_seed(p.seed)
    h = torch.randn(p.rows, p.dim, generator=gen, dtype=torch.float64) * p.feature_scale
    w = torch.randn(p.classes, p.dim, generator=gen, dtype=torch.float64) * (p.spread / p.dim**0.5)
    b = torch.randn(p.classes, generator=gen, dtype=torch.float64) * 0.1 if p.bias else None
    teacher = F.linear(h, w, b)
    y = torch.multinomial(torch.softmax(teacher / p.temperature, 1), 1, generator=gen).squeeze(1)
    if p.ignore_every:
        y[:: p.ignore_every] = -100
    dtype = getattr(torch, p.dtype)
    w = (w * p.fit).to(device=device, dtype=dtype)
    b = None if b is None else (b * p.fit).to(device=device, dtype=dtype)
    return h.to(device=device, dtype=dtype), w, b, y.to(device)


def searched_line(features: Tensor, weight: Tensor, bias: Optional[Tensor], weight_direction: Tensor,
                  bias_direction: Optional[Tensor], stored_16bit: bool) -> tuple[Tensor, Tensor]:
    """float64 (z0, d) of the line a search scored: z0 = h W^T + b in the input dtype (as every backend forms it), d
    along the direction the search returned; on a 16-bit storage path (``stored_16bit``) d rounded to the input dtype
    as it is stored there, so that t_exact is the minimiser of the line the plan searched."""
    z0 = F.linear(features, weight, bias).double().cpu()
    if stored_16bit:
        u_b = None if bias_direction is None else bias_direction.to(features.dtype)
        return z0, F.linear(features, weight_direction.to(features.dtype), u_b).double().cpu()
    d = features.double() @ weight_direction.double().t()
    if bias_direction is not None:
        d = d + bias_direction.double()
    return z0, d.cpu()


def exact_step(logits: Tensor, direction: Tensor, target: Tensor, max_step: float, ignore_index: int = -100) -> float:
    """t_exact on the float64 line (l' from :func:`pof_fast.reference.line_stats` in float64): see
    :func:`bisect_minimiser`."""
    z0, d, y = logits.double().cpu(), direction.double().cpu(), target.cpu()

    def slope(t: float) -> float:
        steps = torch.tensor([t], dtype=torch.float64)
        return reference.line_stats(z0, d, y, steps, ignore_index)[1, 0].item()

    return bisect_minimiser(slope, max_step)


def bisect_minimiser(slope: Callable[[float], float], max_step: float) -> float:
    """The minimiser on [0, max_step] of a convex function with non-decreasing derivative ``slope``: 0 when
    slope(0) >= 0, max_step when slope(max_step) < 0, else the root of ``slope`` by bisection to 1e-12."""
    if slope(0.0) >= 0:
        return 0.0
    if slope(max_step) < 0:
        return max_step
    lo, hi = 0.0, max_step
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return (lo + hi) / 2
