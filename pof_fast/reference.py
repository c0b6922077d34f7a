"""Plain PyTorch versions of every PoF op: CPU fallback, test oracle and benchmark baseline.

Shapes: ``n`` search rows, ``D`` features, ``C`` classes, ``K`` candidate steps.
Every function here accumulates in ``float32`` or, for ``float64`` inputs, in ``float64``;
nothing here synchronises with the host and nothing modifies its inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._types import HeadGradient, accumulation_dtype

__all__ = [
    "count_rows",
    "label_rows",
    "head_residual",
    "head_gradient",
    "squared_norm",
    "direction_scale",
    "direction_logits",
    "line_stats",
    "script_search",
]


def count_rows(target: Tensor, ignore_index: int) -> Tensor:
    """0-d int64: the number m of rows whose label is not ``ignore_index``."""
    return (target != ignore_index).sum()


def label_rows(target: Tensor, classes: int, ignore_index: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(safe_target ``[n]``, row_weight ``[n]``): what every op does with the labels.

    safe_target: the label where it is in [0, C), else 0 (a safe index to gather).
    row_weight: 1/max(m, 1) on counted rows (label != ignore_index; m counts them), 0 on ignored rows,
    NaN on counted rows whose label is outside [0, C): such a label makes the result NaN on every
    backend (what ``validate=False`` promises), never an out-of-range read.
    """
    counted = target != ignore_index
    bad = counted & ((target < 0) | (target >= classes))
    m = counted.sum().clamp_min(1).to(dtype)
    row_weight = torch.where(bad, torch.full_like(m, float("nan")), counted.to(dtype) / m)
    return torch.where(counted & ~bad, target, 0), row_weight


def head_residual(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """``[n, C]`` (softmax(z0) - onehot(y)) / max(m, 1), zero on ignored rows (see :func:`label_rows`)."""
    acc = accumulation_dtype(logits.dtype)
    safe_target, row_weight = label_rows(target, logits.shape[1], ignore_index, acc)
    residual = torch.softmax(logits.to(acc), dim=1)
    residual = residual.scatter_add(1, safe_target[:, None], -torch.ones_like(residual[:, :1]))
    return residual * row_weight[:, None]


def head_gradient(
    features: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    ignore_index: int,
    normalized: bool,
) -> HeadGradient:
    """Gradient of the mean cross-entropy w.r.t. the head (W0, b0) at the search batch.

    features ``[n, D]``, weight ``[C, D]``, bias ``[C]`` or None, target ``[n]`` int64.
    """
    logits = torch.nn.functional.linear(features, weight, bias)
    residual = head_residual(logits, target, ignore_index)
    acc = residual.dtype
    grad_weight = residual.t() @ features.to(acc)
    grad_bias = residual.sum(0) if bias is not None else None
    grad_norm = squared_norm(grad_weight, grad_bias).sqrt()
    return HeadGradient(logits, residual, grad_weight, grad_bias, grad_norm, direction_scale(grad_norm, normalized))


def squared_norm(grad_weight: Tensor, grad_bias: Optional[Tensor]) -> Tensor:
    """0-d ||g_W||^2 + ||g_b||^2."""
    sq = grad_weight.square().sum()
    return sq + grad_bias.square().sum() if grad_bias is not None else sq


def direction_scale(grad_norm: Tensor, normalized: bool) -> Tensor:
    """0-d factor with u = scale * g: 1/||g|| (normalized) or 1 (raw), 0 when g = 0 (never NaN)."""
    positive = grad_norm > 0
    if normalized:
        return torch.where(positive, 1.0 / torch.where(positive, grad_norm, 1.0), 0.0)
    return positive.to(grad_norm.dtype)


def direction_logits(
    features: Tensor, grad_weight: Tensor, grad_bias: Optional[Tensor], scale: Tensor
) -> Tensor:
    """``[n, C]`` d = h u_W^T + u_b with u = scale * g, in the accumulation dtype of g."""
    d = features.to(grad_weight.dtype) @ grad_weight.t()
    if grad_bias is not None:
        d = d + grad_bias
    return d * scale


def line_stats(
    logits: Tensor,
    direction: Tensor,
    target: Tensor,
    steps: Tensor,
    ignore_index: int,
    chunk_elements: int = 1 << 22,
) -> Tensor:
    """``[3, K]``: l(t_k), l'(t_k), l''(t_k) of the mean cross-entropy along z(t) = z0 - t d.

    logits z0 ``[n, C]``, direction d ``[n, C]``, target ``[n]``, steps ``[K]``.
    Means are over the m counted rows (divided by max(m, 1), so all-ignored gives zeros; see :func:`label_rows`).
    Candidates are processed in chunks so that at most ``chunk_elements`` of ``[k, n, C]`` live at once.
    """
    acc = accumulation_dtype(logits.dtype)
    z0 = logits.to(acc)
    d = direction.to(acc)
    safe_target, weight = label_rows(target, z0.shape[1], ignore_index, acc)
    z0_y = z0.gather(1, safe_target[:, None])[:, 0]
    d_y = d.gather(1, safe_target[:, None])[:, 0]
    steps = steps.to(device=z0.device, dtype=acc)
    per_chunk = max(1, chunk_elements // max(1, z0.numel()))
    out = []
    for t in steps.split(per_chunk):
        zt = z0 - t[:, None, None] * d  # [k, n, C]
        lse = torch.logsumexp(zt, dim=2)
        p = torch.exp(zt - lse[..., None])
        mean_d = (p * d).sum(2)
        var_d = (p * d.square()).sum(2) - mean_d.square()
        loss = lse - z0_y + t[:, None] * d_y
        out.append(torch.stack([loss, d_y - mean_d, var_d]) @ weight)  # [3, k]
    return torch.cat(out, dim=1)


def script_search(
    features: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    init_step: float = 1.0,
    max_step: float = 100.0,
    partitions: int = 16,
    ignore_index: int = -100,
) -> tuple[float, int]:
    """The authors' line search as their script runs it (SPEC section 3): the baseline.

    Raw gradient direction; every candidate rebuilds the head and runs it forward, with one
    ``.item()`` host synchronisation per candidate. Returns (t*, head forwards run).
    """
    ce = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    loss0 = ce(torch.nn.functional.linear(features, w, b), target)
    grads = torch.autograd.grad(loss0, [w] if b is None else [w, b])
    gw, gb = grads[0], (grads[1] if b is not None else None)
    base = loss0.item()
    forwards = 1

    def loss_at(t: float) -> float:
        nonlocal forwards
        forwards += 1
        with torch.no_grad():
            wt = weight - t * gw
            bt = bias - t * gb if bias is not None else None
            return ce(torch.nn.functional.linear(features, wt, bt), target).item()

    t = init_step
    while True:
        if loss_at(t) > base:
            break
        t *= 2.0
        if t >= max_step:
            break
    best_t, best_loss = 0.0, float("inf")
    for k in range(1, partitions + 1):
        tk = t * k / partitions
        lk = loss_at(tk)
        if lk < best_loss:
            best_t, best_loss = tk, lk
    return best_t, forwards
