"""line_search on the torch backend against float64 oracles: gradient, direction, the three methods."""
import pytest
import torch

import oracle
import pof_fast
from oracle import assert_close
from pof_fast import reference
from problems import head_problem

BACKEND = "torch"
# |l'(t*)| / |l'(0)| a newton search reaches; fp32 scoring resolves l' to ~1e-7 of its scale.
SLOPE_TOL = {torch.float64: 1e-7, torch.float32: 1e-5}


def oracle_direction(h, w, b, y, normalized=True):
    """float64 z0, d along u = g/||g|| (or g), g_W, g_b, ||g|| and the scale, by autograd."""
    z0, gw, gb, norm = oracle.head_gradient(h, w, b, y)
    scale = (1.0 / norm if normalized else 1.0) if norm > 0 else 0.0
    return z0, oracle.direction(h, gw, gb, scale), gw, gb, norm, scale


def assert_minimiser(t, z0, d, y, rel, what="", max_step=100.0):
    """t is the minimiser of the convex float64 l on the line: within the plan accuracy of the float64 bisection
    (oracle.PLAN_TOLERANCE), or else |l'(t)| <= rel |l'(0)| and the float64 Newton step from t, l'(t)/l''(t) (the
    distance to the true minimiser to second order), is <= rel t."""
    _, slope0, _ = oracle.line_derivatives(z0, d, y, 0.0)
    _, slope, curvature = oracle.line_derivatives(z0, d, y, t)
    assert slope0 < 0, what
    exact = oracle.exact_step(z0, d, y, max_step)
    if abs(t - exact) <= oracle.PLAN_TOLERANCE * max(1.0, exact):
        return
    assert abs(slope) <= rel * abs(slope0), f"{what}: |l'({t})| = {abs(slope)} vs |l'(0)| = {abs(slope0)}"
    assert abs(slope) <= rel * t * curvature, f"{what}: Newton distance {slope / curvature} from t* = {t}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,dim,c", [(1, 3, 1), (37, 5, 3), (96, 24, 10), (257, 17, 100)])
def test_head_gradient_and_direction(bias, n, dim, c):
    h, w, b, y = head_problem(n, dim, c, bias=bias, dtype=torch.float64, ignore_every=4 if n > 1 else 0)
    grad = reference.head_gradient(h, w, b, y, -100, normalized=True)
    z0, d, gw, gb, norm, scale = oracle_direction(h, w, b, y)
    assert_close(grad.logits, z0, 1e-12, 1e-12, "z0")
    assert_close(grad.grad_weight, gw, 1e-12, 1e-10, "g_W")
    if bias:
        assert_close(grad.grad_bias, gb, 1e-12, 1e-10, "g_b")
    else:
        assert grad.grad_bias is None
    assert grad.grad_norm.item() == pytest.approx(norm, rel=1e-12, abs=1e-15)
    assert grad.scale.item() == pytest.approx(scale, rel=1e-12)
    direction = reference.direction_logits(h, grad.grad_weight, grad.grad_bias, grad.scale)
    assert_close(direction, d, 1e-12, 1e-10, "d")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bias", [True, False])
def test_bracket_grid_picks_the_reference_scripts_grid_point(seed, bias):
    dim = 16
    h, w, b, y = head_problem(128, dim, 10, bias=bias, dtype=torch.float64, seed=seed,
                              spread=(0.1 + 0.2 * seed) * dim**0.5)
    res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", backend=BACKEND)
    z0, d, gw, gb, norm, _ = oracle_direction(h, w, b, y, normalized=False)
    want, losses = oracle.script_search(z0, d, y)
    ordered = sorted(losses)
    if ordered[1] - ordered[0] > 1e-9:  # not a near-tie
        assert res.step.item() == pytest.approx(want, rel=1e-12)
    assert res.loss.item() == pytest.approx(min(losses), rel=1e-9)
    assert res.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y, 0.0), rel=1e-12)
    assert res.grad_norm.item() == pytest.approx(norm, rel=1e-12)
    assert_close(res.weight_direction, gw, 1e-12, 1e-10, "u_W = g_W")
    if bias:
        assert_close(res.bias_direction, gb, 1e-12, 1e-10, "u_b = g_b")
    else:
        assert res.bias_direction is None
    assert res.evaluations == 1 + 7 + 16


