"""The Triton backend's line search (stored-logits and logits-free) against the float64 oracles.

Small sizes under Triton's CPU interpreter (see ``triton_env``); realistic SPEC section 5 sizes
(cases A-C and a reduced case D) run only on CUDA.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import oracle
import pof_fast
from triton_env import DEVICE, triton_backend, triton_kernels  # noqa: F401  (fixtures)

pytestmark = pytest.mark.triton


def head_problem(n, D, C, bias=True, dtype=torch.float32, ignored=5, spread=1.0, seed=2, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=gen)
    w = torch.randn(C, D, generator=gen) * (spread / D ** 0.5)
    b = torch.randn(C, generator=gen) * 0.1 if bias else None
    y = torch.randint(0, C, (n,), generator=gen)
    if ignored:
        y[3::ignored] = -100
    h, w = h.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
    return h, w, (None if b is None else b.to(device=device, dtype=dtype)), y.to(device)


def plan(method, normalized, **kw):
    from pof_fast.drivers import SearchPlan

    return SearchPlan(method=method, normalized=normalized, **kw)


def oracle_line(h, w, b, y, normalized):
    """float64 z0, d along u (raw or normalized), and ||g||."""
    z0, g_w, g_b, norm = oracle.head_gradient(h.cpu(), w.cpu(), None if b is None else b.cpu(), y.cpu())
    scale = (1.0 / norm if normalized else 1.0) if norm > 0 else 0.0
    return z0, oracle.direction(h.cpu(), g_w, g_b, scale), norm


def assert_grid_point(step, z0, d, y, partitions=16, what=""):
    """``step`` is the script's grid point, or its loss ties the script's within float32 noise."""
    want, losses = oracle.script_search(z0, d, y.cpu(), partitions=partitions)
    got = float(step)
    if got != want:
        grid_end = want * partitions / (losses.index(min(losses)) + 1)
        got_loss = oracle.line_loss(z0, d, y.cpu(), got)
        assert abs(got_loss - min(losses)) <= 1e-6 * max(1.0, abs(min(losses))), (
            f"{what}: picked t={got} (loss {got_loss}), script picked {want} (loss {min(losses)}), "
            f"grid end {grid_end}"
        )


def assert_newton_optimal(outcome, z0, d, y, max_step=100.0, what=""):
    t = float(outcome.step)
    _, slope0, _ = oracle.line_derivatives(z0, d, y.cpu(), 0.0)
    _, slope, _ = oracle.line_derivatives(z0, d, y.cpu(), t)
    if bool(outcome.capped):
        assert t == max_step and slope < 0, f"{what}: capped at t={t} with l'={slope}"
    else:
        assert 0.0 <= t < max_step, what
        assert abs(slope) <= 1e-5 * abs(slope0), f"{what}: |l'({t})| = {abs(slope)} > 1e-5 |l'(0)| = {abs(slope0)}"


CASES = [(37, 19, 53, True), (5, 40, 3, False), (33, 70, 17, True)]


@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("n,D,C,bias", CASES)
def test_bracket_grid_picks_the_scripts_grid_point(triton_backend, n, D, C, bias, logits_free):
    h, w, b, y = head_problem(n, D, C, bias, spread=3.0)
    grad, outcome = triton_backend.line_search(h, w, b, y, plan("bracket_grid", False, logits_free=logits_free))
    z0, d, _ = oracle_line(h, w, b, y, normalized=False)
    assert_grid_point(outcome.step, z0, d, y, what=f"logits_free={logits_free}")
    assert outcome.evaluations == 1 + 7 + 16
    oracle.assert_close(outcome.loss0, torch.tensor(oracle.line_loss(z0, d, y.cpu(), 0.0)), 1e-5, 1e-5, "loss0")
    oracle.assert_close(outcome.loss, torch.tensor(oracle.line_loss(z0, d, y.cpu(), float(outcome.step))),
                        1e-5, 1e-5, "loss(t*)")


@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("n,D,C,bias", CASES)
def test_newton_is_optimal(triton_backend, n, D, C, bias, normalized, logits_free):
    h, w, b, y = head_problem(n, D, C, bias, spread=3.0)
    grad, outcome = triton_backend.line_search(h, w, b, y, plan("newton", normalized, logits_free=logits_free))
    z0, d, _ = oracle_line(h, w, b, y, normalized)
    assert_newton_optimal(outcome, z0, d, y, what=f"normalized={normalized} logits_free={logits_free}")
    assert outcome.step.device.type == DEVICE.type and outcome.step.dim() == 0


def test_newton_caps_when_the_loss_falls_for_ever(triton_backend):
    """Copies of one row: along -g the target logit gains on every other, so l falls for ever and
    t* = max_step, capped."""
    h, w, b, _ = head_problem(1, 8, 4)
    h, y = h.expand(6, 8), torch.full((6,), 2, device=DEVICE)
    for logits_free in (False, True):
        _, outcome = triton_backend.line_search(h, w, b, y, plan("newton", True, max_step=5.0, logits_free=logits_free))
        z0, d, _ = oracle_line(h, w, b, y, True)
        assert bool(outcome.capped) and float(outcome.step) == 5.0
        assert_newton_optimal(outcome, z0, d, y, max_step=5.0, what="falls for ever")


def test_grid_matches_torch_backend(triton_backend):
    from pof_fast.dispatch import TorchBackend

    h, w, b, y = head_problem(29, 11, 13, spread=3.0)
    p = plan("grid", True, max_step=20.0, partitions=9)
    _, got = triton_backend.line_search(h, w, b, y, p)
    _, want = TorchBackend().line_search(h.double(), w.double(), b.double(), y, p)
    assert float(got.step) == float(want.step)
    assert got.evaluations == want.evaluations == 10


@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("method", ["newton", "bracket_grid"])
def test_all_rows_ignored_gives_zero_step(triton_backend, method, logits_free):
    h, w, b, y = head_problem(7, 5, 6)
    y.fill_(-100)
    grad, outcome = triton_backend.line_search(h, w, b, y, plan(method, True, logits_free=logits_free))
    assert float(grad.grad_norm) == 0.0 and float(grad.scale) == 0.0
    assert torch.isfinite(grad.grad_weight).all() and not grad.grad_weight.any()
    assert torch.isfinite(outcome.loss) and float(outcome.loss0) == 0.0
    if method == "newton":
        assert float(outcome.step) == 0.0


def test_logits_free_matches_stored_logits(triton_backend):
    h, w, b, y = head_problem(45, 33, 70, spread=3.0)
    p = plan("newton", True)
    stored_grad, stored = triton_backend.line_search(h, w, b, y, replace(p, logits_free=False))
    free_grad, free = triton_backend.line_search(h, w, b, y, replace(p, logits_free=True))
    assert stored_grad.logits is not None and free_grad.logits is None and free_grad.residual is None
    oracle.assert_close(free_grad.grad_weight, stored_grad.grad_weight, 1e-7, 1e-5, "g_W")
    oracle.assert_close(free_grad.grad_bias, stored_grad.grad_bias, 1e-7, 1e-5, "g_b")
    oracle.assert_close(free_grad.grad_norm, stored_grad.grad_norm, 0.0, 1e-5, "||g||")
    oracle.assert_close(free.step, stored.step, 0.0, 1e-4, "t*")
    oracle.assert_close(free.loss, stored.loss, 1e-6, 1e-5, "l(t*)")


def test_line_search_switches_to_logits_free_above_threshold(triton_backend, monkeypatch):
    from pof_fast import backend_triton

    h, w, b, y = head_problem(9, 6, 5)
    monkeypatch.setattr(backend_triton, "LOGITS_FREE_ELEMENTS", 9 * 5 - 1)
    grad, _ = triton_backend.line_search(h, w, b, y, plan("grid", True))
    assert grad.logits is None
    monkeypatch.setattr(backend_triton, "LOGITS_FREE_ELEMENTS", 9 * 5)
    grad, _ = triton_backend.line_search(h, w, b, y, plan("grid", True))
    assert grad.logits is not None


def test_logits_free_gradient_in_row_chunks(triton_backend, monkeypatch):
    """Chunks of R smaller than the batch (odd chunk size) give the whole batch's gradient."""
    from pof_fast import backend_triton

    h, w, b, y = head_problem(23, 9, 7, ignored=4)
    monkeypatch.setattr(backend_triton, "RESIDUAL_CHUNK_ELEMENTS", 7 * 5)
    grad, _ = triton_backend.line_search(h, w, b, y, plan("grid", True, logits_free=True))
    _, g_w, g_b, norm = oracle.head_gradient(h.cpu(), w.cpu(), b.cpu(), y.cpu())
    oracle.assert_close(grad.grad_weight, g_w, 1e-6, 1e-5, "chunked g_W")
    oracle.assert_close(grad.grad_bias, g_b, 1e-6, 1e-5, "chunked g_b")
    oracle.assert_close(grad.grad_norm, torch.tensor(norm), 1e-6, 1e-5, "chunked ||g||")


