"""Every Triton kernel against the float64 oracles of ``tests/oracle.py``.

Marked ``triton``: on CUDA when present, else in a child process under Triton's CPU interpreter (see
``triton_env``); sizes are small and odd so that rows, classes, features and candidates all cross
their block edges. Problems come from ``tests/problems.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import oracle
from problems import IGNORE_INDEX, head_problem, line_problem
from triton_env import DEVICE

pytestmark = pytest.mark.triton

# Kernel inputs that are exactly representable (bf16/fp16 tensors compared with the oracle on the
# same values in float64), so only fp32 accumulation error remains: these bound it.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5)}


def logits(n, C, dtype=torch.float32, scale=3.0, ignore_every=3, seed=0):
    """z0 over a wide logit range (around 20), d, targets with every ``ignore_every``-th row ignored."""
    return line_problem(n, C, dtype=dtype, scale=scale, offset=20.0, ignore_every=ignore_every, ignore_from=1,
                        seed=seed, device=DEVICE)


def head(n, D, C, bias=True, dtype=torch.float32, ignore_every=4, seed=1):
    return head_problem(n, D, C, bias=bias, dtype=dtype, spread=3.0, bias_scale=1.0, ignore_every=ignore_every,
                        ignore_from=2, seed=seed, device=DEVICE)


def oracle_stats(z0, d, y, steps, ignore_index=IGNORE_INDEX):
    """``[3, K]`` float64 l, l', l'' by autograd, one candidate at a time."""
    cols = [oracle.line_derivatives(z0.cpu(), d.cpu(), y.cpu(), t, ignore_index) for t in steps.tolist()]
    return torch.tensor(cols, dtype=torch.float64).t()


def check_stats(got, z0, d, y, steps, dtype, what):
    atol, rtol = TOL[dtype]
    want = oracle_stats(z0, d, y, steps)
    oracle.assert_close(got[0], want[0], atol, rtol, f"{what} loss")
    oracle.assert_close(got[1], want[1], atol, rtol, f"{what} slope")
    oracle.assert_close(got[2], want[2], atol, rtol, f"{what} curvature")


