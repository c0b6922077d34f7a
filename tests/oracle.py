"""Independent float64 oracles for the tests, written without pof_fast's search code (one generic bisection loop
aside, from pof_fast.bench).

Loss values come from ``torch.nn.functional.cross_entropy`` one candidate at a time, derivatives
from autograd through a scalar t, the head gradient from autograd through the head.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pof_fast.bench.plan_problems import bisect_minimiser

# The accuracy Newton's plans promise (pof_fast.plans.TOLERANCE, restated: the tests state the criterion themselves).
PLAN_TOLERANCE = 1e-3


def line_loss(z0: Tensor, d: Tensor, y: Tensor, t: float, ignore_index: int = -100) -> float:
    return F.cross_entropy(z0.double() - t * d.double(), y, ignore_index=ignore_index).item()


def line_derivatives(z0: Tensor, d: Tensor, y: Tensor, t: float, ignore_index: int = -100):
    """(l(t), l'(t), l''(t)) by double backward through a float64 scalar t."""
    tt = torch.tensor(float(t), dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(z0.double() - tt * d.double(), y, ignore_index=ignore_index)
    (first,) = torch.autograd.grad(loss, tt, create_graph=True)
    (second,) = torch.autograd.grad(first, tt)
    return loss.item(), first.item(), second.item()


def exact_step(z0: Tensor, d: Tensor, y: Tensor, max_step: float, ignore_index: int = -100) -> float:
    """The minimiser of the float64 line on [0, max_step] by bisection on l' (autograd; the bisection loop, no
    line math, is the benchmarks' own) to 1e-12: 0 when l'(0) >= 0, max_step when l'(max_step) < 0."""
    z0, d, y = z0.double().cpu(), d.double().cpu(), y.cpu()

    def slope(t: float) -> float:
        tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        (first,) = torch.autograd.grad(F.cross_entropy(z0 - tt * d, y, ignore_index=ignore_index), tt)
        return first.item()

    return bisect_minimiser(slope, max_step)


def residual(z0: Tensor, y: Tensor, ignore_index: int = -100) -> Tensor:
    """``[n, C]`` float64 dL/dz0 of the mean cross-entropy by autograd (softmax - onehot over m)."""
    z = z0.double().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(z, y, ignore_index=ignore_index), z)
    return grad


def head_gradient(h: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, ignore_index: int = -100):
    """(z0, g_W, g_b or None, ||g||) in float64 by autograd."""
    w64 = w.double().clone().requires_grad_(True)
    b64 = b.double().clone().requires_grad_(True) if b is not None else None
    z0 = F.linear(h.double(), w64, b64)
    loss = F.cross_entropy(z0, y, ignore_index=ignore_index)
    params = [w64] if b64 is None else [w64, b64]
    grads = torch.autograd.grad(loss, params)
    g_w = grads[0]
    g_b = grads[1] if b64 is not None else None
    norm = (g_w.square().sum() + (g_b.square().sum() if g_b is not None else 0.0)).sqrt()
    return z0.detach(), g_w, g_b, norm.item()


def direction(h: Tensor, g_w: Tensor, g_b: Optional[Tensor], scale: float) -> Tensor:
    """d = h u_W^T + u_b in float64 with u = scale * g."""
    d = h.double() @ (scale * g_w).t()
    return d + scale * g_b if g_b is not None else d


def script_search(z0: Tensor, d: Tensor, y: Tensor, init=1.0, cap=100.0, partitions=16, ignore_index=-100):
    """The reference script's bracket-then-grid loop, float64, one candidate at a time."""
    base = line_loss(z0, d, y, 0.0, ignore_index)
    t = init
    while True:
        if line_loss(z0, d, y, t, ignore_index) > base:
            break
        t *= 2.0
        if t >= cap:
            break
    grid = torch.linspace(0, t, partitions + 1, dtype=torch.float64)[1:].tolist()
    losses = [line_loss(z0, d, y, s, ignore_index) for s in grid]
    best = min(range(partitions), key=lambda k: losses[k])
    return grid[best], losses


def cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


def line_stats(z0, d, y, steps):
    """``[3, K]`` float64 (l, l', l'') at each step, on the CPU."""
    z0, d, y = cpu(z0, d, y)
    return torch.tensor([line_derivatives(z0, d, y, float(t)) for t in steps], dtype=torch.float64).t()


def line(h, w, b, y, normalized, rounded_logits=False):
    """float64 (z0, d, g_W, g_b, ||g||, scale) of the line searched, on the CPU, by autograd.

    ``rounded_logits``: z0 = h W^T + b formed in the input dtype on the input's device (what the backends
    score for 16-bit heads), then the float64 gradient of the mean cross-entropy at those logits.
    """
    if rounded_logits:
        z0 = F.linear(h, w, b).double().cpu()
        h, y = cpu(h, y)
        r = residual(z0, y)
        gw = r.t() @ h.double()
        gb = r.sum(0) if b is not None else None
        norm = (gw.square().sum() + (gb.square().sum() if gb is not None else 0.0)).sqrt().item()
    else:
        h, w, b, y = cpu(h, w, b, y)
        z0, gw, gb, norm = head_gradient(h, w, b, y)
    scale = (1.0 / norm if normalized else 1.0) if norm > 0 else 0.0
    return z0, direction(h, gw, gb, scale), gw, gb, norm, scale


def assert_grid_point(step, z0, d, y, what="", **script):
    """``step`` is the reference script's pick on the float64 line, or ties its loss within fp32 noise."""
    y = y.cpu()
    want, losses = script_search(z0, d, y, **script)
    got = float(step)
    if got != pytest.approx(want, rel=1e-6):
        got_loss = line_loss(z0, d, y, got)
        assert abs(got_loss - min(losses)) <= 1e-6 * max(1.0, abs(min(losses))), (
            f"{what}: picked t={got} (loss {got_loss}), the script picked {want} (loss {min(losses)})")


def assert_newton_optimal(step, capped, z0, d, y, rel, max_step=100.0, what=""):
    """Newton's t* against the float64 line: 0 without descent, capped, or the minimiser to the plan accuracy.

    The plan table's plans (pof_fast.plans) promise |t* - t_exact| <= 1e-3 max(1, t_exact) (t_exact: bisection on
    l'); a t* outside that must at least meet the slope test |l'(t*)| <= rel |l'(0)| + 1e-7 of a finer plan.
    """
    y = y.cpu()
    t = float(step)
    _, slope0, _ = line_derivatives(z0, d, y, 0.0)
    _, slope, _ = line_derivatives(z0, d, y, t)
    if slope0 >= 0:
        assert t == 0.0 and not bool(capped), f"{what}: l'(0) = {slope0} >= 0 but t* = {t}"
    elif bool(capped):
        assert t == max_step and slope < 0, f"{what}: capped at t={t} with l'={slope}"
    else:
        assert 0.0 < t <= max_step, what  # l' may underflow to a tiny positive value before the cap
        exact = exact_step(z0, d, y, max_step)
        if abs(t - exact) <= PLAN_TOLERANCE * max(1.0, exact):
            return
        assert abs(slope) <= rel * abs(slope0) + 1e-7, (
            f"{what}: t* = {t}, t_exact = {exact}; |l'({t})| = {abs(slope)}, |l'(0)| = {abs(slope0)}")


def assert_close(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str = "") -> None:
    """Like torch.testing.assert_close, reporting how many elements differ, the first few, and NaN/inf."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"non-finite in actual: {int((~torch.isfinite(actual)).sum())}; first (index, got, want): {pairs}"
        )
