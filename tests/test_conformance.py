"""One conformance suite for the search specification, run against every backend.

Every method (bracket_grid, grid, newton) on regular problems, a capped line, g = 0 (every label
ignored), ties (a flat line), and the exact count of scored candidates, each against the float64
oracles of ``oracle.py`` (autograd head gradient, float64 cross-entropy one candidate at a time, the
script's loop). Newton's t* with the plan of each path (``pof_fast.plans``) against the float64 bisection
on the plan problem set. ``triton`` runs in Triton's interpreter on a CPU-only machine (the small problems
only); ``cuda`` needs a GPU.
"""
import math

import pytest
import torch

import oracle
import pof_fast
from pof_fast import dispatch, plans
from pof_fast._types import SearchPlan
from pof_fast.backends.compiled import stores_16bit_lines
from pof_fast.bench import plan_problems
from problems import head_problem, line_problem

GPU = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("cpp", "cpu", id="cpp"),
    pytest.param("triton", GPU, id="triton", marks=pytest.mark.triton),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
]
PROBLEMS = [dict(n=37, dim=16, classes=7, spread=1.0), dict(n=64, dim=32, classes=100, spread=3.0)]


@pytest.fixture
def backend(request):
    return request.param


def use(name):
    loaded = dispatch.load(name)
    if not isinstance(loaded, dispatch.Backend):
        pytest.fail(f"backend {name!r} unavailable here: {loaded}")
    return loaded


def expected_evaluations(method, path="torch", init=1.0, cap=100.0, partitions=16):
    """Candidates the specification scores, l(0) included, counted from its definition (newton: the plan table's
    rounds x points for the path)."""
    if method == "newton":
        return 2 + plans.NEWTON_PLANS[path].rounds * plans.NEWTON_PLANS[path].points
    if method == "grid":
        return 1 + partitions
    doublings = 1 + max(0, math.ceil(math.log2(cap / init)) - 1)  # init * 2^k < cap, the first always scored
    return 1 + doublings + partitions


def assert_grid_argmin(got, z0, d, y, end, partitions=16):
    """``got`` is the first argmin of the float64 losses on end*k/P, or ties it within float32 noise."""
    grid = [end * k / partitions for k in range(1, partitions + 1)]
    losses = [oracle.line_loss(z0, d, y, t) for t in grid]
    k = round(got / end * partitions) - 1
    assert 0 <= k < partitions and got == pytest.approx(grid[k], rel=1e-6), got
    assert losses[k] - min(losses) <= 1e-6 * max(1.0, abs(min(losses))), (got, losses[k], min(losses))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", PROBLEMS, ids=["small", "C100"])
@pytest.mark.parametrize("name,device", BACKENDS)
def test_every_method_matches_the_float64_oracle(name, device, size, bias):
    backend = use(name)
    h, w, b, y = head_problem(**size, bias=bias, ignore_every=5, seed=11, device=device)
    path = backend.plan_path(h, w, SearchPlan())
    for method, direction in (("bracket_grid", "raw"), ("grid", "normalized"), ("newton", "normalized")):
        z0, d, g_w, g_b, norm, scale = oracle.line(h, w, b, y, direction == "normalized")
        got = pof_fast.line_search(h, w, b, y, method=method, direction=direction, backend=name)
        what = f"{name} {method}"
        assert got.evaluations == expected_evaluations(method, path), what
        assert got.grad_norm.item() == pytest.approx(norm, rel=1e-5), what
        oracle.assert_close(got.weight_direction, g_w * scale, atol=1e-6, rtol=1e-4, what=what)
        if bias:
            oracle.assert_close(got.bias_direction, g_b * scale, atol=1e-6, rtol=1e-4, what=what)
        else:
            assert got.bias_direction is None
        y64 = y.cpu()
        assert got.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y64, 0.0), rel=1e-5), what
        t = got.step.item()
        assert got.loss.item() == pytest.approx(oracle.line_loss(z0, d, y64, t), rel=1e-4, abs=1e-6), what
        if method == "bracket_grid":
            oracle.assert_grid_point(t, z0, d, y64, what=what)
        elif method == "grid":
            assert_grid_argmin(t, z0, d, y64, 100.0)
        else:
            oracle.assert_newton_optimal(t, got.capped, z0, d, y64, rel=2e-4, what=what)


def separable(device):
    """Each row's features point at its own class: the loss falls for ever along -g (a capped line)."""
    h = torch.eye(6, device=device).repeat(4, 1)
    w = torch.zeros(6, 6, device=device)
    return h, w, torch.zeros(6, device=device), torch.arange(6, device=device).repeat(4)