@pytest.mark.parametrize("n,C,K", [(1, 1, 1), (3, 37, 5), (37, 257, 17), (20, 5, 3), (1, 300, 2)])
def test_line_stats_matches_oracle(triton_kernels, n, C, K):
    z0, d, y = logits(n, C, ignore_every=3 if n > 1 else 0)
    steps = torch.linspace(0.0, 2.5, K, device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0, d, y, steps, IGNORE_INDEX)
    assert got.shape == (3, K) and got.dtype == torch.float32
    check_stats(got, z0, d, y, steps, torch.float32, f"n={n} C={C} K={K}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_line_stats_low_precision_inputs(triton_kernels, dtype):
    z0, d, y = logits(19, 70, dtype=dtype)
    steps = torch.tensor([0.0, 0.3, 4.0], device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0, d, y, steps, IGNORE_INDEX)
    check_stats(got, z0, d, y, steps, dtype, str(dtype))


def test_line_stats_error_no_worse_than_eager_fp32(triton_kernels):
    """Strong criterion: against the float64 oracle, the kernel's error is at most 4x eager torch's in fp32."""
    from pof_fast import reference

    z0, d, y = logits(29, 131, scale=10.0)
    steps = torch.tensor([0.0, 0.5, 3.0, 9.0], device=DEVICE)
    exact = oracle_stats(z0, d, y, steps)
    eager = (reference.line_stats(z0, d, y, steps, IGNORE_INDEX).double().cpu() - exact).abs().max().item()
    got = triton_kernels.line_stats.line_stats(z0, d, y, steps, IGNORE_INDEX)
    kernel = (got.double().cpu() - exact).abs().max().item()
    assert kernel <= 4 * eager + 1e-6, (kernel, eager)


def test_line_stats_strided_inputs_and_device_scale(triton_kernels):
    z0, d, y = logits(23, 41)
    z0_t = z0.t().contiguous().t()  # same values, column-major strides
    d_wide = torch.zeros(23, 82, device=DEVICE)
    d_wide[:, ::2] = d
    d_view = d_wide[:, ::2]  # stride 2 along classes
    scale = torch.tensor(0.37, device=DEVICE)
    steps = torch.tensor([0.0, 1.0, 5.0], device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0_t, d_view, y, steps, IGNORE_INDEX, scale=scale)
    check_stats(got, z0, d.double() * 0.37, y, steps, torch.float32, "strided, scaled")


def test_line_stats_ignore_index_inside_class_range(triton_kernels):
    z0, d, y = logits(17, 9, ignore_every=0)
    y[::2] = 4
    steps = torch.tensor([0.0, 2.0], device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0, d, y, steps, 4)
    oracle.assert_close(got, oracle_stats(z0, d, y, steps, ignore_index=4), 2e-5, 2e-5, "ignore_index=4")


def test_line_stats_all_rows_ignored_gives_zeros(triton_kernels):
    z0, d, y = logits(11, 7)
    y.fill_(IGNORE_INDEX)
    got = triton_kernels.line_stats.line_stats(z0, d, y, torch.tensor([0.0, 1.0], device=DEVICE), IGNORE_INDEX)
    assert torch.equal(got.cpu(), torch.zeros(3, 2))


def test_line_stats_rejects_bad_input(triton_kernels):
    z0, d, y = logits(5, 4)
    with pytest.raises(ValueError, match="direction"):
        triton_kernels.line_stats.line_stats(z0, d[:, :3], y, torch.zeros(1, device=DEVICE), IGNORE_INDEX)
    with pytest.raises(TypeError, match="float32"):
        triton_kernels.line_stats.line_stats(z0.double(), d.double(), y, torch.zeros(1, device=DEVICE), IGNORE_INDEX)
    with pytest.raises(ValueError, match="target"):
        triton_kernels.line_stats.line_stats(z0, d, y[:4], torch.zeros(1, device=DEVICE), IGNORE_INDEX)


# Counted labels outside [0, C): one past the end, negative (not ignore_index), and one so far out that
# reading through it would fault. Each makes its row NaN (pof_fast.reference.label_rows).
BAD_LABELS = [lambda C: C, lambda C: -5, lambda C: 10**9]


@pytest.mark.parametrize("bad", BAD_LABELS, ids=["C", "-5", "1e9"])
def test_line_stats_out_of_range_label_gives_nan(triton_kernels, bad):
    from pof_fast import reference

    z0, d, y = logits(21, 13)
    y[4] = bad(13)
    steps = torch.tensor([0.0, 1.5], device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0, d, y, steps, IGNORE_INDEX)
    want = reference.line_stats(z0.double(), d.double(), y, steps.double(), IGNORE_INDEX)
    assert torch.isnan(want).all()  # the documented behaviour the kernel must match
    assert torch.isnan(got).all(), got
    # The same rows with that label ignored instead are finite and exact: only the bad row poisons the sums.
    y[4] = IGNORE_INDEX
    check_stats(triton_kernels.line_stats.line_stats(z0, d, y, steps, IGNORE_INDEX), z0, d, y, steps,
                torch.float32, "bad row ignored")


@pytest.mark.parametrize("bad", BAD_LABELS, ids=["C", "-5", "1e9"])
def test_head_residual_out_of_range_label_gives_nan_row(triton_kernels, bad):
    """The bad row is NaN, and it counts in m: the other rows are the oracle's residual times m_good / m."""
    from pof_fast import reference

    z0, _, y = logits(21, 13)
    y[4] = bad(13)
    count = (y != IGNORE_INDEX).sum()
    got = triton_kernels.head_residual.head_residual(z0, y, count, IGNORE_INDEX).cpu()
    want = reference.head_residual(z0.double(), y, IGNORE_INDEX).cpu()
    nan_rows = torch.isnan(got).all(1)
    assert torch.equal(nan_rows, torch.isnan(want).all(1)) and nan_rows.tolist() == [i == 4 for i in range(21)]
    good = y.clone()
    good[4] = IGNORE_INDEX
    m_good, m = int((good != IGNORE_INDEX).sum()), int(count)
    expected = oracle.residual(z0.cpu(), good.cpu()) * (m_good / m)
    keep = ~nan_rows
    oracle.assert_close(got[keep], expected[keep], 1e-7, 1e-5, "finite rows")


@pytest.mark.parametrize("bad", BAD_LABELS, ids=["C", "-5", "1e9"])
def test_logits_free_out_of_range_label_gives_nan(triton_kernels, bad):
    from pof_fast import reference

    h, w, b, y = head(17, 20, 9)
    y[3] = bad(9)
    g_w = torch.full((9, 20), 0.01, device=DEVICE)
    g_b = torch.full((9,), 0.01, device=DEVICE)
    steps = torch.tensor([0.0, 1.0], device=DEVICE)
    got = triton_kernels.logits_free.line_stats_logits_free(
        h, w, b, g_w, g_b, torch.tensor(1.0, device=DEVICE), y, steps, IGNORE_INDEX)
    z0 = F.linear(h.double(), w.double(), b.double())
    d = F.linear(h.double(), g_w.double(), g_b.double())
    assert torch.isnan(reference.line_stats(z0, d, y, steps.double(), IGNORE_INDEX)).all()
    assert torch.isnan(got).all(), got


@pytest.mark.parametrize("n,D,C,bias", [(1, 3, 1, True), (5, 40, 37, True), (37, 7, 5, False), (33, 19, 300, True)])
@pytest.mark.parametrize("normalized", [True, False])
def test_head_gradient_matches_oracle(triton_backend, n, D, C, bias, normalized):
    h, w, b, y = head(n, D, C, bias, ignore_every=4 if n > 1 else 0)
    grad = triton_backend.head_gradient(h, w, b, y, IGNORE_INDEX, normalized)
    z0, g_w, g_b, norm = oracle.head_gradient(h.cpu(), w.cpu(), None if b is None else b.cpu(), y.cpu())
    oracle.assert_close(grad.logits, z0, 1e-5, 1e-5, "z0")
    oracle.assert_close(grad.residual, oracle.residual(z0, y.cpu()), 1e-6, 1e-5, "residual")
    oracle.assert_close(grad.grad_weight, g_w, 1e-6, 1e-5, "g_W")
    if bias:
        oracle.assert_close(grad.grad_bias, g_b, 1e-6, 1e-5, "g_b")
    else:
        assert grad.grad_bias is None
    oracle.assert_close(grad.grad_norm, torch.tensor(norm), 1e-6, 1e-5, "||g||")
    scale = (1.0 / norm if normalized else 1.0) if norm > 0 else 0.0
    oracle.assert_close(grad.scale, torch.tensor(scale), 1e-6, 1e-5, "scale")
    d = triton_backend.direction_logits(h, grad)
    oracle.assert_close(d, oracle.direction(h.cpu(), g_w, g_b, scale), 1e-5, 1e-5, "direction")


def test_direction_gram_and_product_forms_match_oracle(triton_backend):
    """n=4 < D C / (D + C): the Gram form is used; without R the product form. Both give the oracle's d."""
    h, w, b, y = head(4, 50, 60)
    grad = triton_backend.head_gradient(h, w, b, y, IGNORE_INDEX, True)
    _, g_w, g_b, norm = oracle.head_gradient(h.cpu(), w.cpu(), b.cpu(), y.cpu())
    want = oracle.direction(h.cpu(), g_w, g_b, 1.0 / norm)
    oracle.assert_close(triton_backend.direction_logits(h, grad), want, 1e-6, 1e-5, "Gram form")
    oracle.assert_close(triton_backend.direction_logits(h, grad._replace(residual=None)), want, 1e-6, 1e-5,
                        "product form")


def test_head_gradient_bf16_inputs(triton_backend):
    h, w, b, y = head(21, 33, 45, dtype=torch.bfloat16)
    grad = triton_backend.head_gradient(h, w, b, y, IGNORE_INDEX, True)
    z0, _, _, norm = oracle.head_gradient(h.cpu(), w.cpu(), b.cpu(), y.cpu())
    # z0 is rounded to bf16 by the head forward, as in eager torch: R is checked on those logits.
    assert grad.logits.dtype == torch.bfloat16
    oracle.assert_close(grad.logits, z0, 1e-2, 2.0**-7, "bf16 z0")
    oracle.assert_close(grad.residual, oracle.residual(grad.logits.cpu(), y.cpu()), 1e-6, 1e-5, "bf16 residual")
    oracle.assert_close(grad.grad_norm, torch.tensor(norm), 0.0, 2e-2, "bf16 ||g||")


def test_head_gradient_all_rows_ignored_is_zero(triton_backend):
    h, w, b, y = head(9, 6, 5)
    y.fill_(IGNORE_INDEX)
    grad = triton_backend.head_gradient(h, w, b, y, IGNORE_INDEX, True)
    for t in (grad.residual, grad.grad_weight, grad.grad_bias, grad.grad_norm, grad.scale):
        assert torch.isfinite(t).all() and not t.any()


@pytest.mark.parametrize("n,D,C,bias,dtype", [
    (33, 37, 45, True, torch.float32),
    (1, 5, 1, False, torch.float32),
    (17, 70, 33, True, torch.bfloat16),
    (40, 16, 20, False, torch.float16),
])
def test_logits_free_stats_match_oracle(triton_kernels, n, D, C, bias, dtype):
    h, w, b, y = head(n, D, C, bias, dtype=dtype, ignore_every=4 if n > 1 else 0)
    gen = torch.Generator().manual_seed(5)
    # g_W representable in the input dtype: 16-bit inputs form d on tensor cores from g_W rounded
    # to that dtype (documented), which is then exact, so the oracle sees the same direction.
    g_w = (torch.randn(C, D, generator=gen) * 0.1).to(dtype).float().to(DEVICE)
    g_b = (torch.randn(C, generator=gen) * 0.1).to(DEVICE) if bias else None
    scale = torch.tensor(1.7, device=DEVICE)
    steps = torch.tensor([0.0, 0.7, 3.0], device=DEVICE)
    got = triton_kernels.logits_free.line_stats_logits_free(h, w, b, g_w, g_b, scale, y, steps, IGNORE_INDEX)
    z0 = F.linear(h.cpu().double(), w.cpu().double(), None if b is None else b.cpu().double())
    d = oracle.direction(h.cpu(), g_w.cpu().double(), None if g_b is None else g_b.cpu().double(), 1.7)
    atol, rtol = TOL[dtype]
    oracle.assert_close(got, oracle_stats(z0, d, y, steps), atol, rtol, f"logits-free {dtype}")
