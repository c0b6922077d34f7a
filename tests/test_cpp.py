"""The compiled CPU backend ("cpp", torch.ops.pof_fast.*) against the float64 oracles of tests/oracle.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import oracle
import pof_fast
from pof_fast import _ext, dispatch, reference
from pof_fast._types import CURVATURE, LOSS, SLOPE, SearchOutcome, SearchTensors
from problems import head_problem, line_problem

if not _ext.available() and not os.environ.get("POF_FAST_REQUIRE_EXT"):
    pytest.skip(f"pof_fast._C not built ({_ext.reason()})", allow_module_level=True)

ops = torch.ops.pof_fast
# Sizes crossing the 16-lane vector width and the row blocks: C = 1, 15, 16, 17, ...; C = 16 and 48: rows of a
# multiple of 16 lanes, which the scorer reads in place (fp32, fp64) instead of copying.
SIZES = [(1, 1), (1, 17), (3, 16), (37, 15), (257, 33), (64, 1000), (9, 48)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# |l'(t*)| <= SLOPE_TOL |l'(0)| (+ 1e-7 absolute) for newton: fp32 scoring resolves l' to ~1e-7.
SLOPE_TOL = {torch.float64: 1e-5, torch.float32: 2e-4, torch.bfloat16: 2e-4}
# Absolute error of l(t*) per unit of max(1, l(0)): where l(t*) ~ 0 (a separated batch) only this bounds it.
LOSS_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}


# ---------------------------------------------------------------- line_stats


@pytest.mark.parametrize("n,classes", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_line_stats_matches_oracle(n, classes, dtype):
    z0, d, y = line_problem(n, classes, dtype=dtype, ignore_every=4 if n > 4 else 0)
    steps = torch.tensor([0.0, 0.3, 1.0, 4.0])
    got = ops.line_stats(z0, d, y, steps, -100)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = oracle.line_stats(z0, d, y, steps)  # on the same (rounded) inputs
    oracle.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype], what=f"line_stats {dtype} n={n} C={classes}")


def test_line_stats_many_candidates_and_mixed_dtypes():
    z0, d, y = line_problem(19, 40, dtype=torch.bfloat16, ignore_every=3)
    steps = torch.linspace(0, 8, 37)  # crosses the 16-candidate chunks
    got = ops.line_stats(z0, d.float(), y, steps, -100)
    oracle.assert_close(got, oracle.line_stats(z0, d, y, steps), atol=2e-5, rtol=2e-5, what="line_stats K=37")


@pytest.mark.parametrize("scale", [1e-4, 30.0, 1e3])
def test_line_stats_huge_and_tiny_logits(scale):
    z0, d, y = line_problem(33, 50, scale=scale)
    steps = torch.tensor([0.0, 0.01, 2.0])
    got = ops.line_stats(z0, d * scale, y, steps, -100)
    want = oracle.line_stats(z0, d * scale, y, steps)
    assert torch.isfinite(got).all()
    oracle.assert_close(got, want, atol=1e-5 * max(1.0, scale), rtol=1e-5, what=f"line_stats scale={scale}")


def test_nan_propagates_as_in_torch():
    """Unchecked NaN input (validate=False skips the check) gives NaN, never a finite wrong answer."""
    z0, d, y = line_problem(5, 40)
    z0[2, 7] = float("nan")
    stats = ops.line_stats(z0, d, y, torch.tensor([0.0, 0.5]), -100)
    assert torch.isnan(stats[LOSS]).all()
    h, w, _, y = head_problem(5, 8, 40, bias=False)
    h[1, 3] = float("nan")
    residual = ops.head_gradient(h, w, None, y, -100, True)[1]
    assert torch.isnan(residual[1]).all() and torch.isfinite(residual[0]).all()


def test_line_stats_all_ignored_is_zero():
    z0, d, y = line_problem(5, 7)
    got = ops.line_stats(z0, d, torch.full_like(y, -100), torch.tensor([0.0, 1.0]), -100)
    assert torch.equal(got, torch.zeros(3, 2))


def test_threads_change_nothing_but_the_time():
    """Row blocks run on at::parallel_for (OpenMP) and are added in block order: bitwise the same with 1 or 2
    threads, with enough rows for several blocks; a bad label in the last block is NaN with either."""
    z0, d, y = line_problem(600, 300, ignore_every=7)
    h, w, _, _ = head_problem(600, 24, 300, bias=False, seed=1)
    bad = torch.cat([y[:-1], torch.tensor([300])])
    threads = torch.get_num_threads()
    got = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            stats = ops.line_stats(z0, d, y, torch.linspace(0, 2, 20), -100)
            step = ops.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 7)[0]
            residual = ops.head_gradient(h, w, None, y, -100, True)[1]
            got.append((stats, step, residual))
            assert torch.isnan(ops.line_stats(z0, d, bad, torch.linspace(0, 2, 20), -100)).all(), count
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*got):
        assert torch.equal(one, two)


def test_line_stats_errors_name_the_problem():
    """A bad argument of an op is a RuntimeError naming it: a stable-ABI kernel's exceptions reach Python as
    RuntimeError on every torch (the public API checks first, with ValueError and TypeError: test_validation.py)."""
    z0, d, y = line_problem(4, 6)
    with pytest.raises(RuntimeError, match="direction must have the shape"):
        ops.line_stats(z0, d[:, :5], y, torch.zeros(1), -100)
    with pytest.raises(RuntimeError, match="logits must be a float32"):
        ops.line_stats(z0.long(), d, y, torch.zeros(1), -100)
    with pytest.raises(RuntimeError, match="method must be one of"):
        ops.search(z0, d, y, "golden", 1.0, 100.0, 16, -100, 8, 8)


# ---------------------------------------------------------------- labels outside [0, C)


@pytest.mark.parametrize("label", [6, -1])
def test_bad_label_gives_nan_in_every_op(label):
    """A counted label outside [0, C) (validate=False, no check) is NaN in every output it touches, never
    an out-of-range read or an exception."""
    z0, d, y = line_problem(4, 6)
    y[1] = label
    stats = ops.line_stats(z0, d, y, torch.tensor([0.0, 0.5, 2.0]), -100)
    assert stats.shape == (3, 3) and torch.isnan(stats).all()
    outcome = SearchOutcome(*ops.search(z0, d, y, "bracket_grid", 1.0, 100.0, 16, -100, 8, 8))
    assert torch.isnan(outcome.loss0) and torch.isnan(outcome.loss)

    h, w, b, y = head_problem(4, 5, 6)
    y[1] = label
    logits, residual, gw, gb, norm, _ = ops.head_gradient(h, w, b, y, -100, True)
    oracle.assert_close(logits, F.linear(h, w, b), 1e-6, 1e-6, "logits")  # the forward is label-free
    assert torch.isnan(residual[1]).all() and torch.isfinite(residual[[0, 2, 3]]).all()
    assert torch.isnan(gw).all() and torch.isnan(gb).all() and torch.isnan(norm)


@pytest.mark.parametrize("label", [6, -1])
def test_bad_label_public_api(label):
    """validate=False: NaN results on the cpp backend; validate=True: a ValueError naming ``target``."""
    h, w, b, y = head_problem(8, 5, 6)
    y[3] = label
    res = pof_fast.line_search(h, w, b, y, backend="cpp", validate=False)
    for name in ("loss0", "loss", "grad_norm", "weight_direction", "bias_direction"):
        assert torch.isnan(getattr(res, name)).all(), name
    with pytest.raises(ValueError, match=r"target has labels outside \[0, 6\)"):
        pof_fast.line_search(h, w, b, y, backend="cpp", validate=True)

    z0, d, y = line_problem(8, 6)
    y[3] = label
    losses = pof_fast.line_losses(z0, d, y, torch.tensor([0.0, 1.0]), backend="cpp", validate=False)
    assert losses.shape == (2,) and torch.isnan(losses).all()
    with pytest.raises(ValueError, match=r"target has labels outside \[0, 6\)"):
        pof_fast.line_losses(z0, d, y, torch.tensor([0.0, 1.0]), backend="cpp", validate=True)


# ---------------------------------------------------------------- head gradient and direction


@pytest.mark.parametrize("n,dim,classes", [(1, 3, 1), (37, 19, 33), (200, 64, 300), (5, 300, 200)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("normalized", [True, False])
def test_head_gradient_and_direction_match_oracle(n, dim, classes, bias, normalized):
    h, w, b, y = head_problem(n, dim, classes, bias=bias, bias_scale=1.0, ignore_every=5, seed=n + classes)
    y[-1] = classes - 1  # the last class, at the end of the vector lanes
    logits, residual, gw, gb, norm, scale = ops.head_gradient(h, w, b, y, -100, normalized)
    z0, gw64, gb64, norm64 = oracle.head_gradient(h, w, b, y)
    oracle.assert_close(logits, z0, 1e-4, 1e-4, "logits")
    oracle.assert_close(residual, oracle.residual(z0, y), 1e-7, 1e-4, "residual")
    oracle.assert_close(gw, gw64, 1e-6, 1e-4, "grad_weight")
    assert gb.numel() == (classes if bias else 0)
    if bias:
        oracle.assert_close(gb, gb64, 1e-6, 1e-4, "grad_bias")
    assert abs(norm.item() - norm64) <= 1e-5 * norm64 + 1e-7
    want_scale = (1.0 / norm64 if normalized else 1.0) if norm64 > 0 else 0.0  # C = 1: g = 0
    assert abs(scale.item() - want_scale) <= 1e-5 * want_scale
    d = ops.direction_logits(h, gw, gb if bias else None, scale, residual)
    oracle.assert_close(d, oracle.direction(h, gw64, gb64, want_scale), 1e-5 * max(1.0, want_scale), 1e-4, "direction")


@pytest.mark.parametrize("n,dim,classes", [(16, 640, 100), (16, 2560, 1000)])  # the heads of SPEC cases B, C
def test_grad_norm_of_a_large_head_is_as_accurate_as_eager_torch(n, dim, classes):
    """fp32 ||g|| over C*D entries: error against float64 <= 8x eager torch's (square().sum().sqrt()) or 1e-6."""
    h, w, b, y = head_problem(n, dim, classes, bias_scale=1.0, seed=6)
    norm = ops.head_gradient(h, w, b, y, -100, True)[4].item()
    norm64 = oracle.head_gradient(h, w, b, y)[3]
    eager = reference.head_gradient(h, w, b, y, -100, True).grad_norm.item()
    error, eager_error = abs(norm / norm64 - 1), abs(eager / norm64 - 1)
    assert error <= max(8 * eager_error, 1e-6), f"||g|| relative error {error:.2e}, eager torch {eager_error:.2e}"


