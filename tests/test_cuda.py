"""The compiled CUDA backend ("cuda") against the float64 oracles; skipped without a GPU (conftest).

Every problem is drawn on the CPU (tests/problems.py) and moved to the GPU; every oracle runs in float64
on the CPU (tests/oracle.py) on copies of exactly the tensors the backend was given.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import pof_fast
from pof_fast import _ext, reference
from pof_fast._types import LOSS, SLOPE, SearchOutcome, SearchTensors
from problems import head_problem, line_problem

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda")
BACKEND = "cuda"
SIZES = [(1, 1), (1, 33), (7, 31), (37, 257), (300, 1000), (9, 5000)]  # warp and block edges
TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.bfloat16: 5e-5, torch.float16: 5e-5}
# |l'(t*)| <= SLOPE_TOL |l'(0)| (+ 1e-7 absolute) for newton: fp32 scoring resolves l' to ~1e-7.
SLOPE_TOL = {torch.float64: 1e-5, torch.float32: 2e-4, torch.bfloat16: 2e-4}
# Absolute error of l(t*) per unit of max(1, l(0)): where l(t*) ~ 0 (a separated batch) only this bounds it.
LOSS_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}
# Heads of the SPEC's cases A and B, a reduced case C, odd sizes and a one-class head (g = 0).
CASES = [(256, 640, 10, 0), (256, 640, 100, 1), (256, 256, 1000, 2), (37, 19, 33, 3), (3, 8, 1, 4)]


@pytest.fixture(autouse=True)
def cuda_ops():
    if not _ext.cuda_compiled():
        pytest.fail(f"pof_fast._C was built without CUDA ({_ext.reason() or 'CPU-only build'})")
    return _ext.ops()


def loss_at(z0, d, y, t):
    return oracle.line_loss(z0, d, y.cpu(), float(t))


# ---------------------------------------------------------------- line_stats and the search op on a line


@pytest.mark.parametrize("n,classes", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_line_stats_matches_oracle(cuda_ops, n, classes, dtype):
    z0, d, y = line_problem(n, classes, dtype=dtype, ignore_every=3 if n > 3 else 0, device=DEVICE)
    steps = torch.linspace(0, 3, 19, dtype=torch.float64)  # > 16 candidates: several register chunks
    got = cuda_ops.line_stats(z0, d, y, steps.to(DEVICE), -100)
    assert got.device == z0.device and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    oracle.assert_close(got, oracle.line_stats(z0, d, y, steps), TOL[dtype], TOL[dtype],
                        f"cuda line_stats {dtype} n={n} C={classes}")


def test_line_stats_all_ignored_and_huge_logits(cuda_ops):
    z0, d, y = line_problem(40, 100, scale=1e3, ignore_every=3, device=DEVICE)
    steps = torch.tensor([0.0, 1.0], device=DEVICE)
    got = cuda_ops.line_stats(z0, d, torch.full_like(y, -100), steps, -100)
    assert torch.equal(got.cpu(), torch.zeros(3, 2))
    got = cuda_ops.line_stats(z0, d, y, steps, -100)
    assert torch.isfinite(got).all()
    oracle.assert_close(got, oracle.line_stats(z0, d, y, steps), 1e-5 * 1e3, 1e-5, "huge logits")


@pytest.mark.parametrize("n,classes,seed", [(1, 1, 0), (3, 17, 1), (50, 20, 7), (257, 33, 2), (64, 1000, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_search_op_on_a_given_line_matches_the_oracle(cuda_ops, n, classes, seed, dtype):
    """``ops.search`` over stored z0 and d (one launch): bracket_grid is the script's pick, grid the argmin
    of its points, newton the minimiser of the float64 line (or t* = 0 where l'(0) >= 0)."""
    z0, d, y = line_problem(n, classes, dtype=dtype, scale=1.0, seed=seed, ignore_every=5 if n > 5 else 0,
                            device=DEVICE)
    z64, d64 = z0.double().cpu(), d.double().cpu()
    bg = SearchOutcome(*cuda_ops.search(z0, d, y, "bracket_grid", 1.0, 100.0, 16, -100, 8, 8))
    assert bg.step.device == z0.device and bg.step.dim() == 0 and bg.capped.dtype == torch.bool
    oracle.assert_grid_point(bg.step, z64, d64, y, what="bracket_grid")
    assert bg.loss0.item() == pytest.approx(loss_at(z64, d64, y, 0.0), rel=1e-6, abs=1e-6)
    assert bg.loss.item() == pytest.approx(loss_at(z64, d64, y, bg.step), rel=1e-6, abs=1e-6)

    grid = SearchOutcome(*cuda_ops.search(z0, d, y, "grid", 1.0, 20.0, 10, -100, 8, 8))
    points = [20.0 * k / 10 for k in range(1, 11)]
    losses = [loss_at(z64, d64, y, t) for t in points]
    assert any(float(grid.step) == pytest.approx(t, rel=1e-6) for t in points), float(grid.step)
    assert loss_at(z64, d64, y, grid.step) <= min(losses) + 1e-6 * max(1.0, abs(min(losses)))

    newton = SearchOutcome(*cuda_ops.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 8))
    oracle.assert_newton_optimal(newton.step, newton.capped, z64, d64, y, SLOPE_TOL[dtype], what="newton")
    assert newton.loss.item() == pytest.approx(loss_at(z64, d64, y, newton.step), rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------- head gradient and direction


@pytest.mark.parametrize("n,dim,classes", [(1, 3, 1), (37, 19, 33), (256, 640, 100), (5, 300, 1000)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_gradient_matches_oracle(cuda_ops, n, dim, classes, bias, dtype):
    h, w, b, y = head_problem(n, dim, classes, bias=bias, dtype=dtype, bias_scale=1.0, seed=n,
                              ignore_every=4 if n > 4 else 0, device=DEVICE)
    logits, residual, gw, gb, norm, scale = cuda_ops.head_gradient(h, w, b, y, -100, True)
    z0, gw64, gb64, norm64 = oracle.head_gradient(*oracle.cpu(h, w, b, y))
    tight = dtype == torch.float64
    atol, rtol = (1e-10, 1e-8) if tight else (1e-6, 1e-4)
    oracle.assert_close(logits, z0, atol, rtol, "logits")
    oracle.assert_close(residual, oracle.residual(z0, y.cpu()), atol, rtol, "residual")
    oracle.assert_close(gw, gw64, atol, rtol, "grad_weight")
    assert gb.numel() == (classes if bias else 0)
    if bias:
        oracle.assert_close(gb, gb64, atol, rtol, "grad_bias")
    assert norm.item() == pytest.approx(norm64, rel=1e-9 if tight else 1e-5, abs=1e-12 if tight else 1e-7)
    want_scale = 1.0 / norm64 if norm64 > 0 else 0.0  # C = 1: g = 0
    assert scale.item() == pytest.approx(want_scale, rel=1e-9 if tight else 1e-5)
    d = cuda_ops.direction_logits(h, gw, gb if bias else None, scale, residual)
    want = oracle.direction(h.cpu(), gw64, gb64, want_scale)
    oracle.assert_close(d, want, (1e-10 if tight else 1e-5) * max(1.0, want_scale), rtol, "direction")


@pytest.mark.parametrize("n,dim,classes", [(16, 640, 100), (16, 2560, 1000)])  # the heads of SPEC cases B, C
def test_grad_norm_of_a_large_head_is_as_accurate_as_eager_torch(cuda_ops, n, dim, classes):
    """fp32 ||g|| over C*D entries: error against float64 <= 8x eager torch's on the GPU, or 1e-6."""
    h, w, b, y = head_problem(n, dim, classes, bias_scale=1.0, seed=6, device=DEVICE)
    norm = cuda_ops.head_gradient(h, w, b, y, -100, True)[4].item()
    norm64 = oracle.head_gradient(*oracle.cpu(h, w, b, y))[3]
    eager = reference.head_gradient(h, w, b, y, -100, True).grad_norm.item()
    error, eager_error = abs(norm / norm64 - 1), abs(eager / norm64 - 1)
    assert error <= max(8 * eager_error, 1e-6), f"||g|| relative error {error:.2e}, eager torch {eager_error:.2e}"


# ---------------------------------------------------------------- the whole line_search


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
@pytest.mark.parametrize("direction", ["raw", "normalized"])
def test_bracket_grid_matches_the_oracle(n, dim, classes, seed, direction):
    """Gradient, direction and the reference script's grid point, each against the float64 oracle."""
    h, w, b, y = head_problem(n, dim, classes, bias_scale=1.0, seed=seed, device=DEVICE)
    res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction=direction, backend=BACKEND)
    assert res.step.device == h.device and res.evaluations == 1 + 7 + 16
    z0, d, gw, gb, norm, scale = oracle.line(h, w, b, y, direction == "normalized")
    assert res.grad_norm.item() == pytest.approx(norm, rel=1e-5, abs=1e-7)
    assert res.direction_norm.item() == pytest.approx(norm * scale, rel=1e-5, abs=1e-7)
    oracle.assert_close(res.weight_direction, gw * scale, 1e-6 * max(1.0, scale), 1e-4, "u_W")
    oracle.assert_close(res.bias_direction, gb * scale, 1e-6 * max(1.0, scale), 1e-4, "u_b")
    assert res.loss0.item() == pytest.approx(loss_at(z0, d, y, 0.0), rel=1e-6)
    if norm == 0:  # one class: no direction, no step
        assert res.step.item() == 0.0 and res.loss.item() == res.loss0.item() and not bool(res.capped)
        return
    oracle.assert_grid_point(res.step, z0, d, y, what=f"{direction} n={n} C={classes}")
    assert res.loss.item() == pytest.approx(loss_at(z0, d, y, res.step), rel=1e-5,
                                            abs=LOSS_ATOL[torch.float32] * max(1.0, res.loss0.item()))


@pytest.mark.parametrize("init,cap", [(1e-3, 1e3), (0.37, 1e3), (1.0, 1.5)])
def test_long_and_short_brackets_match_the_script(init, cap):
    """float64: exactly the script's point; 1e-3 -> 1e3 scores 21 bracket points, more than one chunk of 16."""
    h, w, b, y = head_problem(64, 12, 9, dtype=torch.float64, bias_scale=1.0, seed=5, device=DEVICE)
    res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", init_step=init, max_step=cap,
                               backend=BACKEND)
    z0, d, *_ = oracle.line(h, w, b, y, normalized=False)
    best, losses = oracle.script_search(z0, d, y.cpu(), init=init, cap=cap)
    assert res.step.item() == pytest.approx(best, rel=1e-12)
    assert res.loss0.item() == pytest.approx(loss_at(z0, d, y, 0.0), rel=1e-12)
    assert res.loss.item() == pytest.approx(min(losses), rel=1e-12)


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
def test_grid_is_the_argmin_of_its_points(n, dim, classes, seed):
    h, w, b, y = head_problem(n, dim, classes, bias_scale=1.0, seed=seed, device=DEVICE)
    res = pof_fast.line_search(h, w, b, y, method="grid", direction="normalized", max_step=20.0, partitions=10,
                               backend=BACKEND)
    assert res.evaluations == 1 + 10
    z0, d, _, _, norm, _ = oracle.line(h, w, b, y, normalized=True)
    if norm == 0:
        assert res.step.item() == 0.0
        return
    points = [20.0 * k / 10 for k in range(1, 11)]
    losses = [loss_at(z0, d, y, t) for t in points]
    assert any(res.step.item() == pytest.approx(t, rel=1e-6) for t in points), res.step.item()
    assert loss_at(z0, d, y, res.step) <= min(losses) + 1e-6 * max(1.0, abs(min(losses)))


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("direction", ["normalized", "raw"])
def test_newton_is_the_true_minimiser(n, dim, classes, seed, dtype, direction):
    """t* minimises the float64 line along the oracle's direction (for bf16: the float64 line of the
    GPU's own bf16 logits, which is what the backend is asked to search).

    bf16 heads store R and d in bf16 and return u rounded to bf16 (d is formed from it on tensor cores): u_W
    must be bf16-valued and within bf16 rounding of the oracle's (norm-wise: R and u are each rounded once),
    and the line checked is the float64 line of the op's own bf16 d of that returned u, the one searched."""
    h, w, b, y = head_problem(n, dim, classes, dtype=dtype, bias_scale=1.0, seed=seed, device=DEVICE)
    res = pof_fast.line_search(h, w, b, y, method="newton", direction=direction, backend=BACKEND)
    low = dtype == torch.bfloat16
    z0, d, gw, _, norm, scale = oracle.line(h, w, b, y, direction == "normalized", rounded_logits=low)
    if low:
        u = res.weight_direction.cpu()
        assert torch.equal(u, u.bfloat16().float()), "u_W is not bf16-valued"
        assert (u.double() - gw * scale).norm().item() <= 2.0**-7 * max(1.0, (gw * scale).norm().item())
        d = _ext.ops().direction_logits(h, res.weight_direction, res.bias_direction,
                                        torch.tensor(1.0, device=DEVICE), None).double().cpu()
    else:
        oracle.assert_close(res.weight_direction, gw * scale, 1e-6 * max(1.0, scale), 1e-4, "u_W")
    assert res.grad_norm.item() == pytest.approx(norm, rel=2.0**-8 if low else 1e-5, abs=1e-7)
    assert res.loss0.item() == pytest.approx(loss_at(z0, d, y, 0.0), rel=1e-6)
    if norm == 0:
        assert res.step.item() == 0.0 and not bool(res.capped)
        return
    oracle.assert_newton_optimal(res.step, res.capped, z0, d, y, SLOPE_TOL[dtype], what=f"{dtype} {direction}")
    assert res.loss.item() == pytest.approx(loss_at(z0, d, y, res.step), rel=1e-5,
                                            abs=LOSS_ATOL[dtype] * max(1.0, res.loss0.item()))


def test_newton_caps_when_the_loss_falls_for_ever():
    """A batch the head separates: l falls for ever, so t* = max_step, capped, with the oracle's values."""
    noise = head_problem(30, 6, 6, bias=False, seed=4)[0]
    h = (torch.eye(6).repeat(5, 1) + 0.01 * noise).to(DEVICE)
    y = torch.arange(6).repeat(5).to(DEVICE)
    w, b = (torch.eye(6) * 2).to(DEVICE), torch.zeros(6, device=DEVICE)
    res = pof_fast.line_search(h, w, b, y, method="newton", max_step=3.0, backend=BACKEND)
    z0, d, _, _, norm, _ = oracle.line(h, w, b, y, normalized=True)
    assert bool(res.capped) and res.step.item() == 3.0
    assert oracle.line_derivatives(z0, d, y.cpu(), 3.0)[SLOPE] < 0  # still falling at the cap
    assert res.grad_norm.item() == pytest.approx(norm, rel=1e-5)
    assert res.loss0.item() == pytest.approx(loss_at(z0, d, y, 0.0), rel=1e-5)
    assert res.loss.item() == pytest.approx(loss_at(z0, d, y, 3.0), rel=1e-5)


@pytest.mark.parametrize("method", ["newton", "bracket_grid", "grid"])
def test_all_rows_ignored_gives_zero_step(method):
    h, w, b, y = head_problem(16, 4, 3, device=DEVICE)
    res = pof_fast.line_search(h, w, b, torch.full_like(y, -100), method=method, backend=BACKEND)
    assert res.step.item() == 0.0 and res.grad_norm.item() == 0.0 and not bool(res.capped)
    assert torch.isfinite(res.weight_direction).all() and not res.weight_direction.any()
    assert res.loss.item() == res.loss0.item() == 0.0


# ---------------------------------------------------------------- labels outside [0, C)


@pytest.mark.parametrize("label", [6, -1])
def test_bad_label_gives_nan_or_names_target(cuda_ops, label):
    """validate=False: NaN (no device assert, no out-of-range read); validate=True: a ValueError naming target."""
    z0, d, y = line_problem(8, 6, device=DEVICE)
    y[3] = label
    stats = cuda_ops.line_stats(z0, d, y, torch.tensor([0.0, 1.0], device=DEVICE), -100)
    assert torch.isnan(stats).all()
    outcome = SearchOutcome(*cuda_ops.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 8))
    assert torch.isnan(outcome.loss0) and torch.isnan(outcome.loss)
    losses = pof_fast.line_losses(z0, d, y, torch.tensor([0.0, 1.0], device=DEVICE), backend=BACKEND,
                                  validate=False)
    assert torch.isnan(losses).all()
    with pytest.raises(ValueError, match=r"target has labels outside \[0, 6\)"):
        pof_fast.line_losses(z0, d, y, torch.tensor([0.0, 1.0], device=DEVICE), backend=BACKEND)

    h, w, b, y = head_problem(8, 5, 6, device=DEVICE)
    y[3] = label
    residual = cuda_ops.head_gradient(h, w, b, y, -100, True)[1]
    assert torch.isnan(residual[3]).all() and torch.isfinite(residual[[0, 1, 2, 4, 5, 6, 7]]).all()
    res = pof_fast.line_search(h, w, b, y, backend=BACKEND, validate=False)
    for name in ("loss0", "loss", "grad_norm", "weight_direction", "bias_direction"):
        assert torch.isnan(getattr(res, name)).all(), name
    with pytest.raises(ValueError, match=r"target has labels outside \[0, 6\)"):
        pof_fast.line_search(h, w, b, y, backend=BACKEND)


