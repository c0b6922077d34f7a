"""Public search API: :func:`line_losses` and :func:`line_search`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _validate as check
from . import dispatch, distributed, plans
from ._types import LOSS, SearchPlan
from .drivers import evaluations

__all__ = ["LineSearchResult", "line_losses", "line_search", "raise_named"]


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
    evaluations:      candidate steps the method scored, l(0) included (bracket_grid and grid: the same on every
                      backend; newton: the rounds x points of the path that ran, :mod:`pof_fast.plans`).
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


def raise_named(floats: dict, target: Tensor, classes: int, ignore_index: int, allow_all_ignored: bool) -> None:
    """After a failed folded check: name the bad argument (the slow path), or say the values overflowed."""
    check.data(floats, target, classes, ignore_index, allow_all_ignored=allow_all_ignored)
    dtypes = sorted({str(v.dtype) for v in floats.values() if v is not None})
    raise ValueError(
        f"the search gave a non-finite loss or gradient from finite inputs and valid labels: the logits "
        f"overflow in {', '.join(dtypes)} (scale the features or the head down, or search in float32)"
    )


def _refuse_dtensors(**tensors: Optional[Tensor]) -> None:
    for name, value in tensors.items():
        if distributed.is_dtensor(value):
            raise TypeError(
                f"{name} is a DTensor: line_search takes plain tensors. For a sharded head use pof_fast.PoF(..., "
                "head=h), which reads its layout, or pass this rank's rows (weight.to_local()) with "
                "process_group=g and sharded_classes=(first_class, num_classes)")


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
    Any float dtype in; float32 (float64 for float64 input) accumulation, autocast off. Memory stays
    O(n C): candidates are never broadcast into a ``[K, n, C]`` tensor beyond a fixed chunk.
    ``validate=True`` raises a ``ValueError`` naming the argument when an input is NaN/inf, a label is
    out of range or every label is ignored (one host read of the result); ``validate=False`` skips that
    read, and such inputs give NaN (labels out of range) or zeros (all ignored).
    """
    check.tensor("logits", logits, 2)
    check.tensor("direction_logits", direction_logits, 2)
    check.shape("direction_logits", direction_logits, tuple(logits.shape), "same as logits")
    target = check.target_tensor(target, logits.shape[0])
    if not isinstance(steps, Tensor):
        raise TypeError(f"steps must be a torch.Tensor, got {type(steps).__name__}")
    check.tensor("steps", steps, 1)
    check.integer("ignore_index", ignore_index)
    device = check.same_device(logits=logits, direction_logits=direction_logits, target=target, steps=steps)
    with torch.autocast(device.type, enabled=False):
        stats = dispatch.run(backend, device,
                             lambda b: b.line_stats(logits, direction_logits, target, steps, ignore_index))
    losses = stats[LOSS].float()
    if validate and not bool(torch.isfinite(losses).all() & (target != ignore_index).any()):
        raise_named({"logits": logits, "direction_logits": direction_logits, "steps": steps},
                     target, logits.shape[1], ignore_index, allow_all_ignored=False)
    return losses


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
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
    sharded_classes: Union[bool, Tuple[int, int]] = False,
) -> LineSearchResult:
    """Find t* = argmin_{0 <= t <= max_step} L(theta0 - t u) on a search batch.

    features h ``[n, D]``, weight W0 ``[C, D]``, bias b0 ``[C]`` or None, target ``[n]`` int. Token batches:
    features ``[..., D]`` with target ``[...]`` (e.g. ``[B, T, D]`` and ``[B, T]``) search over every row of the
    leading dimensions, flattened without a copy where a view will do; rows labelled ``ignore_index`` count in
    no sum (see :func:`pof_fast.causal_lm_rows` for a causal LM's shifted labels).

    method: ``"newton"`` (exact minimiser of the convex l), ``"bracket_grid"`` (the reference
    script's doubling bracket then a ``partitions``-point grid), ``"grid"`` (``partitions`` points on
    (0, max_step]). direction: ``"normalized"`` u = g/||g|| (the paper) or ``"raw"`` u = g (the
    script). ``logits_free``: None (default) lets the backend decide whether to store z0 and d
    ``[n, C]`` (the Triton backend stops storing them above n*C = 2**27); True/False forces it where the
    backend has a logits-free path (Triton) and is ignored elsewhere.

    Precision: the search runs with autocast off and accumulates in float32 (float64 for float64
    inputs). Features and head of different float dtypes are promoted to a common one first
    (``torch.promote_types``), exactly as if the caller had cast them.

    ``process_group``: search the union of every rank's search batch (all-reduces of the gradient and of
    each scoring round's sums): every rank gets bit-identical t* and directions, equal to the search on the
    concatenated batch (:mod:`pof_fast.distributed`). ``sharded_classes=True`` (with a group): the head is
    class-sharded across the ranks (``weight`` is this rank's rows ``W0[c0:c1]``, in rank order; features and
    global labels the same on every rank); each rank gets its slice of the direction and the same t*.
    ``sharded_classes=(c0, C)``: the same, with this rank's first class and the head's size given (the slices in any
    order; no gather of their sizes). DTensors are refused: ``PoF(..., head=h)`` reads a sharded head's layout.

    ``validate=True`` reads one flag of the result (one host read): when l(0) or ||g|| is not finite it
    finds and names the bad argument (NaN/inf in features, weight or bias; a label outside [0, C) that is
    not ``ignore_index``) in a ``ValueError``. ``validate=False`` reads nothing (no host synchronisation;
    required inside a CUDA graph), and a bad label then makes l(0), l(t*), ||g|| and the directions NaN on
    every backend (never an out-of-range read). Shape, dtype and device errors are always raised.
    """
    _refuse_dtensors(features=features, weight=weight, bias=bias, target=target)
    check.row_features("features", features)
    check.tensor("weight", weight, 2)
    dim = features.shape[-1]
    classes = weight.shape[0]
    if weight.shape[1] != dim:
        raise ValueError(f"weight must have shape [C, {dim}] to match features [..., {dim}], got {list(weight.shape)}")
    if classes == 0:
        raise ValueError("weight has 0 rows: the head needs at least one class")
    if bias is not None:
        check.tensor("bias", bias, 1)
        check.shape("bias", bias, (classes,), "one entry per class, C = weight.shape[0]")
    target = check.target_tensor(target, features.shape[:-1])
    features = features.reshape(-1, dim)  # token batches [..., D]: rows over the leading dimensions (a view if it can)
    check.search_options(method, direction, init_step, max_step, partitions, ignore_index)
    if logits_free is not None and not isinstance(logits_free, bool):
        raise TypeError(f"logits_free must be None, True or False, got {logits_free!r}")
    if not isinstance(sharded_classes, bool) and not (
            isinstance(sharded_classes, tuple) and len(sharded_classes) == 2
            and all(isinstance(c, int) and not isinstance(c, bool) for c in sharded_classes)
            and 0 <= sharded_classes[0] <= sharded_classes[1] - classes):
        raise ValueError(f"sharded_classes must be False, True or (c0, C) with 0 <= c0 <= C - {classes} (this rank's "
                         f"first class and the head's classes), got {sharded_classes!r}")
    if sharded_classes is not False and process_group is None:
        raise ValueError("sharded_classes=True needs a process_group: the ranks that hold the head's slices")
    device = check.same_device(features=features, weight=weight, bias=bias, target=target)
    dtype = torch.promote_types(features.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    h, w, b = (None if x is None else x.to(dtype) for x in (features, weight, bias))
    plan = SearchPlan(method, direction == "normalized", float(init_step), float(max_step), partitions, ignore_index,
                      logits_free=logits_free)
    used = []  # the plan of the path that ran (newton: its rounds x points, pof_fast.plans), for ``evaluations``

    def search_on(chosen):
        used.append(chosen.resolve_plan(plan, h, w))
        if process_group is None:
            return chosen.line_search(h, w, b, target, used[-1])
        return distributed.union_search(chosen, h, w, b, target, used[-1], process_group)

    with torch.autocast(device.type, enabled=False):
        if sharded_classes is not False:  # plain PyTorch ops per rank: the torch path's plan
            used.append(plans.resolve(plan, "torch"))
            offsets = None if sharded_classes is True else sharded_classes
            out = distributed.sharded_search(h, w, b, target, used[-1], process_group, offsets)
        else:
            out = dispatch.run(backend, device, search_on)
    # One host read: l(0) + ||g|| is finite iff both are (NaN and inf propagate through the sum).
    if validate and not math.isfinite((out.loss0 + out.grad_norm).item()):
        if sharded_classes is True:  # labels are global class indices: the bound is the whole head's size
            classes = distributed.class_range(classes, device, process_group)[1]
        elif sharded_classes is not False:
            classes = sharded_classes[1]
        raise_named({"features": features, "weight": weight, "bias": bias}, target, classes, ignore_index,
                     allow_all_ignored=True)
    return LineSearchResult(
        step=out.step,
        weight_direction=out.weight_direction,
        bias_direction=out.bias_direction if bias is not None else None,
        grad_norm=out.grad_norm,
        loss0=out.loss0,
        loss=out.loss,
        capped=out.capped,
        evaluations=evaluations(used[-1]),
        direction_norm=out.direction_norm,
    )