def test_head_gradient_zero_when_all_ignored():
    h, w, _, _ = head_problem(4, 3, 5, bias=False)
    _, residual, gw, gb, norm, scale = ops.head_gradient(h, w, torch.zeros(5), torch.full((4,), -100), -100, True)
    assert not residual.any() and not gw.any() and not gb.any()
    assert norm.item() == 0.0 and scale.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_head_residual_huge_and_tiny_logits(dtype, scale):
    """The fused softmax residual on the op's own z0: saturated rows, flat rows, C = 35 across SIMD lanes."""
    h, w, _, y = head_problem(13, 21, 35, bias=False, dtype=torch.float64, spread=21**0.5, seed=11)
    h, w = (h * scale).to(dtype), w.to(dtype)
    y[2] = -100
    logits, residual, _, _, norm, _ = ops.head_gradient(h, w, None, y, -100, True)
    want = oracle.residual(logits, y)  # float64 softmax of the op's own (rounded) logits
    oracle.assert_close(residual, want, 1e-12 if dtype == torch.float64 else 1e-7, 1e-5, "residual")
    assert torch.isfinite(norm)


def test_head_gradient_bf16_features_small_batch():
    """Gram-form shapes (n small next to D and C): R stays fp32."""
    h, w, _, y = head_problem(4, 40, 30, bias=False, dtype=torch.bfloat16, spread=40**0.5 / 7, seed=3)
    logits, residual, gw, _, _, _ = ops.head_gradient(h, w, None, y, -100, True)
    assert logits.dtype == torch.bfloat16 and residual.dtype == gw.dtype == torch.float32
    want = oracle.head_gradient(h, w, None, y)[1]  # float64 from the same bf16 inputs, except z0's bf16 rounding
    oracle.assert_close(gw, want, 2e-3, 2e-2, "grad_weight bf16")
    # on the op's own bf16 logits the float64 gradient is matched to fp32 accumulation
    oracle.assert_close(gw, oracle.line(h, w, None, y, True, rounded_logits=True)[2], 1e-6, 1e-4, "g_W on bf16 z0")


