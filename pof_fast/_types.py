"""The types and constants every layer of pof-fast shares, each defined once.

Shapes: ``n`` search rows, ``D`` features, ``C`` classes, ``K`` candidate steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "LOSS", "SLOPE", "CURVATURE", "METHODS", "DIRECTIONS", "FLOAT_DTYPES", "HALF_DTYPES", "accumulation_dtype",
    "gram_cheaper",
    "SearchPlan", "SearchOutcome", "HeadGradient", "SearchTensors", "assemble", "empty_search_tensors",
]

# Rows of the ``[3, K]`` line statistics: l(t_k), l'(t_k), l''(t_k).
LOSS, SLOPE, CURVATURE = 0, 1, 2

METHODS = ("newton", "bracket_grid", "grid")
DIRECTIONS = ("normalized", "raw")
# Float dtypes the public API accepts.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The 16-bit ones: stored as they are for large heads, products on tensor cores (csrc/common.h is_16bit).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram_cheaper(rows: int, dim: int, classes: int) -> bool:
    """d = (h h^T) R costs fewer multiply-adds than h g_W^T (SPEC section 4; csrc/common.h ``gram_cheaper``)."""
    return rows * (dim + classes) < dim * classes


@dataclass(frozen=True)
class SearchPlan:
    """What to search for; validated by :func:`pof_fast.line_search`.

    ``method="newton"`` scores the two end points, then ``newton_iterations`` rounds of
    ``newton_points`` candidates: one safeguarded Newton point plus ``newton_points - 1`` points at
    lo + (hi - lo) (j / points)^2 inside the current bracket [lo, hi] (closer to lo, where a Newton step from
    a small t tends to fall short), so each round leaves at most (2 points - 1) / points^2 of the bracket
    whatever Newton does. None (the default) takes the rounds and points of the path that runs from the plan
    table (:mod:`pof_fast.plans`). ``logits_free``: None lets the backend decide whether to store z0 and d
    ``[n, C]`` (see :mod:`pof_fast.backends.triton`); True/False forces it.
    """

    method: str = "newton"
    normalized: bool = True
    init_step: float = 1.0
    max_step: float = 100.0
    partitions: int = 16
    ignore_index: int = -100
    newton_iterations: Optional[int] = None
    newton_points: Optional[int] = None
    logits_free: Optional[bool] = None


class SearchOutcome(NamedTuple):
    """0-d device tensors of a search driver: t*, l(0), l(t*), capped (bool)."""

    step: Tensor
    loss0: Tensor
    loss: Tensor
    capped: Tensor


class HeadGradient(NamedTuple):
    """The head gradient on the search batch and the scale that turns it into the direction.

    logits:  ``[n, C]`` z0 = h W0^T + b0 (input dtype), or None on a logits-free path.
    residual: ``[n, C]`` (softmax(z0) - onehot(y)) / m, ignored rows zero (accumulation dtype), or None.
    grad_weight: ``[C, D]`` g_W = residual^T h.   grad_bias: ``[C]`` g_b = colsum(residual) or None.
    grad_norm: 0-d sqrt(||g_W||^2 + ||g_b||^2).
    scale: 0-d factor with u = scale * g: 1/||g|| (normalized), 1 (raw), 0 when g = 0.
    """

    logits: Optional[Tensor]
    residual: Optional[Tensor]
    grad_weight: Tensor
    grad_bias: Optional[Tensor]
    grad_norm: Tensor
    scale: Tensor


class SearchTensors(NamedTuple):
    """What one backend's ``line_search`` op returns: the tensors of a :class:`pof_fast.LineSearchResult`.

    step ``[]`` t* (0 when g = 0); weight_direction ``[C, D]`` u_W; bias_direction ``[C]`` u_b (``[0]``
    for a head without bias); grad_norm, loss0, loss ``[]``; capped ``[]`` bool; direction_norm ``[]``
    ||u||. All in the accumulation dtype but ``capped``; none aliases an input or another output.
    """

    step: Tensor
    weight_direction: Tensor
    bias_direction: Tensor
    grad_norm: Tensor
    loss0: Tensor
    loss: Tensor
    capped: Tensor
    direction_norm: Tensor


def assemble(grad: HeadGradient, outcome: SearchOutcome) -> SearchTensors:
    """The op's outputs from a gradient and a driver outcome; scales ``grad``'s fresh g into u in place.

    g = 0 has no direction, so no step whatever the method: t* = 0, l(t*) = l(0), never capped.
    """
    has_direction = grad.grad_norm > 0
    weight_direction = grad.grad_weight.mul_(grad.scale)
    if grad.grad_bias is not None:
        bias_direction = grad.grad_bias.mul_(grad.scale)
    else:
        bias_direction = weight_direction.new_empty((0,))
    return SearchTensors(
        step=torch.where(has_direction, outcome.step, torch.zeros_like(outcome.step)),
        weight_direction=weight_direction,
        bias_direction=bias_direction,
        grad_norm=grad.grad_norm,
        loss0=outcome.loss0.clone(),
        loss=torch.where(has_direction, outcome.loss, outcome.loss0),
        capped=outcome.capped & has_direction,
        direction_norm=grad.grad_norm * grad.scale,
    )


def empty_search_tensors(features: Tensor, weight: Tensor, bias: Optional[Tensor]) -> SearchTensors:
    """Uninitialised outputs of the right shapes and dtypes: the fake (meta) kernel of every ``line_search`` op."""
    acc = accumulation_dtype(weight.dtype)
    scalar = features.new_empty((), dtype=acc)
    return SearchTensors(
        step=scalar,
        weight_direction=features.new_empty(tuple(weight.shape), dtype=acc),
        bias_direction=features.new_empty((weight.shape[0] if bias is not None else 0,), dtype=acc),
        grad_norm=torch.empty_like(scalar),
        loss0=torch.empty_like(scalar),
        loss=torch.empty_like(scalar),
        capped=features.new_empty((), dtype=torch.bool),
        direction_norm=torch.empty_like(scalar),
    )