def test_bracket_grid_matches_the_head_forward_loop_baseline():
    h, w, b, y = head_problem(200, 12, 7, dtype=torch.float64, seed=3, spread=0.3 * 12**0.5)
    res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", backend=BACKEND)
    t_script, forwards = reference.script_search(h, w, b, y)
    assert res.step.item() == pytest.approx(t_script, rel=1e-12)
    # l(0), the bracket's doublings up to the first rise (1, 2, ..., 64 at most), the 16-point grid
    assert 1 + 1 + 16 <= forwards <= 1 + 7 + 16


def test_evaluations_counts_the_candidates_scored(monkeypatch):
    """``evaluations`` is exact: it equals the candidates the torch backend hands its scorer."""
    scored = []
    line_stats = reference.line_stats

    def counting(logits, direction, target, steps, ignore_index, *args, **kwargs):
        scored.append(steps.numel())
        return line_stats(logits, direction, target, steps, ignore_index, *args, **kwargs)

    monkeypatch.setattr(reference, "line_stats", counting)
    h, w, b, y = head_problem(40, 6, 5, dtype=torch.float64, seed=4)
    cases = [dict(method="newton"), dict(method="grid", partitions=7), dict(method="bracket_grid"),
             dict(method="bracket_grid", init_step=1e-3, max_step=1e3), dict(method="bracket_grid", max_step=1.5)]
    for kwargs in cases:
        scored.clear()
        res = pof_fast.line_search(h, w, b, y, backend=BACKEND, **kwargs)
        assert scored and res.evaluations == sum(scored), (kwargs, scored)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_newton_is_optimal_or_capped(seed, dtype):
    dim = 20
    h, w, b, y = head_problem(100, dim, 10, dtype=dtype, seed=seed, spread=(0.05 + 0.3 * seed) * dim**0.5,
                              ignore_every=seed + 2 if seed else 0)
    res = pof_fast.line_search(h, w, b, y, method="newton", backend=BACKEND)
    z0, d, *_ = oracle_direction(h, w, b, y)
    t = res.step.item()
    loss, slope, _ = oracle.line_derivatives(z0, d, y, t)
    if res.capped:
        assert t == 100.0 and slope < 0
    else:
        assert 0 < t < 100.0
        assert_minimiser(t, z0, d, y, SLOPE_TOL[dtype], what=f"seed={seed} {dtype}")
    assert res.loss.item() == pytest.approx(loss, rel=1e-5)
    assert res.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y, 0.0), rel=1e-6)


def test_newton_capped_when_the_loss_falls_for_ever():
    # a separable batch: the loss keeps falling along the gradient, t* must stop at max_step
    h = torch.eye(4, dtype=torch.float64).repeat(8, 1)
    w = torch.zeros(4, 4, dtype=torch.float64)
    y = torch.arange(4).repeat(8)
    res = pof_fast.line_search(h, w, None, y, method="newton", max_step=50.0, backend=BACKEND)
    assert bool(res.capped) and res.step.item() == 50.0
    assert res.loss.item() < res.loss0.item()
    z0, d, *_ = oracle_direction(h, w, None, y)
    assert oracle.line_derivatives(z0, d, y, 50.0)[1] < 0  # still falling at the cap
    assert res.loss.item() == pytest.approx(oracle.line_loss(z0, d, y, 50.0), rel=1e-9)


def test_grid_is_the_argmin_of_its_points():
    h, w, b, y = head_problem(64, 8, 5, dtype=torch.float64, seed=11, spread=0.3 * 8**0.5)
    res = pof_fast.line_search(h, w, b, y, method="grid", max_step=20.0, partitions=10, backend=BACKEND)
    z0, d, *_ = oracle_direction(h, w, b, y)
    points = [20.0 * k / 10 for k in range(1, 11)]
    losses = [oracle.line_loss(z0, d, y, t) for t in points]
    assert res.step.item() == pytest.approx(points[min(range(10), key=losses.__getitem__)], rel=1e-12)
    assert res.loss.item() == pytest.approx(min(losses), rel=1e-12)
    assert res.evaluations == 11