@pytest.mark.parametrize("bias", [False, True])
def test_head_gradient_bf16_features_large_head(bias):
    """Large 16-bit heads store R in bf16 (rounded once from the float64 residual's value); on the CPU g_W is the
    product of the 16-bit R and h accumulated in fp32 and rounded to bf16 once (ATen's CPU products have no 16-bit
    in, fp32 out form), g_b accumulates in fp32."""
    h, w, b, y = head_problem(29, 40, 17, bias=bias, dtype=torch.bfloat16, spread=40**0.5 / 7, seed=3)
    logits, residual, gw, gb, norm, _ = ops.head_gradient(h, w, b, y, -100, True)
    assert logits.dtype == residual.dtype == torch.bfloat16 and gw.dtype == norm.dtype == torch.float32
    exact = oracle.residual(logits, y)  # float64 at the op's own bf16 logits
    oracle.assert_close(residual, exact, 1e-7, 2.0**-8, "R rounded to bf16")
    r64 = residual.double()
    assert torch.equal(gw, gw.bfloat16().float()), "g_W is not bf16-valued"
    oracle.assert_close(gw, r64.t() @ h.double(), 1e-6, 2.0**-8, "g_W from the stored R, rounded once")
    oracle.assert_close(norm, (gw.double().square().sum() + (gb.double().square().sum() if bias else 0.0)).sqrt(),
                        0.0, 1e-6, "||g|| of the g_W and g_b returned")
    if bias:
        assert gb.dtype == torch.float32
        oracle.assert_close(gb, r64.sum(0), 1e-6, 1e-4, "g_b from the stored R")
    oracle.assert_close(gw, oracle.head_gradient(h, w, b, y)[1], 2e-3, 2e-2, "grad_weight bf16")


