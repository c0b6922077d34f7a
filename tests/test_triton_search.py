"""The Triton backend's line search (stored-logits and logits-free) against the float64 oracles.

Marked ``triton``: small sizes under Triton's CPU interpreter in a child process without CUDA (see
``triton_env``); realistic SPEC section 5 sizes (cases A-C and a reduced case D) run only on CUDA.
The backend's ``line_search`` is its registered op and returns ``SearchTensors``; which kernel path ran
is observed by counting calls of the two scorers (``path`` fixture).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import oracle
import pof_fast
from problems import IGNORE_INDEX, head_problem
from triton_env import DEVICE

pytestmark = pytest.mark.triton
# A fallback to 'torch' warns "pof_fast: backend 'triton' unavailable (...)", and would make a test vacuous.
NO_FALLBACK = pytest.mark.filterwarnings("error:pof_fast. backend:RuntimeWarning")


def head(n, D, C, bias=True, dtype=torch.float32, ignore_every=5, spread=1.0, seed=2, device=DEVICE):
    return head_problem(n, D, C, bias=bias, dtype=dtype, spread=spread, ignore_every=ignore_every, ignore_from=3,
                        seed=seed, device=device)


def plan(method, normalized, **kw):
    from pof_fast._types import SearchPlan

    return SearchPlan(method=method, normalized=normalized, **kw)


@pytest.fixture
def path(triton_kernels, monkeypatch):
    """Counts the scorer calls of each path: ``"stored"`` (z0 and d in memory) and ``"logits_free"``."""
    calls = Counter()

    def spy(module, name, key):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    spy(triton_kernels.line_stats, "line_stats", "stored")
    spy(triton_kernels.logits_free, "line_stats_logits_free", "logits_free")
    return calls


def assert_path(calls, logits_free):
    ran, other = ("logits_free", "stored") if logits_free else ("stored", "logits_free")
    assert calls[ran] > 0 and calls[other] == 0, f"expected the {ran} path, scorer calls: {dict(calls)}"


def oracle_line(h, w, b, y, normalized):
    """float64 z0, d along u (raw or normalized), g_W, g_b and ||g||."""
    z0, g_w, g_b, norm = oracle.head_gradient(h.cpu(), w.cpu(), None if b is None else b.cpu(), y.cpu())
    scale = (1.0 / norm if normalized else 1.0) if norm > 0 else 0.0
    return z0, oracle.direction(h.cpu(), g_w, g_b, scale), g_w * scale, (None if g_b is None else g_b * scale), norm


def assert_best_point(step, grid, z0, d, y, what=""):
    """``step`` is the grid point of least oracle loss, or its loss ties that one within float32 noise."""
    losses = [oracle.line_loss(z0, d, y.cpu(), t) for t in grid]
    best = min(range(len(grid)), key=lambda k: losses[k])
    got = float(step)
    if got != grid[best]:
        got_loss = oracle.line_loss(z0, d, y.cpu(), got)
        assert abs(got_loss - losses[best]) <= 1e-6 * max(1.0, abs(losses[best])), (
            f"{what}: picked t={got} (loss {got_loss}), best grid point {grid[best]} (loss {losses[best]})")


def assert_grid_point(step, z0, d, y, partitions=16, what=""):
    """``step`` is the reference script's grid point (or ties its loss)."""
    want, losses = oracle.script_search(z0, d, y.cpu(), partitions=partitions)
    grid_end = want * partitions / (losses.index(min(losses)) + 1)
    grid = torch.linspace(0, grid_end, partitions + 1, dtype=torch.float64)[1:].tolist()
    assert_best_point(step, grid, z0, d, y, what)


def assert_newton_optimal(out, z0, d, y, max_step=100.0, what=""):
    t = float(out.step)
    _, slope0, _ = oracle.line_derivatives(z0, d, y.cpu(), 0.0)
    _, slope, _ = oracle.line_derivatives(z0, d, y.cpu(), t)
    if bool(out.capped):
        assert t == max_step and slope < 0, f"{what}: capped at t={t} with l'={slope}"
    else:
        assert 0.0 <= t < max_step, what
        assert abs(slope) <= 1e-5 * abs(slope0), f"{what}: |l'({t})| = {abs(slope)} > 1e-5 |l'(0)| = {abs(slope0)}"


CASES = [(37, 19, 53, True), (5, 40, 3, False), (33, 70, 17, True)]


