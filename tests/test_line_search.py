"""line_search (torch backend) against float64 oracles: gradient, direction, the three methods."""
import pytest
import torch

import pof_fast
from pof_fast import reference
import oracle
from oracle import assert_close


def head_problem(n=96, dim=24, c=10, bias=True, dtype=torch.float64, seed=0, ignored=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(c, dim, generator=g, dtype=torch.float64) * scale
    b = torch.randn(c, generator=g, dtype=torch.float64) * 0.1 if bias else None
    y = torch.randint(0, c, (n,), generator=g)
    y[:ignored] = -100
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(h), cast(w), cast(b), y


def oracle_direction(h, w, b, y, normalized=True):
    z0, gw, gb, norm = oracle.head_gradient(h, w, b, y)
    scale = (1.0 / norm if norm > 0 else 0.0) if normalized else float(norm > 0)
    return z0, oracle.direction(h, gw, gb, scale), gw, gb, norm, scale


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,dim,c", [(1, 3, 1), (37, 5, 3), (96, 24, 10), (257, 17, 100)])
def test_head_gradient_and_direction(bias, n, dim, c):
    h, w, b, y = head_problem(n, dim, c, bias, ignored=min(3, n - 1))
    grad = reference.head_gradient(h, w, b, y, -100, normalized=True)
    z0, d, gw, gb, norm, scale = oracle_direction(h, w, b, y)
    assert_close(grad.grad_weight, gw, 1e-12, 1e-10, "g_W")
    if bias:
        assert_close(grad.grad_bias, gb, 1e-12, 1e-10, "g_b")
    else:
        assert grad.grad_bias is None
    assert grad.grad_norm.item() == pytest.approx(norm, rel=1e-12)
    direction = reference.direction_logits(h, grad.grad_weight, grad.grad_bias, grad.scale)
    assert_close(direction, d, 1e-12, 1e-10, "d")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bias", [True, False])
def test_bracket_grid_picks_the_reference_scripts_grid_point(seed, bias):
    h, w, b, y = head_problem(128, 16, 10, bias, seed=seed, scale=0.1 + 0.2 * seed)
    res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw")
    z0, d, *_ = oracle_direction(h, w, b, y, normalized=False)
    want, losses = oracle.script_search(z0, d, y)
    ordered = sorted(losses)
    if ordered[1] - ordered[0] > 1e-9:  # not a near-tie
        assert res.step.item() == pytest.approx(want, rel=1e-12)
    assert res.loss.item() == pytest.approx(min(losses), rel=1e-9)
    assert res.evaluations == 1 + 7 + 16


def test_bracket_grid_matches_the_head_forward_loop_baseline():
    h, w, b, y = head_problem(200, 12, 7, seed=3)
    res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw")
    t_script, forwards = reference.script_search(h, w, b, y)
    assert res.step.item() == pytest.approx(t_script, rel=1e-12)
    assert 1 + 1 + 16 <= forwards <= 1 + 8 + 16


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_newton_is_optimal_or_capped(seed, dtype):
    h, w, b, y = head_problem(100, 20, 10, seed=seed, dtype=dtype, scale=0.05 + 0.3 * seed, ignored=seed)
    res = pof_fast.line_search(h, w, b, y, method="newton")
    z0, d, *_ = oracle_direction(h, w, b, y)
    t = res.step.item()
    _, slope0, _ = oracle.line_derivatives(z0, d, y, 0.0)
    loss, slope, _ = oracle.line_derivatives(z0, d, y, t)
    assert slope0 < 0
    if res.capped:
        assert t == 100.0 and slope < 0
    else:
        assert 0 < t < 100.0
        assert abs(slope) <= 1e-5 * abs(slope0)
    assert res.loss.item() == pytest.approx(loss, rel=1e-5)


def test_newton_capped_when_the_loss_falls_for_ever():
    # a separable batch: the loss keeps falling along the gradient, t* must stop at max_step
    h = torch.eye(4, dtype=torch.float64).repeat(8, 1)
    w = torch.zeros(4, 4, dtype=torch.float64)
    y = torch.arange(4).repeat(8)
    res = pof_fast.line_search(h, w, None, y, method="newton", max_step=50.0)
    assert bool(res.capped) and res.step.item() == 50.0
    assert res.loss.item() < res.loss0.item()
    z0, d, *_ = oracle_direction(h, w, None, y)
    assert res.loss.item() == pytest.approx(oracle.line_loss(z0, d, y, 50.0), rel=1e-9)


def test_grid_is_the_argmin_of_its_points():
    h, w, b, y = head_problem(64, 8, 5, seed=11)
    res = pof_fast.line_search(h, w, b, y, method="grid", max_step=20.0, partitions=10)
    z0, d, *_ = oracle_direction(h, w, b, y)
    points = [20.0 * k / 10 for k in range(1, 11)]
    losses = [oracle.line_loss(z0, d, y, t) for t in points]
    assert res.step.item() == pytest.approx(points[min(range(10), key=losses.__getitem__)])
    assert res.evaluations == 11


def test_raw_and_normalized_find_the_same_point_on_the_line():
    h, w, b, y = head_problem(80, 10, 6, seed=5)
    norm = pof_fast.line_search(h, w, b, y, method="newton", direction="normalized", max_step=1e3)
    raw = pof_fast.line_search(h, w, b, y, method="newton", direction="raw", max_step=1e3)
    assert (raw.step * raw.grad_norm).item() == pytest.approx(norm.step.item(), rel=1e-5)
    assert_close(raw.weight_direction / raw.grad_norm, norm.weight_direction, 1e-12, 1e-9, "u_W")
    assert norm.direction_norm.item() == pytest.approx(1.0)
    assert raw.direction_norm.item() == pytest.approx(raw.grad_norm.item())


@pytest.mark.parametrize("method", ["newton", "bracket_grid", "grid"])
def test_zero_gradient_gives_zero_step(method):
    h, w, b, y = head_problem(16, 4, 3)
    all_ignored = torch.full_like(y, -100)
    res = pof_fast.line_search(h, w, b, all_ignored, method=method)
    assert res.step.item() == 0.0 and res.grad_norm.item() == 0.0
    assert torch.count_nonzero(res.weight_direction) == 0 and torch.isfinite(res.weight_direction).all()
    assert not bool(res.capped)


def test_single_class_head_has_zero_gradient():
    h, w, b, y = head_problem(10, 3, 1)
    res = pof_fast.line_search(h, w, b, y)
    assert res.step.item() == 0.0 and res.grad_norm.item() == 0.0 and torch.isfinite(res.loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    h, w, b, y = head_problem(64, 16, 10, dtype=dtype, seed=2)
    res = pof_fast.line_search(h, w, b, y, method="newton")
    z0, d, *_ = oracle_direction(h, w, b, y)  # float64 oracle on the rounded inputs
    _, slope0, _ = oracle.line_derivatives(z0, d, y, 0.0)
    _, slope, _ = oracle.line_derivatives(z0, d, y, res.step.item())
    # the logits are formed in low precision, so optimality holds to that precision only
    assert abs(slope) <= 2e-2 * abs(slope0)
    assert res.weight_direction.dtype == torch.float32


def test_result_is_on_device_and_inputs_unchanged():
    h, w, b, y = head_problem(20, 5, 4, ignored=3)
    copies = [t.clone() for t in (h, w, b, y)]
    res = pof_fast.line_search(h, w, b, y)
    assert isinstance(res.step, torch.Tensor) and res.step.dim() == 0
    assert all(torch.equal(a, c) for a, c in zip((h, w, b, y), copies))
