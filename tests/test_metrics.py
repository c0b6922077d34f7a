"""Metrics against independent references: the Hessian's top eigenvalue against an explicit float64 Hessian,
ECE by hand, the landscape ratio on a case with a closed-form answer."""
import math

import pytest
import torch
from torch import nn

from pof_fast.metrics import (calibration_bins, classification_metrics, expected_calibration_error, head_hessian_hvp,
                              hessian_lambda_max, landscape, lanczos, model_hessian_hvp, power_iteration)


def head_problem(n=60, d=5, c=4, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(c, (n,), generator=gen)
    w = torch.randn(c, d, generator=gen, dtype=torch.float64)
    b = torch.randn(c, generator=gen, dtype=torch.float64) if bias else None
    return h, y, w, b


def explicit_head_hessian(h, y, w, b):
    """The float64 Hessian of mean CE w.r.t. [vec(W), b], by autograd on the loss written out here."""
    c, d = w.shape

    def loss(theta):
        logits = h @ theta[: c * d].view(c, d).t() + (theta[c * d:] if b is not None else 0)
        return nn.functional.cross_entropy(logits, y)

    theta = torch.cat([w.reshape(-1)] + ([b] if b is not None else []))
    return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_head_lambda_max_matches_the_explicit_hessian(bias, method):
    h, y, w, b = head_problem(bias=bias)
    hessian = explicit_head_hessian(h, y, w, b)
    top = torch.linalg.eigvalsh(hessian)[-1].item()
    hvp, dim = head_hessian_hvp(h, y, w, b, chunk=7)  # chunks that do not divide n
    assert dim == hessian.shape[0]
    v = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hvp(v), hessian @ v, rtol=1e-12, atol=1e-13)
    result = hessian_lambda_max(hvp, dim, method=method, iters=500, tol=1e-9, seed=3, dtype=torch.float64)
    assert result.converged and result.method == method
    assert result.value == pytest.approx(top, rel=1e-7)
    assert abs(result.value - top) <= result.residual * (1 + 1e-6) + 1e-12  # the residual bounds the error


def test_lanczos_reports_convergence_and_is_seeded():
    h, y, w, b = head_problem(n=200, d=8, c=6)
    hvp, dim = head_hessian_hvp(h, y, w, b)
    short = lanczos(hvp, dim, iters=2, tol=1e-12, seed=0, dtype=torch.float64)
    assert not short.converged and short.iterations == 2 and short.residual > 0 and len(short.history) == 2
    again = lanczos(hvp, dim, iters=2, tol=1e-12, seed=0, dtype=torch.float64)
    assert again.history == short.history
    full = lanczos(hvp, dim, iters=100, tol=1e-10, seed=0, dtype=torch.float64)
    assert full.converged and full.value >= short.value - 1e-12  # Ritz values grow towards lambda_max
    slow = power_iteration(hvp, dim, iters=3, tol=1e-12, seed=0, dtype=torch.float64)
    assert not slow.converged and slow.iterations == 3
    with pytest.raises(ValueError, match="method"):
        hessian_lambda_max(hvp, dim, method="arnoldi")


def test_lanczos_on_a_small_operator_stops_at_an_invariant_subspace():
    matrix = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    result = lanczos(lambda v: matrix @ v, 3, iters=10, tol=1e-14, dtype=torch.float64)
    assert result.converged and result.iterations <= 3 and result.value == pytest.approx(3.0, rel=1e-12)