@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("n,D,C,bias", CASES)
def test_bracket_grid_picks_the_scripts_grid_point(triton_backend, path, n, D, C, bias, logits_free):
    h, w, b, y = head(n, D, C, bias, spread=3.0)
    out = triton_backend.line_search(h, w, b, y, plan("bracket_grid", False, logits_free=logits_free))
    assert_path(path, logits_free)
    z0, d, u_w, u_b, norm = oracle_line(h, w, b, y, normalized=False)
    assert_grid_point(out.step, z0, d, y, what=f"logits_free={logits_free}")
    oracle.assert_close(out.weight_direction, u_w, 1e-6, 1e-5, "u_W = g_W (raw)")
    if bias:
        oracle.assert_close(out.bias_direction, u_b, 1e-6, 1e-5, "u_b = g_b (raw)")
    else:
        assert out.bias_direction.shape == (0,)
    oracle.assert_close(out.grad_norm, torch.tensor(norm), 1e-6, 1e-5, "||g||")
    oracle.assert_close(out.loss0, torch.tensor(oracle.line_loss(z0, d, y.cpu(), 0.0)), 1e-5, 1e-5, "loss0")
    oracle.assert_close(out.loss, torch.tensor(oracle.line_loss(z0, d, y.cpu(), float(out.step))), 1e-5, 1e-5,
                        "loss(t*)")


@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("n,D,C,bias", CASES)
def test_newton_is_optimal(triton_backend, path, n, D, C, bias, normalized, logits_free):
    h, w, b, y = head(n, D, C, bias, spread=3.0)
    out = triton_backend.line_search(h, w, b, y, plan("newton", normalized, logits_free=logits_free))
    assert_path(path, logits_free)
    z0, d, u_w, _, norm = oracle_line(h, w, b, y, normalized)
    assert_newton_optimal(out, z0, d, y, what=f"normalized={normalized} logits_free={logits_free}")
    oracle.assert_close(out.weight_direction, u_w, 1e-6, 1e-5, "u_W")
    oracle.assert_close(out.direction_norm, torch.tensor(1.0 if normalized else norm), 1e-6, 1e-5, "||u||")
    assert out.step.device.type == DEVICE.type and out.step.dim() == 0


@pytest.mark.parametrize("logits_free", [False, True])
def test_newton_caps_when_the_loss_falls_for_ever(triton_backend, path, logits_free):
    """Copies of one row: along -g the target logit gains on every other, so l falls for ever and
    t* = max_step, capped."""
    h, w, b, _ = head(1, 8, 4)
    h, y = h.expand(6, 8), torch.full((6,), 2, device=DEVICE)
    out = triton_backend.line_search(h, w, b, y, plan("newton", True, max_step=5.0, logits_free=logits_free))
    assert_path(path, logits_free)
    z0, d, _, _, _ = oracle_line(h, w, b, y, True)
    assert bool(out.capped) and float(out.step) == 5.0
    assert_newton_optimal(out, z0, d, y, max_step=5.0, what="falls for ever")


def test_grid_picks_the_best_of_its_points(triton_backend):
    h, w, b, y = head(29, 11, 13, spread=3.0)
    out = triton_backend.line_search(h, w, b, y, plan("grid", True, max_step=20.0, partitions=9))
    z0, d, _, _, _ = oracle_line(h, w, b, y, True)
    grid = torch.linspace(0, 20.0, 10, dtype=torch.float64)[1:].tolist()
    assert_best_point(out.step, grid, z0, d, y, "grid of 9 on (0, 20]")


@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("method", ["newton", "bracket_grid"])
def test_all_rows_ignored_gives_zero_step(triton_backend, method, logits_free):
    h, w, b, y = head(7, 5, 6)
    y.fill_(IGNORE_INDEX)
    out = triton_backend.line_search(h, w, b, y, plan(method, True, logits_free=logits_free))
    assert float(out.grad_norm) == 0.0 and float(out.direction_norm) == 0.0
    assert torch.isfinite(out.weight_direction).all() and not out.weight_direction.any()
    assert float(out.step) == 0.0 and not bool(out.capped)
    assert float(out.loss0) == 0.0 and float(out.loss) == 0.0


@NO_FALLBACK
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inside the interpreter
@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("bad", [13, -5], ids=["C", "-5"])
def test_out_of_range_label_gives_nan_not_a_crash(triton_backend, path, bad, logits_free):
    """validate=False: a counted label outside [0, C) makes l(0), l(t*), ||g|| and u NaN (as the
    reference does), without reading outside z0 or the head."""
    h, w, b, y = head(19, 7, 13)
    y[5] = bad
    res = pof_fast.line_search(h, w, b, y, backend="triton", validate=False, logits_free=logits_free)
    assert_path(path, logits_free)
    for name in ("loss0", "loss", "grad_norm"):
        assert torch.isnan(getattr(res, name)), (name, getattr(res, name))
    assert torch.isnan(res.weight_direction).all() and torch.isnan(res.bias_direction).all()


