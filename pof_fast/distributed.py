"""The search on the union of every rank's search batch, and on class-sharded heads (torch.distributed).

Union search (``process_group=g``): every rank computes its head-gradient pieces and, per scoring round,
its candidates' loss/slope/curvature sums; one all-reduce each makes them global, so every rank runs the
same search driver on the same numbers and gets bit-identical t*, direction and perturbation, equal (up to
fp32 rounding of the sums) to the single-process search on the concatenated batch. Collectives: one for
the gradient (g_W, g_b and the row count in one buffer), one per scoring round (:func:`collectives`). A
collective cannot run inside a kernel, so here the rounds are separate scorer launches with an all-reduce
between: the ``cuda`` backend's single-launch search is replaced by its scorer under the Python driver.

Class-sharded heads (``sharded_classes=True``: each rank holds rows ``W0[c0:c1]`` of a tensor-parallel head,
every rank the same search rows and labels): log-sum-exps, softmax moments and ``||g||`` are made global
across ranks; each rank gets its slice of the direction and the same t*. The per-rank pieces use the plain
PyTorch ops (accumulation in fp32, or fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import drivers, reference
from ._types import HeadGradient, SearchPlan, SearchTensors, accumulation_dtype, assemble
from .backends.base import Backend

__all__ = ["collectives", "class_range", "union_search", "sharded_search"]

ProcessGroup = dist.ProcessGroup
# Class-sharded scoring forms [k, n, C_r] candidate logits in blocks of at most this many elements.
CHUNK_ELEMENTS = 1 << 22


def collectives(plan: SearchPlan, sharded_classes: bool = False) -> int:
    """All-reduces/gathers one distributed search makes (a count, not a host sync)."""
    rounds = {"newton": 1 + plan.newton_iterations, "grid": 2, "bracket_grid": 2}[plan.method]
    if sharded_classes:
        return 1 + 2 + 1 + 1 + 2 * rounds  # class offsets, log-sum-exp (max, sum), ||g||, target terms, rounds
    return 1 + rounds


def union_search(backend: Backend, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                 plan: SearchPlan, group: ProcessGroup) -> SearchTensors:
    """The search on the union of the ranks' batches with ``backend``'s ops; see the module docstring."""
    acc = accumulation_dtype(weight.dtype)
    local = backend.head_gradient(features, weight, bias, target, plan.ignore_index, plan.normalized)
    m_local = reference.count_rows(target, plan.ignore_index).to(acc)
    # 1. One all-reduce: m_local g (sums over the rank's counted rows) and m_local.
    pieces = [local.grad_weight.reshape(-1), local.grad_bias] if bias is not None else [local.grad_weight.reshape(-1)]
    buffer = torch.cat([p * m_local for p in pieces] + [m_local.reshape(1)])
    dist.all_reduce(buffer, group=group)
    m = buffer[-1].clamp_min(1)
    classes, dim = weight.shape
    grad_weight = (buffer[: classes * dim] / m).view(classes, dim)
    grad_bias = buffer[classes * dim: -1] / m if bias is not None else None
    grad_norm = reference.squared_norm(grad_weight, grad_bias).sqrt()
    grad = HeadGradient(local.logits, None, grad_weight, grad_bias, grad_norm,
                        reference.direction_scale(grad_norm, plan.normalized))
    # 2. This rank's direction logits along the global u (residual None: the Gram form would use the local R).
    direction = backend.direction_logits(features, grad)

    def stats(steps: Tensor) -> Tensor:  # 3. one all-reduce per scoring round
        sums = backend.line_stats(local.logits, direction, target, steps, plan.ignore_index) * m_local
        dist.all_reduce(sums, group=group)
        return sums / m

    return assemble(grad, drivers.run(stats, plan, features.device, acc))


def class_range(classes: int, device: torch.device, group: ProcessGroup) -> tuple[int, int]:
    """(c0, C_total): this rank's first class and the head's size, from one all-gather of the slice sizes."""
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([classes], dtype=torch.int64, device=device), group=group)
    sizes = torch.cat(counts).tolist()
    return int(sum(sizes[: dist.get_rank(group)])), int(sum(sizes))


def _global_lse(z: Tensor, group: ProcessGroup) -> Tensor:
    """log-sum-exp over the last dim of the class-sharded ``z`` (``[..., C_r]``) across ranks: two all-reduces."""
    top = z.amax(-1)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (z - top[..., None]).exp().sum(-1)
    dist.all_reduce(total, group=group)
    return total.log() + top


def sharded_search(features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan,
                   group: ProcessGroup) -> SearchTensors:
    """The search on a class-sharded head: this rank holds ``W0[c0:c1]``, every rank all rows and labels."""
    acc = accumulation_dtype(weight.dtype)
    h = features.to(acc)
    w, b = weight.to(acc), None if bias is None else bias.to(acc)
    classes = weight.shape[0]
    offset, total_classes = class_range(classes, features.device, group)
    # Labels: global indices; a counted label outside [0, C_total) makes its row NaN (reference.label_rows).
    safe, row_weight = reference.label_rows(target, total_classes, plan.ignore_index, acc)
    owned = (safe >= offset) & (safe < offset + classes) & (row_weight != 0)
    local_label = torch.where(owned, safe - offset, 0)
    one_hot = torch.zeros(target.shape[0], classes, dtype=acc, device=features.device)
    one_hot.scatter_(1, local_label[:, None], owned[:, None].to(acc))
    # 1. Residual with the global log-sum-exp; g_W, g_b of this slice; the global ||g||.
    z0 = torch.nn.functional.linear(h, w, b)
    residual = ((z0 - _global_lse(z0, group)[:, None]).exp() - one_hot) * row_weight[:, None]
    grad_weight = residual.t() @ h
    grad_bias = residual.sum(0) if bias is not None else None
    squares = reference.squared_norm(grad_weight, grad_bias)
    dist.all_reduce(squares, group=group)
    grad_norm = squares.sqrt()
    scale = reference.direction_scale(grad_norm, plan.normalized)
    d = reference.direction_logits(h, grad_weight, grad_bias, scale)
    # 2. The target logit and its direction entry, from the rank that owns the label.
    target_terms = torch.stack([(z0 * one_hot).sum(1), (d * one_hot).sum(1)])
    dist.all_reduce(target_terms, group=group)
    z_y, d_y = target_terms
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, z0.numel()))  # candidates per [k, n, C_r] block

    def candidate_logits(steps: Tensor):
        for t in steps.split(per_chunk):
            yield t, z0[None] - t[:, None, None] * d[None]  # [k, n, C_r]

    def stats(steps: Tensor) -> Tensor:  # 3. two all-reduces per scoring round (the max, then the sums)
        top = torch.cat([zt.amax(-1) for _, zt in candidate_logits(steps)])  # [K, n]
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        moments = []
        for (t, zt), top_t in zip(candidate_logits(steps), top.split(per_chunk)):
            e = (zt - top_t[..., None]).exp()
            moments.append(torch.stack([e.sum(-1), (e * d).sum(-1), (e * d.square()).sum(-1)]))
        moments = torch.cat(moments, dim=1)  # [3, K, n]
        dist.all_reduce(moments, group=group)
        mass, first, second = moments
        mean_d = first / mass
        loss = mass.log() + top - z_y + steps[:, None] * d_y
        return torch.stack([loss, d_y - mean_d, second / mass - mean_d.square()]) @ row_weight  # [3, K]

    grad = HeadGradient(z0, residual, grad_weight, grad_bias, grad_norm, scale)
    return assemble(grad, drivers.run(stats, plan, features.device, acc))