@pytest.mark.parametrize("bias", [False, True])
def test_line_search_large_bf16_head_searches_the_returned_direction(bias):
    """Large 16-bit heads: u is returned rounded to bf16, d is that u's bf16 direction logits (one rounding
    after fp32 accumulation), and the search scores that stored line."""
    h, w, b, y = head_problem(48, 32, 700, bias=bias, dtype=torch.bfloat16, spread=3.0, seed=5)
    out = SearchTensors(*ops.line_search(h, w, b, y, "bracket_grid", True, 1.0, 100.0, 16, -100, 8, 8, None))
    assert out.weight_direction.dtype == torch.float32
    for u in (out.weight_direction, out.bias_direction):
        assert torch.equal(u, u.bfloat16().float()), "u is not bf16-valued"
    z0, _, gw, gb, norm, _ = oracle.line(h, w, b, y, True, rounded_logits=True)
    # R and u_W are each rounded to bf16 once (relative 2^-9 per element): u_W's error, norm-wise, is of that order.
    error = (out.weight_direction.double() - gw / norm).norm().item()
    assert error <= 2.0**-7, f"||u_W - u_64|| = {error:.3g}"
    # The op's own 16-bit d of that u (scale 1: u is bf16-valued already, so the rounding inside is exact).
    stored = ops.direction_logits(h, out.weight_direction, out.bias_direction if bias else None,
                                  torch.tensor(1.0), None)
    assert stored.dtype == torch.bfloat16
    d = h.double() @ out.weight_direction.double().t() + (out.bias_direction.double() if bias else 0.0)
    oracle.assert_close(stored, d, 1e-6, 2.0**-8 + 1e-4, "bf16 d of u")  # one rounding of the fp32 sum
    assert out.loss0.item() == pytest.approx(oracle.line_loss(z0, stored, y, 0.0), rel=1e-5)
    assert out.loss.item() == pytest.approx(oracle.line_loss(z0, stored, y, float(out.step)), rel=1e-5, abs=1e-6)
    oracle.assert_grid_point(out.step, z0, stored.double(), y, what="bracket_grid on the stored bf16 line")