@pytest.mark.parametrize("logits_free", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(triton_backend, dtype, logits_free):
    """The head forward rounds z0 to the input dtype (as eager torch does), so g is that of the
    rounded logits: close to the exact g at the dtype's precision. The search along the returned
    direction is then exact: the stored path scores the rounded z0, the logits-free one an fp32 z0."""
    h, w, b, y = head_problem(26, 20, 11, dtype=dtype, spread=3.0)
    grad, outcome = triton_backend.line_search(h, w, b, y, plan("newton", True, logits_free=logits_free))
    z0_exact, g_w, _, norm = oracle.head_gradient(h.cpu(), w.cpu(), b.cpu(), y.cpu())
    oracle.assert_close(grad.grad_weight, g_w, 1e-3, 3e-2, f"{dtype} g_W")
    oracle.assert_close(grad.grad_norm, torch.tensor(norm), 0.0, 1e-2, f"{dtype} ||g||")
    z0 = z0_exact if logits_free else F.linear(h, w, b).cpu().double()
    d = oracle.direction(h.cpu(), grad.grad_weight.cpu().double(), grad.grad_bias.cpu().double(), float(grad.scale))
    assert not bool(outcome.capped)
    assert_newton_optimal(outcome, z0, d, y, what=f"{dtype} logits_free={logits_free}")


def test_float64_inputs_use_the_reference(triton_backend):
    h, w, b, y = head_problem(10, 4, 3, dtype=torch.float64)
    grad, outcome = triton_backend.line_search(h, w, b, y, plan("newton", True))
    assert grad.grad_weight.dtype == torch.float64
    z0, d, _ = oracle_line(h, w, b, y, True)
    assert_newton_optimal(outcome, z0, d, y, what="float64")


def test_public_line_search_runs_the_triton_backend(triton_backend, monkeypatch):
    import warnings

    import pof_fast
    from pof_fast import dispatch

    monkeypatch.setitem(dispatch._loaded, "triton", triton_backend)
    h, w, b, y = head_problem(21, 9, 8, spread=3.0)
    assert dispatch.resolve("triton", DEVICE) is triton_backend
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to torch would warn
        res = pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", backend="triton")
    z0, d, norm = oracle_line(h, w, b, y, False)
    assert_grid_point(res.step, z0, d, y, what="public API")
    oracle.assert_close(res.loss0, torch.tensor(oracle.line_loss(z0, d, y.cpu(), 0.0)), 1e-5, 1e-5, "loss0")
    oracle.assert_close(res.direction_norm, torch.tensor(norm), 1e-6, 1e-5, "||u|| raw")


def rounded_logits_gradient(h, w, b, y):
    """(z0, g_W, g_b, ||g||) in float64 at the head's own logits F.linear(h, w, b), rounded to its dtype."""
    z0 = F.linear(h, w, b).double().requires_grad_(True)
    residual, = torch.autograd.grad(F.cross_entropy(z0, y, ignore_index=-100), z0)
    g_w = residual.t() @ h.double()
    g_b = residual.sum(0) if b is not None else None
    norm = (g_w.square().sum() + (g_b.square().sum() if g_b is not None else 0.0)).sqrt().item()
    return z0.detach(), g_w, g_b, norm


def realistic(case):
    """SPEC section 5 cases A-C and a reduced case D (n, D, C, dtype)."""
    return {
        "A": (256, 640, 10, torch.float32),
        "B": (256, 640, 100, torch.float32),
        "C": (256, 2560, 1000, torch.float32),
        "C-bf16": (256, 2560, 1000, torch.bfloat16),
        "D-reduced": (512, 1024, 32000, torch.bfloat16),
    }[case]


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["A", "B", "C", "C-bf16", "D-reduced"])
def test_cuda_realistic_sizes_match_oracle(triton_kernels, triton_backend, case):
    n, D, C, dtype = realistic(case)
    h, w, b, y = head_problem(n, D, C, dtype=dtype, spread=4.0, ignored=17, device=torch.device("cuda"))
    logits_free = case.startswith("D")
    grad, outcome = triton_backend.line_search(h, w, b, y, plan("newton", True, logits_free=logits_free))
    assert (grad.logits is None) == logits_free
    z0_w, g_w, g_b, norm = oracle.head_gradient(h, w, b, y)
    if dtype == torch.float32:
        oracle.assert_close(grad.grad_norm, torch.tensor(norm), 0.0, 1e-4, f"{case} ||g||")
        oracle.assert_close(grad.grad_weight, g_w, 1e-6, 1e-3, f"{case} g_W")
    else:
        # 16-bit heads: the gradient is taken at the logits the head itself produces (rounded to its
        # dtype, as the reference and the script do), and the logits-free path searches along g_W
        # rounded to that dtype (relative error 2**-9).
        _, g_w, g_b, norm = rounded_logits_gradient(h, w, b, y)
        oracle.assert_close(grad.grad_norm, torch.tensor(norm), 0.0, 2e-3, f"{case} ||g||")
        oracle.assert_close(grad.grad_weight, g_w, 5e-3 * float(g_w.abs().max()), 5e-3, f"{case} g_W")
        g_w = grad.grad_weight.double()  # the line actually searched, checked just above
    z0 = F.linear(h, w, b).double() if not logits_free else z0_w
    d = oracle.direction(h, g_w, g_b, 1.0 / norm)
    _, slope0, _ = oracle.line_derivatives(z0, d, y, 0.0)
    _, slope, _ = oracle.line_derivatives(z0, d, y, float(outcome.step))
    # 1e-4, not the 1e-5 of the small tests: the oracle's d comes from its own float64 g, and at
    # these sizes the fp32 g_W (a 256- to 512-term product) differs from it by more.
    assert bool(outcome.capped) or abs(slope) <= 1e-4 * abs(slope0), (case, float(outcome.step), slope, slope0)
    steps = torch.tensor([0.0, 0.5, 2.0, float(outcome.step)], device="cuda")
    if logits_free:
        got = triton_kernels.logits_free.line_stats_logits_free(
            h, w, b, grad.grad_weight, grad.grad_bias, grad.scale, y, steps, -100)
    else:
        got = triton_kernels.line_stats.line_stats(
            grad.logits, triton_backend.direction_logits(h, grad), y, steps, -100)
    want = torch.tensor([oracle.line_derivatives(z0, d, y, t) for t in steps.tolist()], dtype=torch.float64).t()
    oracle.assert_close(got, want, 1e-4, 1e-4, f"{case} l, l', l''")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to 'torch' would make this test vacuous
def test_public_line_search_forces_the_logits_free_path(triton_backend):
    h, w, b, y = head_problem(19, 11, 6, ignored=2)
    stored = pof_fast.line_search(h, w, b, y, backend="triton", logits_free=False)
    free = pof_fast.line_search(h, w, b, y, backend="triton", logits_free=True)
    oracle.assert_close(free.step, stored.step, 1e-5, 1e-4, "t* logits-free vs stored")
    oracle.assert_close(free.weight_direction, stored.weight_direction, 1e-6, 1e-5, "u_W")
    with pytest.raises(TypeError, match="logits_free"):
        pof_fast.line_search(h, w, b, y, backend="triton", logits_free="yes")
