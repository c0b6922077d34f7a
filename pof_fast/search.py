"""Public search API: :func:`line_losses` and :func:`line_search`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _validate as check
from . import dispatch
from .drivers import DIRECTIONS, METHODS, SearchPlan
from .reference import LOSS

__all__ = ["LineSearchResult", "line_losses", "line_search"]


@dataclass(frozen=True)
class LineSearchResult:
    """The outcome of one PoF line search along theta(t) = theta0 - t u.

    Tensors stay on the input's device and are produced with no host synchronisation.

    step:             0-d, t* (0 when g = 0).
    weight_direction: ``[C, D]`` u_W searched along (g_W / ||g|| or g_W), accumulation dtype.
    bias_direction:   ``[C]`` u_b, or None for a head without bias.
    grad_norm:        0-d ||g||.
    loss0, loss:      0-d l(0) and l(t*).
    capped:           0-d bool: t* is at ``max_step`` and the loss still falls there.
    evaluations:      candidate steps the method scores (including t = 0); for newton on ``cpp``/``cuda``
                      an upper bound (they stop iterating once the outcome is decided).
    direction_norm:   0-d ||u|| (1 normalized, ||g|| raw, 0 when g = 0).
    """

    step: Tensor
    weight_direction: Tensor
    bias_direction: Optional[Tensor]
    grad_norm: Tensor
    loss0: Tensor
    loss: Tensor
    capped: Tensor
    evaluations: int
    direction_norm: Tensor


def _run(backend: str, device: torch.device, op: str, *args):
    """Call ``op`` on the chosen backend; ``auto`` falls back to torch if it fails to launch."""
    chosen = dispatch.resolve(backend, device)
    try:
        return getattr(chosen, op)(*args)
    except (ValueError, TypeError):
        raise
    except Exception as exc:
        if backend != "auto" or chosen.name == "torch":
            raise
        return getattr(dispatch.fallback(chosen, exc), op)(*args)


def line_losses(
    logits: Tensor,
    direction_logits: Tensor,
    target: Tensor,
    steps: Tensor,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """``[K]`` float32: l(t_k) = mean over counted rows of CE(z0 - t_k d, y).

    logits z0 ``[n, C]``, direction_logits d ``[n, C]``, target ``[n]`` int, steps ``[K]``.
    Any float dtype in; float32 (float64 for float64 input) accumulation. Memory stays
    O(n C): candidates are never broadcast into a ``[K, n, C]`` tensor beyond a fixed chunk.
    ``validate=False`` skips the data checks (NaN/inf, label range) and their host sync.
    """
    check.tensor("logits", logits, 2)
    check.tensor("direction_logits", direction_logits, 2)
    check.shape("direction_logits", direction_logits, tuple(logits.shape), "same as logits")
    target = check.target_tensor(target, logits.shape[0])
    if not isinstance(steps, Tensor):
        raise TypeError(f"steps must be a torch.Tensor, got {type(steps).__name__}")
    check.tensor("steps", steps, 1)
    device = check.same_device(logits=logits, direction_logits=direction_logits, target=target, steps=steps)
    if validate:
        check.data(
            {"logits": logits, "direction_logits": direction_logits, "steps": steps},
            target, logits.shape[1], ignore_index, allow_all_ignored=False,
        )
    stats = _run(backend, device, "line_stats", logits, direction_logits, target, steps, ignore_index)
    return stats[LOSS].float()


def line_search(
    features: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    *,
    method: str = "newton",
    direction: str = "normalized",
    init_step: float = 1.0,
    max_step: float = 100.0,
    partitions: int = 16,
    ignore_index: int = -100,
    backend: str = "auto",
    validate: bool = True,
    logits_free: Optional[bool] = None,
) -> LineSearchResult:
    """Find t* = argmin_{0 <= t <= max_step} L(theta0 - t u) on a search batch.

    features h ``[n, D]``, weight W0 ``[C, D]``, bias b0 ``[C]`` or None, target ``[n]`` int.

    method: ``"newton"`` (exact minimiser of the convex l), ``"bracket_grid"`` (the reference
    script's doubling bracket then a ``partitions``-point grid), ``"grid"`` (``partitions`` points on
    (0, max_step]). direction: ``"normalized"`` u = g/||g|| (the paper) or ``"raw"`` u = g (the
    script). ``validate=False`` skips the data checks and their one host synchronisation.
    ``logits_free``: None (default) lets the backend decide whether to store z0 and d ``[n, C]``
    (the Triton backend stops storing them above n*C = 2**27); True/False forces it where the
    backend has a logits-free path (Triton) and is ignored elsewhere.
    """
    check.tensor("features", features, 2)
    check.tensor("weight", weight, 2)
    n, dim = features.shape
    classes = weight.shape[0]
    if weight.shape[1] != dim:
        raise ValueError(f"weight must have shape [C, {dim}] to match features [n, {dim}], got {list(weight.shape)}")
    if classes == 0:
        raise ValueError("weight has 0 rows: the head needs at least one class")
    if bias is not None:
        check.tensor("bias", bias, 1)
        check.shape("bias", bias, (classes,), "one entry per class, C = weight.shape[0]")
    target = check.target_tensor(target, n)
    check.choice("method", method, METHODS)
    check.choice("direction", direction, DIRECTIONS)
    check.positive("init_step", init_step)
    check.positive("max_step", max_step)
    check.positive("partitions", partitions, integer=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    device = check.same_device(features=features, weight=weight, bias=bias, target=target)
    if validate:
        check.data({"features": features, "weight": weight, "bias": bias}, target, classes, ignore_index,
                   allow_all_ignored=True)
    if logits_free is not None and not isinstance(logits_free, bool):
        raise TypeError(f"logits_free must be None, True or False, got {logits_free!r}")
    plan = SearchPlan(method, direction == "normalized", float(init_step), float(max_step), partitions, ignore_index,
                      logits_free=logits_free)
    grad, outcome = _run(backend, device, "line_search", features, weight, bias, target, plan)
    # u = scale * g in place: the backend's gradient is ours (Backend.line_search), and a second [C, D]
    # buffer would cost 2 GiB on an LM head.
    bias_direction = grad.grad_bias.mul_(grad.scale) if grad.grad_bias is not None else None
    has_direction = grad.grad_norm > 0  # g = 0: no direction, so no step whatever the method
    return LineSearchResult(
        step=torch.where(has_direction, outcome.step, torch.zeros_like(outcome.step)),
        weight_direction=grad.grad_weight.mul_(grad.scale),
        bias_direction=bias_direction,
        grad_norm=grad.grad_norm,
        loss0=outcome.loss0,
        loss=torch.where(has_direction, outcome.loss, outcome.loss0),
        capped=outcome.capped & has_direction,
        evaluations=outcome.evaluations,
        direction_norm=grad.grad_norm * grad.scale,
    )