def test_line_search_switches_to_logits_free_above_threshold(triton_backend, path, monkeypatch):
    from pof_fast.backends import triton as backend_triton

    h, w, b, y = head(9, 6, 5)
    z0, d, _, _, _ = oracle_line(h, w, b, y, True)
    grid = torch.linspace(0, 100.0, 17, dtype=torch.float64)[1:].tolist()
    monkeypatch.setattr(backend_triton, "LOGITS_FREE_ELEMENTS", 9 * 5 - 1)
    out = triton_backend.line_search(h, w, b, y, plan("grid", True))
    assert_path(path, logits_free=True)
    assert_best_point(out.step, grid, z0, d, y, "n C above the threshold")
    path.clear()
    monkeypatch.setattr(backend_triton, "LOGITS_FREE_ELEMENTS", 9 * 5)
    out = triton_backend.line_search(h, w, b, y, plan("grid", True))
    assert_path(path, logits_free=False)
    assert_best_point(out.step, grid, z0, d, y, "n C at the threshold")


def test_logits_free_gradient_in_row_chunks(triton_backend, path, monkeypatch):
    """Chunks of R smaller than the batch (odd chunk size, 5 rows of 7 classes) give the whole batch's gradient."""
    from pof_fast.backends import triton as backend_triton

    h, w, b, y = head(23, 9, 7, ignore_every=4)
    monkeypatch.setattr(backend_triton, "RESIDUAL_CHUNK_ELEMENTS", 7 * 5)
    out = triton_backend.line_search(h, w, b, y, plan("grid", False, logits_free=True))
    assert_path(path, logits_free=True)
    _, g_w, g_b, norm = oracle.head_gradient(h.cpu(), w.cpu(), b.cpu(), y.cpu())
    oracle.assert_close(out.weight_direction, g_w, 1e-6, 1e-5, "chunked g_W")
    oracle.assert_close(out.bias_direction, g_b, 1e-6, 1e-5, "chunked g_b")
    oracle.assert_close(out.grad_norm, torch.tensor(norm), 1e-6, 1e-5, "chunked ||g||")


@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(triton_backend, path, dtype, logits_free):
    """The head forward rounds z0 to the input dtype (as eager torch does), so g is that of the
    rounded logits: close to the exact g at the dtype's precision. The search along the returned
    direction is then exact: the stored path scores the rounded z0, the logits-free one an fp32 z0."""
    h, w, b, y = head(26, 20, 11, dtype=dtype, spread=3.0)
    out = triton_backend.line_search(h, w, b, y, plan("newton", True, logits_free=logits_free))
    assert_path(path, logits_free)
    z0_exact, g_w, _, norm = oracle.head_gradient(h.cpu(), w.cpu(), b.cpu(), y.cpu())
    oracle.assert_close(out.weight_direction, g_w / norm, 1e-3, 3e-2, f"{dtype} u_W")
    oracle.assert_close(out.grad_norm, torch.tensor(norm), 0.0, 1e-2, f"{dtype} ||g||")
    z0 = z0_exact if logits_free else F.linear(h, w, b).cpu().double()
    d = oracle.direction(h.cpu(), out.weight_direction.cpu().double(), out.bias_direction.cpu().double(), 1.0)
    assert not bool(out.capped)
    assert_newton_optimal(out, z0, d, y, what=f"{dtype} logits_free={logits_free}")


def test_float64_inputs_use_the_reference(triton_backend, path):
    h, w, b, y = head(10, 4, 3, dtype=torch.float64)
    out = triton_backend.line_search(h, w, b, y, plan("newton", True))
    assert not path, f"float64 must not reach the fp32 kernels: {dict(path)}"
    assert out.weight_direction.dtype == torch.float64
    z0, d, u_w, _, _ = oracle_line(h, w, b, y, True)
    oracle.assert_close(out.weight_direction, u_w, 1e-12, 1e-10, "float64 u_W")
    assert_newton_optimal(out, z0, d, y, what="float64")


@NO_FALLBACK
def test_public_line_search_runs_the_triton_backend(triton_backend, path):
    from pof_fast import dispatch

    h, w, b, y = head(21, 9, 8, spread=3.0)
    assert dispatch.resolve("triton", DEVICE) is triton_backend
    res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", backend="triton")
    assert_path(path, logits_free=False)
    z0, d, _, _, norm = oracle_line(h, w, b, y, False)
    assert_grid_point(res.step, z0, d, y, what="public API")
    oracle.assert_close(res.loss0, torch.tensor(oracle.line_loss(z0, d, y.cpu(), 0.0)), 1e-5, 1e-5, "loss0")
    oracle.assert_close(res.direction_norm, torch.tensor(norm), 1e-6, 1e-5, "||u|| raw")