@pytest.mark.parametrize("method", ["newton", "grid", "bracket_grid"])
@pytest.mark.parametrize("name,device", BACKENDS)
def test_a_line_that_falls_for_ever_is_capped_at_max_step(name, device, method):
    use(name)
    h, w, b, y = separable(device)
    got = pof_fast.line_search(h, w, b, y, method=method, max_step=2.0, backend=name)
    z0, d, *_ = oracle.line(h, w, b, y, True)
    end = 2.0  # the bracket too: its doubling from init = 1 stops at 2 >= max_step
    assert oracle.line_derivatives(z0, d, y.cpu(), end)[1] < 0  # float64: still falling at the cap
    assert got.step.item() == end and bool(got.capped)
    assert got.loss.item() == pytest.approx(oracle.line_loss(z0, d, y.cpu(), end), rel=1e-5)


@pytest.mark.parametrize("method", ["newton", "grid", "bracket_grid"])
@pytest.mark.parametrize("name,device", BACKENDS)
def test_every_label_ignored_gives_no_step(name, device, method):
    use(name)
    h, w, b, y = head_problem(12, 5, 4, seed=2, device=device)
    y = torch.full_like(y, -100)
    got = pof_fast.line_search(h, w, b, y, method=method, backend=name)
    assert got.step.item() == 0.0 and not bool(got.capped)
    assert got.grad_norm.item() == 0.0 and got.direction_norm.item() == 0.0
    assert not got.weight_direction.any() and not got.bias_direction.any()
    assert got.loss0.item() == 0.0 and got.loss.item() == 0.0


@pytest.mark.parametrize("name,device", BACKENDS)
def test_a_flat_line_ties_everywhere_and_the_first_candidate_wins(name, device):
    """d = 0: l(t) = l(0) for every t, so no candidate rises (the rise is strict) and every grid loss ties."""
    backend = use(name)
    z0, _, y = line_problem(9, 5, seed=3, ignore_every=4, device=device)
    d = torch.zeros_like(z0)
    want_bracket, _ = oracle.script_search(z0.cpu(), d.cpu(), y.cpu())  # the script: first of the tied grid
    expected = {"bracket_grid": want_bracket, "grid": 100.0 / 16, "newton": 0.0}  # newton: no descent at 0
    for method, want in expected.items():
        out = backend.search(z0, d, y, SearchPlan(method=method))
        assert out.step.item() == want, method
        assert not bool(out.capped), method
        assert out.loss.item() == out.loss0.item() == pytest.approx(oracle.line_loss(z0.cpu(), d.cpu(), y.cpu(), 0.0),
                                                                   rel=1e-6)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_a_bad_label_gives_nan_without_validation_and_a_named_error_with_it(name, device):
    use(name)
    h, w, b, y = head_problem(10, 4, 3, seed=5, device=device)
    for bad in (3, -5):
        y_bad = y.clone()
        y_bad[4] = bad
        got = pof_fast.line_search(h, w, b, y_bad, backend=name, validate=False)
        assert math.isnan(got.loss0.item()) and math.isnan(got.grad_norm.item())
        with pytest.raises(ValueError, match="target has labels outside \\[0, 3\\)"):
            pof_fast.line_search(h, w, b, y_bad, backend=name)


def newton_cases():
    """(backend, problem) pairs: every problem on the CPU backends and CUDA, the small ones in Triton's interpreter."""
    cases = []
    for param in BACKENDS:
        name, device = param.values
        for problem in plan_problems.PROBLEMS:
            if name == "triton" and not problem.small and not torch.cuda.is_available():
                continue
            cases.append(pytest.param(name, device, problem, id=f"{name}-{problem.name}", marks=param.marks))
    return cases


@pytest.mark.parametrize("name,device,problem", newton_cases())
def test_newton_meets_the_accuracy_of_the_plan_table(name, device, problem):
    """|t* - t_exact| <= 1e-3 max(1, t_exact) with the plan of the path that runs, t_exact by float64 bisection on the
    line searched (z0 as the backends form it, d along the direction returned, rounded as a 16-bit path stores it)."""
    backend = use(name)
    h, w, b, y = plan_problems.make(problem, device)
    got = pof_fast.line_search(h, w, b, y, method="newton", direction="normalized" if problem.normalized else "raw",
                               max_step=problem.max_step, backend=name)
    path = backend.plan_path(h, w, SearchPlan())
    assert got.evaluations == expected_evaluations("newton", path), path
    z0, d = plan_problems.searched_line(h.cpu(), w.cpu(), None if b is None else b.cpu(), got.weight_direction.cpu(),
                                        None if b is None else got.bias_direction.cpu(),
                                        name == "cpp" and stores_16bit_lines(h, w))
    exact = oracle.exact_step(z0, d, y, problem.max_step)
    step = got.step.item()
    assert abs(step - exact) <= plans.TOLERANCE * max(1.0, exact), (path, step, exact)
    assert bool(got.capped) == (exact == problem.max_step), (path, step, exact)