# ---------------------------------------------------------------- the search op on a given line


@pytest.mark.parametrize("n,classes,seed", [(1, 1, 0), (3, 17, 1), (50, 20, 7), (257, 33, 2), (64, 1000, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_search_op_on_a_given_line_matches_the_oracle(n, classes, seed, dtype):
    """``ops.search`` over stored z0 and d: bracket_grid is the script's pick, grid the argmin of its points,
    newton the minimiser of the float64 line (or t* = 0 where l'(0) >= 0)."""
    z0, d, y = line_problem(n, classes, dtype=dtype, scale=1.0, seed=seed, ignore_every=5 if n > 5 else 0)
    bg = SearchOutcome(*ops.search(z0, d, y, "bracket_grid", 1.0, 100.0, 16, -100, 8, 8))
    assert bg.step.dtype == bg.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bg.capped.dtype == torch.bool and bg.step.dim() == 0
    oracle.assert_grid_point(bg.step, z0, d, y, what="bracket_grid")
    assert bg.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y, 0.0), rel=1e-6, abs=1e-6)
    assert bg.loss.item() == pytest.approx(oracle.line_loss(z0, d, y, float(bg.step)), rel=1e-6, abs=1e-6)

    grid = SearchOutcome(*ops.search(z0, d, y, "grid", 1.0, 20.0, 10, -100, 8, 8))
    points = [20.0 * k / 10 for k in range(1, 11)]
    losses = [oracle.line_loss(z0, d, y, t) for t in points]
    assert any(float(grid.step) == pytest.approx(t, rel=1e-6) for t in points), float(grid.step)
    assert oracle.line_loss(z0, d, y, float(grid.step)) <= min(losses) + 1e-6 * max(1.0, abs(min(losses)))

    newton = SearchOutcome(*ops.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 8))
    oracle.assert_newton_optimal(newton.step, newton.capped, z0, d, y, SLOPE_TOL[dtype], what="newton")
    assert newton.loss.item() == pytest.approx(oracle.line_loss(z0, d, y, float(newton.step)), rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------- the whole line_search


# The last: d formed as h u^T (n > D) into R's spent array, rows of 128 x 16 lanes scored in place.
CASES = [(64, 32, 10, 0), (37, 17, 33, 1), (128, 64, 100, 2), (1, 8, 1, 3), (256, 40, 7, 4), (512, 32, 2048, 6)]


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
@pytest.mark.parametrize("direction", ["raw", "normalized"])
def test_bracket_grid_matches_the_oracle(n, dim, classes, seed, direction):
    """Gradient, direction and the script's grid point, each against the float64 oracle."""
    h, w, b, y = head_problem(n, dim, classes, bias_scale=1.0, seed=seed)
    res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction=direction, backend="cpp")
    z0, d, gw, gb, norm, scale = oracle.line(h, w, b, y, direction == "normalized")
    assert res.grad_norm.item() == pytest.approx(norm, rel=1e-5, abs=1e-7)
    assert res.direction_norm.item() == pytest.approx(norm * scale, rel=1e-5, abs=1e-7)
    oracle.assert_close(res.weight_direction, gw * scale, 1e-6 * max(1.0, scale), 1e-4, "u_W")
    oracle.assert_close(res.bias_direction, gb * scale, 1e-6 * max(1.0, scale), 1e-4, "u_b")
    assert res.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y, 0.0), rel=1e-6)
    if norm == 0:  # one class: no direction, no step
        assert res.step.item() == 0.0 and res.loss.item() == res.loss0.item() and not bool(res.capped)
        return
    oracle.assert_grid_point(res.step, z0, d, y, what=direction)
    assert res.loss.item() == pytest.approx(oracle.line_loss(z0, d, y, res.step.item()), rel=1e-5,
                                            abs=LOSS_ATOL[torch.float32] * max(1.0, res.loss0.item()))
    assert res.evaluations == 1 + 7 + 16


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
def test_grid_and_script_choice(n, dim, classes, seed):
    h, w, b, y = head_problem(n, dim, classes, bias_scale=1.0, seed=seed)
    z0, d, _, _, norm, _ = oracle.line(h, w, b, y, normalized=False)
    res = pof_fast.line_search(h, w, b, y, method="grid", direction="raw", backend="cpp")
    if norm > 0:
        points = [100.0 * k / 16 for k in range(1, 17)]
        losses = [oracle.line_loss(z0, d, y, t) for t in points]
        assert any(res.step.item() == pytest.approx(t, rel=1e-6) for t in points), res.step.item()
        assert oracle.line_loss(z0, d, y, res.step.item()) <= min(losses) + 1e-6 * max(1.0, abs(min(losses)))
    assert res.evaluations == 1 + 16
    # in float64 the reference script's bracket_grid point exactly (up to a float64 near-tie)
    h64, w64, b64 = h.double(), w.double(), b.double()
    bg = pof_fast.line_search(h64, w64, b64, y, method="bracket_grid", direction="raw", backend="cpp")
    z0, d, *_ = oracle.line(h64, w64, b64, y, normalized=False)
    best, losses = oracle.script_search(z0, d, y)
    if norm > 0 and bg.step.item() != pytest.approx(best, rel=1e-12):
        assert min(losses) == pytest.approx(oracle.line_loss(z0, d, y, bg.step.item()), rel=1e-9)