@NO_FALLBACK
@pytest.mark.parametrize("logits_free", [False, True])
def test_public_line_search_forces_the_path(triton_backend, path, logits_free):
    h, w, b, y = head(19, 11, 6, ignore_every=2)
    res = pof_fast.line_search(h, w, b, y, backend="triton", logits_free=logits_free)
    assert_path(path, logits_free)
    z0, d, u_w, _, _ = oracle_line(h, w, b, y, True)
    oracle.assert_close(res.weight_direction, u_w, 1e-6, 1e-5, "u_W")
    assert_newton_optimal(res, z0, d, y, what=f"public logits_free={logits_free}")


def test_public_line_search_rejects_a_non_bool_logits_free(triton_backend):
    h, w, b, y = head(4, 3, 2)
    with pytest.raises(TypeError, match="logits_free"):
        pof_fast.line_search(h, w, b, y, backend="triton", logits_free="yes")


def rounded_logits_gradient(h, w, b, y):
    """(z0, g_W, g_b, ||g||) in float64 at the head's own logits F.linear(h, w, b), rounded to its dtype."""
    z0 = F.linear(h, w, b).double().requires_grad_(True)
    residual, = torch.autograd.grad(F.cross_entropy(z0, y, ignore_index=IGNORE_INDEX), z0)
    g_w = residual.t() @ h.double()
    g_b = residual.sum(0) if b is not None else None
    norm = (g_w.square().sum() + (g_b.square().sum() if g_b is not None else 0.0)).sqrt().item()
    return z0.detach(), g_w, g_b, norm


# SPEC section 5 cases A-C and a reduced case D: (n, D, C, dtype).
REALISTIC = {
    "A": (256, 640, 10, torch.float32),
    "B": (256, 640, 100, torch.float32),
    "C": (256, 2560, 1000, torch.float32),
    "C-bf16": (256, 2560, 1000, torch.bfloat16),
    "D-reduced": (512, 1024, 32000, torch.bfloat16),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(REALISTIC))
def test_cuda_realistic_sizes_match_oracle(triton_kernels, triton_backend, path, case):
    n, D, C, dtype = REALISTIC[case]
    cuda = torch.device("cuda")
    h, w, b, y = head(n, D, C, dtype=dtype, spread=4.0, ignore_every=17, device=cuda)
    logits_free = case.startswith("D")
    out = triton_backend.line_search(h, w, b, y, plan("newton", True, logits_free=logits_free))
    assert_path(path, logits_free)
    z0_w, g_w, g_b, norm = oracle.head_gradient(h, w, b, y)
    if dtype == torch.float32:
        oracle.assert_close(out.grad_norm, torch.tensor(norm), 0.0, 1e-4, f"{case} ||g||")
        oracle.assert_close(out.weight_direction, g_w / norm, 1e-6 / norm, 1e-3, f"{case} u_W")
    else:
        # 16-bit heads: the gradient is taken at the logits the head itself produces (rounded to its
        # dtype, as the reference and the script do), and the logits-free path searches along g_W
        # rounded to that dtype (relative error 2**-9).
        _, g_w, g_b, norm = rounded_logits_gradient(h, w, b, y)
        oracle.assert_close(out.grad_norm, torch.tensor(norm), 0.0, 2e-3, f"{case} ||g||")
        u_w = g_w / norm
        oracle.assert_close(out.weight_direction, u_w, 5e-3 * float(u_w.abs().max()), 5e-3, f"{case} u_W")
    # The line actually searched: u as returned (checked just above); the logits-free kernel reads u_W
    # rounded to the input dtype, so the oracle does too.
    u_w = out.weight_direction.double()
    if logits_free and dtype != torch.float32:
        u_w = out.weight_direction.to(dtype).double()
    u_b = out.bias_direction.double()
    z0 = F.linear(h, w, b).double() if not logits_free else z0_w
    d = oracle.direction(h, u_w, u_b, 1.0)
    _, slope0, _ = oracle.line_derivatives(z0, d, y, 0.0)
    _, slope, _ = oracle.line_derivatives(z0, d, y, float(out.step))
    # 1e-4, not the 1e-5 of the small tests: at these sizes the returned fp32 u and the direction the
    # search used inside the kernels differ by fp32 rounding over 256- to 2560-term products.
    assert bool(out.capped) or abs(slope) <= 1e-4 * abs(slope0), (case, float(out.step), slope, slope0)
    steps = torch.tensor([0.0, 0.5, 2.0, float(out.step)], device=cuda)
    one = torch.tensor(1.0, device=cuda)
    if logits_free:
        got = triton_kernels.logits_free.line_stats_logits_free(
            h, w, b, out.weight_direction, out.bias_direction, one, y, steps, IGNORE_INDEX)
    else:
        got = triton_kernels.line_stats.line_stats(F.linear(h, w, b), d.float(), y, steps, IGNORE_INDEX)
    want = torch.tensor([oracle.line_derivatives(z0, d, y, t) for t in steps.tolist()], dtype=torch.float64).t()
    oracle.assert_close(got, want, 1e-4, 1e-4, f"{case} l, l', l''")
