"""The compiled CPU backend ("cpp", torch.ops.pof_fast.*) against the float64 oracles of tests/oracle.py."""
from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch

import oracle
import pof_fast
from pof_fast import _ext, dispatch
from pof_fast.drivers import SearchPlan

if not _ext.available() and not os.environ.get("POF_FAST_REQUIRE_EXT"):
    pytest.skip(f"pof_fast._C not built ({_ext.reason()})", allow_module_level=True)

ops = torch.ops.pof_fast
# Sizes crossing the 16-lane vector width and the row blocks: C = 1, 15, 16, 17, ...
SIZES = [(1, 1), (1, 17), (3, 16), (37, 15), (257, 33), (64, 1000)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def problem(n: int, classes: int, dtype=torch.float32, scale: float = 3.0, ignore_every: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z0 = (torch.randn(n, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    d = torch.randn(n, classes, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return z0, d, y


def oracle_stats(z0, d, y, steps):
    rows = [oracle.line_derivatives(z0, d, y, float(t)) for t in steps]
    return torch.tensor(rows, dtype=torch.float64).t()


@pytest.mark.parametrize("n,classes", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_line_stats_matches_oracle(n, classes, dtype):
    z0, d, y = problem(n, classes, dtype, ignore_every=4 if n > 4 else 0)
    steps = torch.tensor([0.0, 0.3, 1.0, 4.0])
    got = ops.line_stats(z0, d, y, steps, -100)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = oracle_stats(z0, d, y, steps)  # on the same (rounded) inputs
    oracle.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype], what=f"line_stats {dtype} n={n} C={classes}")


def test_line_stats_many_candidates_and_mixed_dtypes():
    z0, d, y = problem(19, 40, torch.bfloat16, ignore_every=3)
    steps = torch.linspace(0, 8, 37)  # crosses the 16-candidate chunks
    got = ops.line_stats(z0, d.float(), y, steps, -100)
    oracle.assert_close(got, oracle_stats(z0, d, y, steps), atol=2e-5, rtol=2e-5, what="line_stats K=37")


@pytest.mark.parametrize("scale", [1e-4, 30.0, 1e3])
def test_line_stats_huge_and_tiny_logits(scale):
    z0, d, y = problem(33, 50, torch.float32, scale=scale)
    steps = torch.tensor([0.0, 0.01, 2.0])
    got = ops.line_stats(z0, d * scale, y, steps, -100)
    want = oracle_stats(z0, d * scale, y, steps)
    assert torch.isfinite(got).all()
    oracle.assert_close(got, want, atol=1e-5 * max(1.0, scale), rtol=1e-5, what=f"line_stats scale={scale}")


def test_nan_propagates_as_in_torch():
    """Unchecked NaN input (validate=False skips the check) gives NaN, never a finite wrong answer."""
    z0, d, y = problem(5, 40)
    z0[2, 7] = float("nan")
    stats = ops.line_stats(z0, d, y, torch.tensor([0.0, 0.5]), -100)
    assert torch.isnan(stats[0]).all()
    h, w = torch.randn(5, 8), torch.randn(40, 8)
    h[1, 3] = float("nan")
    residual = ops.head_gradient(h, w, None, y, -100, True)[1]
    assert torch.isnan(residual[1]).all() and torch.isfinite(residual[0]).all()


def test_line_stats_all_ignored_is_zero():
    z0, d, y = problem(5, 7)
    got = ops.line_stats(z0, d, torch.full_like(y, -100), torch.tensor([0.0, 1.0]), -100)
    assert torch.equal(got, torch.zeros(3, 2))


def test_threads_change_nothing_but_the_time():
    """Row blocks run on at::parallel_for (OpenMP) and are added in block order: bitwise the same with 1 or 2
    threads, with enough rows for several blocks, and a bad label still raises a ValueError."""
    z0, d, y = problem(600, 300, ignore_every=7)
    h, w = torch.randn(600, 24), torch.randn(300, 24)
    threads = torch.get_num_threads()
    got = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            stats = ops.line_stats(z0, d, y, torch.linspace(0, 2, 20), -100)
            step = ops.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 7)[0]
            residual = ops.head_gradient(h, w, None, y, -100, True)[1]
            got.append((stats, step, residual))
            with pytest.raises(ValueError, match=r"target\[599\] = 300 is outside"):
                ops.line_stats(z0, d, torch.cat([y[:-1], torch.tensor([300])]), torch.zeros(1), -100)
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*got):
        assert torch.equal(one, two)


def test_line_stats_errors_name_the_problem():
    z0, d, y = problem(4, 6)
    with pytest.raises(ValueError, match="direction must have the shape"):
        ops.line_stats(z0, d[:, :5], y, torch.zeros(1), -100)
    with pytest.raises(ValueError, match=r"target\[1\] = 6 is outside"):
        ops.line_stats(z0, d, torch.tensor([0, 6, 1, 2]), torch.zeros(1), -100)
    with pytest.raises(TypeError, match="logits must be a float32"):
        ops.line_stats(z0.long(), d, y, torch.zeros(1), -100)
    with pytest.raises(ValueError, match="method must be one of"):
        ops.search(z0, d, y, "golden", 1.0, 100.0, 16, -100, 8, 8)


@pytest.mark.parametrize("n,dim,classes", [(1, 3, 1), (37, 19, 33), (200, 64, 300), (5, 300, 200)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("normalized", [True, False])
def test_head_gradient_and_direction_match_oracle(n, dim, classes, bias, normalized):
    g = torch.Generator().manual_seed(n + classes)
    h = torch.randn(n, dim, generator=g)
    w = torch.randn(classes, dim, generator=g) / dim**0.5
    b = torch.randn(classes, generator=g) if bias else None
    y = torch.randint(0, classes, (n,), generator=g)
    y[::5] = -100
    y[-1] = max(0, classes - 1)
    logits, residual, gw, gb, norm, scale = ops.head_gradient(h, w, b, y, -100, normalized)
    z0, gw64, gb64, norm64 = oracle.head_gradient(h, w, b, y)
    oracle.assert_close(logits, z0, 1e-4, 1e-4, "logits")
    oracle.assert_close(gw, gw64, 1e-6, 1e-4, "grad_weight")
    assert gb.numel() == (classes if bias else 0)
    if bias:
        oracle.assert_close(gb, gb64, 1e-6, 1e-4, "grad_bias")
    assert abs(norm.item() - norm64) <= 1e-5 * norm64 + 1e-7
    want_scale = (1.0 / norm64 if normalized else 1.0) if norm64 > 0 else 0.0  # C = 1: g = 0
    assert abs(scale.item() - want_scale) <= 1e-5 * want_scale
    d = ops.direction_logits(h, gw, gb if bias else None, scale, residual)
    oracle.assert_close(d, oracle.direction(h, gw64, gb64, want_scale), 1e-5 * max(1.0, want_scale), 1e-4, "direction")


def test_head_gradient_zero_when_all_ignored():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    _, residual, gw, gb, norm, scale = ops.head_gradient(h, w, torch.zeros(5), torch.full((4,), -100), -100, True)
    assert not residual.any() and not gw.any() and not gb.any()
    assert norm.item() == 0.0 and scale.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_head_residual_huge_and_tiny_logits(dtype, scale):
    """The fused softmax residual on the op's own z0: saturated rows, flat rows, C = 35 across SIMD lanes."""
    g = torch.Generator().manual_seed(11)
    h = (torch.randn(13, 21, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(35, 21, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 35, (13,), generator=g)
    y[2] = -100
    logits, residual, _, _, norm, _ = ops.head_gradient(h, w, None, y, -100, True)
    want = oracle.residual(logits, y)
    oracle.assert_close(residual, want, 1e-12 if dtype == torch.float64 else 1e-7, 1e-5, "residual")
    assert torch.isfinite(norm)


def test_head_gradient_bf16_features():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(29, 40, generator=g).bfloat16()
    w = (torch.randn(17, 40, generator=g) / 7).bfloat16()
    y = torch.randint(0, 17, (29,), generator=g)
    logits, residual, gw, _, _, _ = ops.head_gradient(h, w, None, y, -100, True)
    assert logits.dtype == torch.bfloat16 and residual.dtype == gw.dtype == torch.float32
    want = oracle.head_gradient(h, w, None, y)[1]  # float64 from the same bf16 inputs, except z0's bf16 rounding
    oracle.assert_close(gw, want, 2e-3, 2e-2, "grad_weight bf16")


def search_problem(n, dim, classes, seed, dtype=torch.float32, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g).to(dtype)
    w = (torch.randn(classes, dim, generator=g) * spread / dim**0.5).to(dtype)
    b = torch.randn(classes, generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return h, w, b, y


CASES = [(64, 32, 10, 0), (37, 17, 33, 1), (128, 64, 100, 2), (1, 8, 1, 3), (256, 40, 7, 4)]


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
@pytest.mark.parametrize("direction", ["raw", "normalized"])
def test_bracket_grid_picks_the_torch_backend_point(n, dim, classes, seed, direction):
    h, w, b, y = search_problem(n, dim, classes, seed)
    kw = dict(method="bracket_grid", direction=direction)
    cpp = pof_fast.line_search(h, w, b, y, backend="cpp", **kw)
    ref = pof_fast.line_search(h, w, b, y, backend="torch", **kw)
    assert cpp.evaluations == ref.evaluations
    assert bool(cpp.capped) == bool(ref.capped)
    if cpp.step.item() != ref.step.item():  # only a near-tie may pick another point
        assert abs(cpp.loss.item() - ref.loss.item()) <= 1e-6 * max(1.0, abs(ref.loss.item()))
    oracle.assert_close(cpp.loss0, ref.loss0, 1e-6, 1e-6, "loss0")


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
def test_grid_and_script_choice(n, dim, classes, seed):
    h, w, b, y = search_problem(n, dim, classes, seed)
    cpp = pof_fast.line_search(h, w, b, y, method="grid", direction="raw", backend="cpp")
    ref = pof_fast.line_search(h, w, b, y, method="grid", direction="raw", backend="torch")
    assert cpp.step.item() == ref.step.item() or abs(cpp.loss.item() - ref.loss.item()) <= 1e-6
    # the float64 reference script on the same problem picks the same bracket_grid point
    bg = pof_fast.line_search(h.double(), w.double(), b.double(), y, method="bracket_grid", direction="raw",
                              backend="cpp")
    z0 = torch.nn.functional.linear(h.double(), w.double(), b.double())
    d = oracle.direction(h, *oracle.head_gradient(h, w, b, y)[1:3], 1.0)
    best, losses = oracle.script_search(z0, d, y)
    if bg.step.item() != pytest.approx(best, rel=1e-12):
        assert min(losses) == pytest.approx(oracle.line_loss(z0, d, y, bg.step.item()), rel=1e-9)


@pytest.mark.parametrize("init,cap", [(1e-3, 1e3), (0.37, 1e3), (1.0, 1.5)])
def test_long_and_short_brackets_match_the_script(init, cap):
    """l(0) shares the first scorer call with the doublings; 1e-3 -> 1e3 needs 21 points, two calls of 16."""
    h, w, b, y = (t.double() if t.is_floating_point() else t for t in search_problem(64, 12, 9, 5))
    bg = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", init_step=init, max_step=cap,
                              backend="cpp")
    z0 = torch.nn.functional.linear(h, w, b)
    d = oracle.direction(h, *oracle.head_gradient(h, w, b, y)[1:3], 1.0)
    best, losses = oracle.script_search(z0, d, y, init=init, cap=cap)
    assert bg.step.item() == pytest.approx(best, rel=1e-12)
    assert bg.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y, 0.0), rel=1e-12)
    assert bg.loss.item() == pytest.approx(min(losses), rel=1e-12)


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_newton_optimality(n, dim, classes, seed, dtype):
    h, w, b, y = search_problem(n, dim, classes, seed, dtype)
    res = pof_fast.line_search(h, w, b, y, method="newton", backend="cpp")
    ref = pof_fast.line_search(h, w, b, y, method="newton", backend="torch")
    z0 = torch.nn.functional.linear(h, w, b).double()
    d = oracle.direction(h, res.weight_direction.double(), res.bias_direction.double(), 1.0)
    _, slope0, _ = oracle.line_derivatives(z0, d, y, 0.0)
    _, slope, _ = oracle.line_derivatives(z0, d, y, res.step.item())
    if bool(res.capped):
        assert res.step.item() == 100.0 and slope < 0
    else:
        tol = 1e-5 if dtype == torch.float64 else 2e-4  # fp32 scoring resolves l' to ~1e-7 absolute
        assert abs(slope) <= tol * abs(slope0) + 1e-7
    assert res.step.item() == pytest.approx(ref.step.item(), rel=1e-3, abs=1e-6)
    assert res.evaluations == ref.evaluations


def test_separable_batch_is_capped_and_zero_gradient_gives_zero_step():
    h = torch.eye(4).repeat(8, 1)
    y = torch.arange(4).repeat(8)
    w = torch.eye(4) * 3
    res = pof_fast.line_search(h, w, None, y, method="newton", max_step=2.0, backend="cpp")
    assert bool(res.capped) and res.step.item() == 2.0 and res.loss.item() < res.loss0.item()
    res = pof_fast.line_search(h, w, None, torch.full_like(y, -100), method="bracket_grid", backend="cpp")
    assert res.grad_norm.item() == 0.0 and torch.isfinite(res.weight_direction).all()
    assert res.loss0.item() == 0.0


def test_capped_newton_skips_nothing_it_reports():
    """A capped newton search skips its iterations in C++: every output still matches the torch drivers'."""
    h = torch.eye(6).repeat(5, 1) + 0.01 * torch.randn(30, 6, generator=torch.Generator().manual_seed(4))
    y = torch.arange(6).repeat(5)
    w, b = torch.eye(6) * 2, torch.zeros(6)
    got = pof_fast.line_search(h, w, b, y, method="newton", max_step=3.0, backend="cpp")
    want = pof_fast.line_search(h, w, b, y, method="newton", max_step=3.0, backend="torch")
    assert bool(got.capped) and bool(want.capped) and got.step.item() == want.step.item() == 3.0
    for name in ("loss0", "loss", "grad_norm"):
        assert getattr(got, name).item() == pytest.approx(getattr(want, name).item(), rel=1e-5), name
    z0 = torch.nn.functional.linear(h, w, b).double()
    d = oracle.direction(h, got.weight_direction.double(), got.bias_direction.double(), 1.0)
    assert oracle.line_derivatives(z0, d, y, 3.0)[1] < 0  # still falling at the cap
    assert got.loss.item() == pytest.approx(oracle.line_loss(z0, d, y, 3.0), rel=1e-5)


def test_search_op_matches_driver_on_its_own_stats():
    """The native search scores exactly the candidates the Python drivers score with the same stats."""
    z0, d, y = problem(50, 20, scale=1.0, seed=7)
    plan = SearchPlan(method="bracket_grid", normalized=False)
    native = dispatch._load("cpp").search(z0, d, y, plan)
    via_python = dispatch.Backend.search(dispatch._load("cpp"), z0, d, y, plan)
    assert native.step.item() == via_python.step.item()
    assert native.loss.item() == pytest.approx(via_python.loss.item(), rel=1e-6)


def test_torch_compile_traces_the_ops():
    def score(z0, d, y, steps):
        return ops.line_stats(z0, d, y, steps, -100)[0] * 2.0

    def search(z0, d, y):
        step, loss0, loss, capped = ops.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 8)
        return step * 2.0, loss0 - loss

    z0, d, y = problem(9, 12)
    steps = torch.tensor([0.0, 0.5])
    compiled = torch.compile(score, backend="aot_eager", fullgraph=True)
    oracle.assert_close(compiled(z0, d, y, steps), score(z0, d, y, steps), 0, 0, "compiled line_stats")
    compiled_search = torch.compile(search, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled_search(z0, d, y), search(z0, d, y)):
        oracle.assert_close(got, want, 0, 0, "compiled search")


def test_backends_report_the_compiled_ops():
    status = pof_fast.backends()
    assert status["cpp"] is True
    assert _ext.compiled_ops() in ("CPU", "CPU+CUDA")
    assert dispatch.resolve("auto", torch.device("cpu")).name == "cpp"


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    real_import = importlib.import_module

    def fail(name, *args):
        if name == "pof_fast._C":
            raise ImportError("simulated: _C not built")
        return real_import(name, *args)

    monkeypatch.setattr(_ext, "_tried", False)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext.importlib, "import_module", fail)
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    h, w, b, y = search_problem(16, 8, 5, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pof_fast.line_search(h, w, b, y)
        pof_fast.line_search(h, w, b, y)
        status = pof_fast.backends()
    messages = [str(c.message) for c in caught if "compiled extension unavailable" in str(c.message)]
    assert len(messages) == 1 and "simulated" in messages[0]
    assert "simulated" in status["cpp"] and status["cuda"] != True  # noqa: E712
    assert not _ext.available() and "ImportError" in _ext.reason()
    ref = pof_fast.line_search(h, w, b, y, backend="torch")
    assert res.step.item() == ref.step.item()