# ---------------------------------------------------------------- no host synchronisation


def test_search_needs_no_host_sync(cuda_ops):
    z0, d, y = line_problem(256, 100, ignore_every=3, device=DEVICE)
    h, w, b, _ = head_problem(256, 64, 100, device=DEVICE)

    def run():
        out = cuda_ops.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 8)
        stats = cuda_ops.line_stats(z0, d, y, torch.zeros(3, device=DEVICE), -100)
        whole = SearchTensors(*cuda_ops.line_search(h, w, b, y, "bracket_grid", True, 1.0, 100.0, 16, -100, 8, 8,
                                                    None))
        public = pof_fast.line_search(h, w, b, y, method="newton", backend=BACKEND, validate=False)
        return out, stats, whole, public

    run()  # warm-up: library handles and workspaces are created outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats, whole, public = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out[0]).item() and torch.isfinite(stats[LOSS]).all().item()
    assert torch.isfinite(whole.step).item() and torch.isfinite(public.step).item()


def test_large_bf16_head_holds_two_16bit_arrays_at_most():
    """Case D's shape, scaled down: the search's peak memory beyond its inputs and the returned direction is two
    bf16 [n, C] arrays (z0 and R, then z0 and d) plus one 8 MiB bf16 chunk of u_W, not fp32 arrays."""
    n, dim, classes = 1024, 1024, 32768
    h, w, b, y = head_problem(n, dim, classes, dtype=torch.bfloat16, seed=7, device=DEVICE)

    def search():
        return pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", backend=BACKEND,
                                    validate=False)

    search()  # warm-up: the cuBLAS workspace and the kernels are in place
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = search()
    torch.cuda.synchronize()
    returned = sum(t.numel() * t.element_size() for t in (result.weight_direction, result.bias_direction))
    extra = torch.cuda.max_memory_allocated() - before - returned
    array = n * classes * 2
    assert extra <= 2 * array + (1 << 23) + (1 << 20), f"peak beyond the direction: {extra / array:.2f} arrays"
    assert result.weight_direction.dtype == torch.float32 and bool(torch.isfinite(result.step))


@pytest.mark.parametrize("row_threads,scorer_warps", [(128, 2), (1024, 4), (512, 8)])
def test_launch_settings_of_the_sweep_give_the_same_search(row_threads, scorer_warps):
    """benchmarks/sweep.py's other launch settings (threads per residual row, rows per scorer block) compute the
    same gradient and search as the shipped ones, against the float64 oracle."""
    shipped = _ext.cuda_launch()
    h, w, b, y = head_problem(256, 64, 1000, bias_scale=1.0, seed=8, device=DEVICE)
    try:
        _ext.set_cuda_launch(row_threads, scorer_warps)
        res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", backend=BACKEND)
    finally:
        _ext.set_cuda_launch(*shipped)
    assert _ext.cuda_launch() == shipped
    z0, d, gw, _, _, _ = oracle.line(h, w, b, y, False)
    oracle.assert_close(res.weight_direction, gw, 1e-6, 1e-4, "u_W")
    oracle.assert_grid_point(res.step, z0, d, y, what=f"bracket_grid, launch {row_threads}, {scorer_warps}")
    with pytest.raises((ValueError, RuntimeError), match="scorer_warps"):
        _ext.set_cuda_launch(256, 3)
