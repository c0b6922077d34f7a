"""Every Triton kernel against the float64 oracles of ``tests/oracle.py``.

Runs on CUDA when present, else under Triton's CPU interpreter (see ``triton_env``); sizes are
small and odd so that rows, classes, features and candidates all cross their block edges.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import oracle
from triton_env import DEVICE, triton_backend, triton_kernels  # noqa: F401  (fixtures)

pytestmark = pytest.mark.triton

# Kernel inputs that are exactly representable (bf16/fp16 tensors compared with the oracle on the
# same values in float64), so only fp32 accumulation error remains: these bound it.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5)}


def problem(n, C, dtype=torch.float32, spread=3.0, ignored=3, seed=0):
    """z0 over a wide logit range, d, targets with every ``ignored``-th row ignored (0: none)."""
    gen = torch.Generator().manual_seed(seed)
    z0 = (torch.randn(n, C, generator=gen) * spread + 20.0).to(dtype)
    d = torch.randn(n, C, generator=gen).to(dtype)
    y = torch.randint(0, C, (n,), generator=gen)
    if ignored:
        y[1::ignored] = -100
    return z0.to(DEVICE), d.to(DEVICE), y.to(DEVICE)


def oracle_stats(z0, d, y, steps):
    cols = [oracle.line_derivatives(z0.cpu(), d.cpu(), y.cpu(), t) for t in steps.tolist()]
    return torch.tensor(cols, dtype=torch.float64).t()


def check_stats(got, z0, d, y, steps, dtype, what):
    atol, rtol = TOL[dtype]
    want = oracle_stats(z0, d, y, steps)
    oracle.assert_close(got[0], want[0], atol, rtol, f"{what} loss")
    oracle.assert_close(got[1], want[1], atol, rtol, f"{what} slope")
    oracle.assert_close(got[2], want[2], atol, rtol, f"{what} curvature")


@pytest.mark.parametrize("n,C,K", [(1, 1, 1), (3, 37, 5), (37, 257, 17), (20, 5, 3), (1, 300, 2)])
def test_line_stats_matches_oracle(triton_kernels, n, C, K):
    z0, d, y = problem(n, C, ignored=3 if n > 1 else 0)
    steps = torch.linspace(0.0, 2.5, K, device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0, d, y, steps, -100)
    assert got.shape == (3, K) and got.dtype == torch.float32
    check_stats(got, z0, d, y, steps, torch.float32, f"n={n} C={C} K={K}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_line_stats_low_precision_inputs(triton_kernels, dtype):
    z0, d, y = problem(19, 70, dtype=dtype)
    steps = torch.tensor([0.0, 0.3, 4.0], device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0, d, y, steps, -100)
    check_stats(got, z0, d, y, steps, dtype, str(dtype))


def test_line_stats_error_no_worse_than_eager_fp32(triton_kernels):
    """Strong criterion: against float64, the kernel's error is at most 4x eager torch's in fp32."""
    from pof_fast import reference

    z0, d, y = problem(29, 131, spread=10.0)
    steps = torch.tensor([0.0, 0.5, 3.0, 9.0], device=DEVICE)
    exact = reference.line_stats(z0.double(), d.double(), y, steps.double(), -100)
    eager = (reference.line_stats(z0, d, y, steps, -100).double() - exact).abs().max().item()
    kernel = (triton_kernels.line_stats.line_stats(z0, d, y, steps, -100).double() - exact).abs().max().item()
    assert kernel <= 4 * eager + 1e-6, (kernel, eager)


def test_line_stats_strided_inputs_and_device_scale(triton_kernels):
    z0, d, y = problem(23, 41)
    z0_t = z0.t().contiguous().t()  # same values, column-major strides
    d_wide = torch.zeros(23, 82, device=DEVICE)
    d_wide[:, ::2] = d
    d_view = d_wide[:, ::2]  # stride 2 along classes
    scale = torch.tensor(0.37, device=DEVICE)
    steps = torch.tensor([0.0, 1.0, 5.0], device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0_t, d_view, y, steps, -100, scale=scale)
    check_stats(got, z0, d * 0.37, y, steps, torch.float32, "strided, scaled")


def test_line_stats_ignore_index_inside_class_range(triton_kernels):
    z0, d, y = problem(17, 9, ignored=0)
    y[::2] = 4
    steps = torch.tensor([0.0, 2.0], device=DEVICE)
    got = triton_kernels.line_stats.line_stats(z0, d, y, steps, 4)
    want = torch.tensor([oracle.line_derivatives(z0.cpu(), d.cpu(), y.cpu(), t, ignore_index=4) for t in (0.0, 2.0)])
    oracle.assert_close(got, want.t(), 2e-5, 2e-5, "ignore_index=4")


def test_line_stats_all_rows_ignored_gives_zeros(triton_kernels):
    z0, d, y = problem(11, 7)
    y.fill_(-100)
    got = triton_kernels.line_stats.line_stats(z0, d, y, torch.tensor([0.0, 1.0], device=DEVICE), -100)
    assert torch.equal(got.cpu(), torch.zeros(3, 2))


def test_line_stats_rejects_bad_input(triton_kernels):
    z0, d, y = problem(5, 4)
    with pytest.raises(ValueError, match="direction"):
        triton_kernels.line_stats.line_stats(z0, d[:, :3], y, torch.zeros(1, device=DEVICE), -100)
    with pytest.raises(TypeError, match="float32"):
        triton_kernels.line_stats.line_stats(z0.double(), d.double(), y, torch.zeros(1, device=DEVICE), -100)
    with pytest.raises(ValueError, match="target"):
        triton_kernels.line_stats.line_stats(z0, d, y[:4], torch.zeros(1, device=DEVICE), -100)


def head_problem(n, D, C, bias=True, dtype=torch.float32, ignored=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=gen).to(dtype)
    w = (torch.randn(C, D, generator=gen) * 0.3).to(dtype)
    b = torch.randn(C, generator=gen).to(dtype) if bias else None
    y = torch.randint(0, C, (n,), generator=gen)
    if ignored:
        y[2::ignored] = -100
    return h.to(DEVICE), w.to(DEVICE), (b.to(DEVICE) if bias else None), y.to(DEVICE)


def oracle_residual(z0, y, ignore_index=-100):
    counted = y != ignore_index
    m = max(int(counted.sum()), 1)
    onehot = F.one_hot(torch.where(counted, y, 0), z0.shape[1]).double()
    return (torch.softmax(z0.double(), 1) - onehot) * counted[:, None].double() / m


@pytest.mark.parametrize("n,D,C,bias", [(1, 3, 1, True), (5, 40, 37, True), (37, 7, 5, False), (33, 19, 300, True)])
@pytest.mark.parametrize("normalized", [True, False])
def test_head_gradient_matches_oracle(triton_backend, n, D, C, bias, normalized):
    h, w, b, y = head_problem(n, D, C, bias, ignored=4 if n > 1 else 0)
    grad = triton_backend.head_gradient(h, w, b, y, -100, normalized)
    z0, g_w, g_b, norm = oracle.head_gradient(h.cpu(), w.cpu(), None if b is None else b.cpu(), y.cpu())
    oracle.assert_close(grad.residual, oracle_residual(z0, y.cpu()), 1e-6, 1e-5, "residual")
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


def test_direction_gram_and_product_forms_agree(triton_backend):
    """n=4 < D C / (D + C): the Gram form is used; without R the product form must give the same d."""
    h, w, b, y = head_problem(4, 50, 60)
    grad = triton_backend.head_gradient(h, w, b, y, -100, True)
    gram = triton_backend.direction_logits(h, grad)
    product = triton_backend.direction_logits(h, grad._replace(residual=None))
    oracle.assert_close(gram, product, 1e-6, 1e-5, "Gram vs product")


def test_head_gradient_bf16_inputs(triton_backend):
    h, w, b, y = head_problem(21, 33, 45, dtype=torch.bfloat16)
    grad = triton_backend.head_gradient(h, w, b, y, -100, True)
    # z0 is rounded to bf16 by the head forward, as in eager torch: compare R on those logits.
    oracle.assert_close(grad.residual, oracle_residual(grad.logits.cpu(), y.cpu()), 1e-6, 1e-5, "bf16 residual")
    _, g_w, g_b, norm = oracle.head_gradient(h.cpu(), w.cpu(), b.cpu(), y.cpu())
    oracle.assert_close(grad.grad_norm, torch.tensor(norm), 0.0, 2e-2, "bf16 ||g||")


def test_head_gradient_all_rows_ignored_is_zero(triton_backend):
    h, w, b, y = head_problem(9, 6, 5)
    y.fill_(-100)
    grad = triton_backend.head_gradient(h, w, b, y, -100, True)
    for t in (grad.residual, grad.grad_weight, grad.grad_bias, grad.grad_norm, grad.scale):
        assert torch.isfinite(t).all() and not t.any()


@pytest.mark.parametrize("n,D,C,bias,dtype", [
    (33, 37, 45, True, torch.float32),
    (1, 5, 1, False, torch.float32),
    (17, 70, 33, True, torch.bfloat16),
    (40, 16, 20, False, torch.float16),
])
def test_logits_free_stats_match_oracle(triton_kernels, n, D, C, bias, dtype):
    h, w, b, y = head_problem(n, D, C, bias, dtype=dtype, ignored=4 if n > 1 else 0)
    gen = torch.Generator().manual_seed(5)
    # g_W representable in the input dtype: 16-bit inputs form d on tensor cores from g_W rounded
    # to that dtype (documented), which is then exact, so the oracle sees the same direction.
    g_w = (torch.randn(C, D, generator=gen) * 0.1).to(dtype).float().to(DEVICE)
    g_b = (torch.randn(C, generator=gen) * 0.1).to(DEVICE) if bias else None
    scale = torch.tensor(1.7, device=DEVICE)
    steps = torch.tensor([0.0, 0.7, 3.0], device=DEVICE)
    got = triton_kernels.logits_free.line_stats_logits_free(h, w, b, g_w, g_b, scale, y, steps, -100)
    z0 = F.linear(h.cpu().double(), w.cpu().double(), None if b is None else b.cpu().double())
    d = oracle.direction(h.cpu(), g_w.cpu().double(), None if g_b is None else g_b.cpu().double(), 1.7)
    atol, rtol = TOL[dtype]
    want = oracle_stats(z0, d, y, steps)
    oracle.assert_close(got, want, atol, rtol, f"logits-free {dtype}")