@pytest.mark.parametrize("init,cap", [(1e-3, 1e3), (0.37, 1e3), (1.0, 1.5)])
def test_long_and_short_brackets_match_the_script(init, cap):
    """l(0) shares the first scorer call with the doublings; 1e-3 -> 1e3 needs 21 points, two calls of 16."""
    h, w, b, y = head_problem(64, 12, 9, dtype=torch.float64, bias_scale=1.0, seed=5)
    bg = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", init_step=init, max_step=cap,
                              backend="cpp")
    z0, d, *_ = oracle.line(h, w, b, y, normalized=False)
    best, losses = oracle.script_search(z0, d, y, init=init, cap=cap)
    assert bg.step.item() == pytest.approx(best, rel=1e-12)
    assert bg.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y, 0.0), rel=1e-12)
    assert bg.loss.item() == pytest.approx(min(losses), rel=1e-12)


@pytest.mark.parametrize("n,dim,classes,seed", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_newton_optimality(n, dim, classes, seed, dtype):
    """t* minimises the float64 line along the oracle's direction (for bf16: the float64 line of the op's
    own bf16 logits and of its bf16 direction logits of the returned, bf16-valued u: what it searched)."""
    h, w, b, y = head_problem(n, dim, classes, dtype=dtype, bias_scale=1.0, seed=seed)
    res = pof_fast.line_search(h, w, b, y, method="newton", backend="cpp")
    low = dtype == torch.bfloat16
    z0, d, gw, _, norm, scale = oracle.line(h, w, b, y, normalized=True, rounded_logits=low)
    if low:  # R and u rounded to bf16 once each: u_W's error is of that order, norm-wise
        assert torch.equal(res.weight_direction, res.weight_direction.bfloat16().float())
        assert (res.weight_direction.double() - gw * scale).norm().item() <= 2.0**-7
        d = ops.direction_logits(h, res.weight_direction, res.bias_direction, torch.tensor(1.0), None).double()
    else:
        oracle.assert_close(res.weight_direction, gw * scale, 1e-6, 1e-4, "u_W")
    assert res.grad_norm.item() == pytest.approx(norm, rel=2.0**-8 if low else 1e-5, abs=1e-7)
    assert res.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y, 0.0), rel=1e-6)
    if norm == 0:
        assert res.step.item() == 0.0 and not bool(res.capped)
        return
    oracle.assert_newton_optimal(res.step, res.capped, z0, d, y, SLOPE_TOL[dtype], what=str(dtype))
    assert res.loss.item() == pytest.approx(oracle.line_loss(z0, d, y, res.step.item()), rel=1e-5,
                                            abs=LOSS_ATOL[dtype] * max(1.0, res.loss0.item()))