def test_network_hessian_vector_product_matches_the_explicit_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(2, (10,))
    params = list(net.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss(flat):
        w1, b1, w2, b2 = [t.view(s) for t, s in zip(flat.split(sizes), shapes)]
        return nn.functional.cross_entropy(torch.tanh(x @ w1.t() + b1) @ w2.t() + b2, y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss, flat)
    hvp, dim = model_hessian_hvp(net, params, [(x[:4], y[:4]), (x[4:], y[4:])])  # batches weighted by size
    v = torch.randn(dim, dtype=torch.float64)
    torch.testing.assert_close(hvp(v), hessian @ v, rtol=1e-10, atol=1e-12)
    result = lanczos(hvp, dim, iters=dim, tol=1e-10, dtype=torch.float64)
    assert result.value == pytest.approx(torch.linalg.eigvalsh(hessian)[-1].item(), rel=1e-8)


def test_ece_and_calibration_bins_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right) with 10 bins:
    # bin (0.8, 0.9]: acc 0.5, conf 0.9 -> 2/4 * 0.4; bin (0.5, 0.6]: acc 1, conf 0.6 -> 2/4 * 0.4; ECE 0.4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    logits = probs.log()
    target = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(logits, target, bins=10) == pytest.approx(0.4)
    bins = calibration_bins(logits, target, bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]
    assert bins[8]["accuracy"] == 0.5 and bins[8]["confidence"] == pytest.approx(0.9)
    metrics = classification_metrics(logits, target, bins=10)
    assert metrics["error"] == 0.25 and metrics["ece"] == pytest.approx(0.4)
    assert metrics["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.6) + math.log(0.6)) / 4)
    perfect = torch.tensor([[0.0, 50.0], [50.0, 0.0]])
    assert expected_calibration_error(perfect, torch.tensor([1, 0])) == pytest.approx(0.0, abs=1e-12)


def conflicting_batch(right, wrong):
    """``right`` rows of class 0 and ``wrong`` rows of class 1, all with the feature e1.

    With W0 = 0 and no bias, the normalised head gradient moves W by t/sqrt(2) (e1 for class 0, -e1 for
    class 1), so l(t) = [right softplus(-sqrt2 t) + wrong softplus(sqrt2 t)] / n, minimised at
    t* = ln(right / wrong) / sqrt(2).
    """
    e1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    return e1.repeat(right + wrong, 1), torch.tensor([0] * right + [1] * wrong)


def test_landscape_ratio_on_a_constructed_case():
    w = torch.zeros(2, 2, dtype=torch.float64)
    train = [conflicting_batch(3, 1), conflicting_batch(3, 1), conflicting_batch(4, 1)]
    test = [conflicting_batch(9, 1), conflicting_batch(9, 1), conflicting_batch(2, 1)]
    result = landscape(train, test, w, None, points=33)
    expected = [math.log(r) / math.sqrt(2) for r in (3, 3, 4)], [math.log(r) / math.sqrt(2) for r in (9, 9, 2)]
    assert result.t_train == pytest.approx(expected[0], rel=1e-5)
    assert result.t_test == pytest.approx(expected[1], rel=1e-5)
    assert result.ratio == pytest.approx(2.0, rel=1e-5)  # median ln 9 / median ln 3
    summary = result.summary()
    assert summary["capped_train"] == summary["capped_test"] == 0 and summary["batches_test"] == 3
    # the mean curves: l(t) - l(0) from the closed form, on the reported grid
    steps = torch.tensor(result.steps, dtype=torch.float64)

    def curve(right, wrong):
        s = math.sqrt(2) * steps
        loss = (right * nn.functional.softplus(-s) + wrong * nn.functional.softplus(s)) / (right + wrong)
        return loss - loss[0]

    mean_train = (curve(3, 1) + curve(3, 1) + curve(4, 1)) / 3
    torch.testing.assert_close(torch.tensor(result.curve_train, dtype=torch.float64), mean_train, rtol=1e-5, atol=1e-6)
    assert steps[-1].item() == pytest.approx(3 * math.log(9) / math.sqrt(2), rel=1e-5)


def test_landscape_counts_capped_searches():
    w = torch.zeros(2, 2, dtype=torch.float64)
    separable = conflicting_batch(5, 0)  # the loss falls for ever along the gradient
    result = landscape([conflicting_batch(3, 1)], [separable], w, None, max_step=10.0)
    assert result.capped_test == 1 and result.t_test == [10.0]
    with pytest.raises(ValueError, match="at least one"):
        landscape([], [separable], w, None)
