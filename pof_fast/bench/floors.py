"""The floor of one search (SPEC section 4), per backend: the work no search can skip.

Measured as each piece on inputs prepared beforehand: z0 = h W0^T + b0, g_W = R^T h, the direction
logits d (formed as the backend forms them), and one call of the backend's scorer over z0 and d for all
the search's candidates at once. A row's ``x floor`` is its time over its backend's floor.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import dispatch
from .._types import HALF_DTYPES
from ..backends.base import Backend
from .cases import IGNORE_INDEX, SCRIPT, Problem

__all__ = ["floor_call"]


def floor_call(problem: Problem, backend: str, candidates: int) -> Callable[[], Tensor]:
    """The floor of one bracket_grid search of ``candidates`` candidates on ``backend``: three products and
    one scorer call."""
    ops = dispatch.load(backend)
    if not isinstance(ops, Backend):
        raise RuntimeError(f"backend {backend!r} unavailable: {ops}")
    h, w, b, y = problem.args()
    grad = ops.head_gradient(h, w, b, y, IGNORE_INDEX, False)
    gradient_product = _gradient_product(grad.residual, h)
    steps = torch.linspace(0.0, SCRIPT["max_step"], candidates, device=h.device)
    direction = ops.direction_logits(h, grad)

    def floor() -> Tensor:
        torch.nn.functional.linear(h, w, b)
        gradient_product()
        ops.direction_logits(h, grad)
        return ops.line_stats(grad.logits, direction, y, steps, IGNORE_INDEX)

    return floor


def _gradient_product(residual: Tensor, h: Tensor) -> Callable[[], Tensor]:
    """g_W = R^T h as the backends form it: 16-bit R and h on a GPU on tensor cores with fp32 output, else in
    R's dtype (a 16-bit R on the CPU: in fp32)."""
    if residual.dtype == h.dtype and h.dtype in HALF_DTYPES:
        if h.is_cuda:
            return lambda: torch.mm(residual.t(), h, out_dtype=torch.float32)
        residual = residual.float()
    features = h.to(residual.dtype)
    return lambda: torch.mm(residual.t(), features)