def test_separable_batch_is_capped_and_zero_gradient_gives_zero_step():
    h = torch.eye(4).repeat(8, 1)
    y = torch.arange(4).repeat(8)
    w = torch.eye(4) * 3
    res = pof_fast.line_search(h, w, None, y, method="newton", max_step=2.0, backend="cpp")
    assert bool(res.capped) and res.step.item() == 2.0 and res.loss.item() < res.loss0.item()
    res = pof_fast.line_search(h, w, None, torch.full_like(y, -100), method="bracket_grid", backend="cpp")
    assert res.grad_norm.item() == 0.0 and torch.isfinite(res.weight_direction).all()
    assert res.step.item() == 0.0 and res.loss0.item() == res.loss.item() == 0.0


@pytest.mark.parametrize("classes", [4, 40, 48])  # narrow rows; wide rows copied and read in place
def test_capped_flag_of_the_grids_reads_the_slope_of_the_last_point(classes):
    """The grids' scorer forms the slope of each call's last candidate only, which the capped flag reads: capped when
    the loss still falls at the grid's last point, not when the minimum lies just before it."""
    h = torch.eye(classes).repeat(4, 1)
    y = torch.arange(classes).repeat(4)
    for method in ("bracket_grid", "grid"):  # a separable batch: l falls for ever
        res = pof_fast.line_search(h, torch.eye(classes) * 3, None, y, method=method, max_step=2.0, backend="cpp")
        assert bool(res.capped) and res.step.item() == 2.0, method
    h, w, b, y = head_problem(64, 12, classes, bias_scale=1.0, seed=classes)
    exact = pof_fast.line_search(h.double(), w.double(), b.double(), y, method="newton", backend="cpp")
    cap = exact.step.item() / 0.98  # the last grid point 2% past the minimum, the one before 4.4% short of it
    res = pof_fast.line_search(h, w, b, y, method="grid", max_step=cap, backend="cpp")
    assert res.step.item() == pytest.approx(cap, rel=1e-6) and not bool(res.capped)