def test_raw_and_normalized_find_the_same_point_on_the_line():
    """u = g/||g|| and u = g: each direction is the oracle's, each step the minimiser in its own unit,
    so both name the same head theta0 - t* u (t*_raw ||g|| = t*_normalized)."""
    h, w, b, y = head_problem(80, 10, 6, dtype=torch.float64, seed=5, spread=0.3 * 10**0.5)
    norm = pof_fast.line_search(h, w, b, y, method="newton", direction="normalized", max_step=1e3, backend=BACKEND)
    raw = pof_fast.line_search(h, w, b, y, method="newton", direction="raw", max_step=1e3, backend=BACKEND)
    assert not bool(norm.capped) and not bool(raw.capped)
    z0, d_norm, gw, gb, g_norm, _ = oracle_direction(h, w, b, y, normalized=True)
    d_raw = oracle_direction(h, w, b, y, normalized=False)[1]
    assert_close(norm.weight_direction, gw / g_norm, 1e-12, 1e-10, "normalized u_W")
    assert_close(norm.bias_direction, gb / g_norm, 1e-12, 1e-10, "normalized u_b")
    assert_close(raw.weight_direction, gw, 1e-12, 1e-10, "raw u_W")
    assert_close(raw.bias_direction, gb, 1e-12, 1e-10, "raw u_b")
    assert norm.direction_norm.item() == pytest.approx(1.0, rel=1e-12)
    assert raw.direction_norm.item() == pytest.approx(g_norm, rel=1e-12)
    assert_minimiser(norm.step.item(), z0, d_norm, y, SLOPE_TOL[torch.float64], "normalized", max_step=1e3)
    assert_minimiser(raw.step.item(), z0, d_raw, y, SLOPE_TOL[torch.float64], "raw", max_step=1e3)
    assert raw.step.item() * g_norm == pytest.approx(norm.step.item(), rel=1e-6)


@pytest.mark.parametrize("method", ["newton", "bracket_grid", "grid"])
def test_zero_gradient_gives_zero_step(method):
    h, w, b, y = head_problem(16, 4, 3, dtype=torch.float64)
    all_ignored = torch.full_like(y, -100)
    res = pof_fast.line_search(h, w, b, all_ignored, method=method, backend=BACKEND)
    assert res.step.item() == 0.0 and res.grad_norm.item() == 0.0
    assert torch.count_nonzero(res.weight_direction) == 0 and torch.isfinite(res.weight_direction).all()
    assert res.loss.item() == res.loss0.item() == 0.0
    assert not bool(res.capped)


def test_single_class_head_has_zero_gradient():
    h, w, b, y = head_problem(10, 3, 1, dtype=torch.float64)
    res = pof_fast.line_search(h, w, b, y, backend=BACKEND)
    assert res.step.item() == 0.0 and res.grad_norm.item() == 0.0
    assert res.loss.item() == res.loss0.item() == 0.0  # one class: CE = 0 on every row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    h, w, b, y = head_problem(64, 16, 10, dtype=dtype, seed=2, spread=0.3 * 16**0.5)
    res = pof_fast.line_search(h, w, b, y, method="newton", backend=BACKEND)
    z0, d, *_ = oracle_direction(h, w, b, y)  # float64 oracle on the rounded inputs
    _, slope0, _ = oracle.line_derivatives(z0, d, y, 0.0)
    _, slope, _ = oracle.line_derivatives(z0, d, y, res.step.item())
    # the logits are formed in low precision, so optimality holds to that precision only
    assert abs(slope) <= 2e-2 * abs(slope0)
    assert res.weight_direction.dtype == torch.float32


def test_result_is_on_device_and_inputs_unchanged():
    h, w, b, y = head_problem(20, 5, 4, dtype=torch.float64, ignore_every=6)
    copies = [t.clone() for t in (h, w, b, y)]
    res = pof_fast.line_search(h, w, b, y, backend=BACKEND)
    assert isinstance(res.step, torch.Tensor) and res.step.dim() == 0
    assert all(torch.equal(a, c) for a, c in zip((h, w, b, y), copies))