def test_capped_newton_reports_the_cap():
    """A batch the head separates: l falls for ever, so t* = max_step, capped, and every reported value is the
    float64 oracle's at the cap."""
    h, _, _, _ = head_problem(30, 6, 6, bias=False, seed=4)
    h = torch.eye(6).repeat(5, 1) + 0.01 * h
    y = torch.arange(6).repeat(5)
    w, b = torch.eye(6) * 2, torch.zeros(6)
    got = pof_fast.line_search(h, w, b, y, method="newton", max_step=3.0, backend="cpp")
    z0, d, _, _, norm, _ = oracle.line(h, w, b, y, normalized=True)
    assert bool(got.capped) and got.step.item() == 3.0
    assert oracle.line_derivatives(z0, d, y, 3.0)[SLOPE] < 0  # still falling at the cap
    assert got.grad_norm.item() == pytest.approx(norm, rel=1e-5)
    assert got.loss0.item() == pytest.approx(oracle.line_loss(z0, d, y, 0.0), rel=1e-5)
    assert got.loss.item() == pytest.approx(oracle.line_loss(z0, d, y, 3.0), rel=1e-5)


# ---------------------------------------------------------------- integration


def test_torch_compile_traces_the_ops():
    def score(z0, d, y, steps):
        return ops.line_stats(z0, d, y, steps, -100)[LOSS] * 2.0

    def search(z0, d, y):
        step, loss0, loss, capped = ops.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 8)
        return step * 2.0, loss0 - loss

    def whole(h, w, b, y):
        out = ops.line_search(h, w, b, y, "bracket_grid", True, 1.0, 100.0, 16, -100, 8, 8, None)
        return out[0] * 2.0, out[1].sum()

    z0, d, y = line_problem(9, 12)
    steps = torch.tensor([0.0, 0.5])
    compiled = torch.compile(score, backend="aot_eager", fullgraph=True)
    oracle.assert_close(compiled(z0, d, y, steps), score(z0, d, y, steps), 0, 0, "compiled line_stats")
    compiled_search = torch.compile(search, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled_search(z0, d, y), search(z0, d, y)):
        oracle.assert_close(got, want, 0, 0, "compiled search")
    h, w, b, y = head_problem(9, 5, 12)
    compiled_whole = torch.compile(whole, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled_whole(h, w, b, y), whole(h, w, b, y)):
        oracle.assert_close(got, want, 0, 0, "compiled line_search")


def test_cpp_backend_methods_wrap_the_ops():
    """CppBackend's ops return the pof_fast._types containers, on the oracle's values."""
    cpp = dispatch.load("cpp")
    assert cpp.name == "cpp" and cpp.handles(torch.device("cpu")) and not cpp.handles(torch.device("meta"))
    z0, d, y = line_problem(10, 7, ignore_every=4)
    steps = torch.tensor([0.0, 1.0])
    stats = cpp.line_stats(z0, d, y, steps, -100)
    oracle.assert_close(stats[[LOSS, SLOPE, CURVATURE]], oracle.line_stats(z0, d, y, steps), 2e-5, 2e-5, "line_stats")
    h, w, _, y = head_problem(10, 4, 7, ignore_every=4)
    grad = cpp.head_gradient(h, w, None, y, -100, False)
    assert grad.grad_bias is None and grad.scale.item() == 1.0
    oracle.assert_close(grad.grad_weight, oracle.head_gradient(h, w, None, y)[1], 1e-6, 1e-4, "g_W")


def test_backends_report_the_compiled_ops(monkeypatch):
    monkeypatch.setitem(dispatch.PREFERENCE, "cpu", ("cpp", "torch"))  # Triton too when TRITON_INTERPRET=1
    status = pof_fast.backends()
    assert status["cpp"] is True
    assert _ext.compiled_ops() in ("CPU", "CPU+CUDA")
    assert dispatch.resolve("auto", torch.device("cpu")).name == "cpp"


@pytest.mark.skipif(_ext.cuda_compiled(), reason="this build has the CUDA kernels: tests/test_cuda.py sets them")
def test_cuda_launch_settings_need_the_cuda_build():
    for call in (_ext.cuda_launch, lambda: _ext.set_cuda_launch(256, 8)):
        with pytest.raises(RuntimeError, match="without CUDA"):
            call()

