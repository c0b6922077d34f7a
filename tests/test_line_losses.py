"""line_losses and the reference line_stats against float64 autograd oracles."""
import pytest
import torch

import pof_fast
from pof_fast import reference
from oracle import assert_close, line_derivatives, line_loss

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def problem(n, c, scale, dtype, ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    d = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[:ignored] = -100
    return z0, d, y


@pytest.mark.parametrize("n,c", [(1, 1), (1, 7), (3, 1), (37, 10), (257, 100), (64, 1000)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_line_losses_match_float64_cross_entropy(n, c, scale):
    z0, d, y = problem(n, c, scale, torch.float32, ignored=min(2, n - 1))
    steps = torch.tensor([0.0, 0.01, 0.5, 1.0, 3.7, 20.0])
    got = pof_fast.line_losses(z0, d, y, steps)
    assert got.dtype == torch.float32 and got.shape == (6,)
    want = torch.tensor([line_loss(z0, d, y, t) for t in steps.tolist()], dtype=torch.float64)
    assert_close(got, want, atol=1e-4 * max(1.0, scale), rtol=2e-5, what="line_losses")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_line_stats_derivatives(dtype):
    z0, d, y = problem(41, 13, 3.0, dtype, ignored=5)
    steps = torch.tensor([0.0, 0.3, 2.0, 9.0], dtype=torch.float64)
    got = reference.line_stats(z0, d, y, steps, -100)
    want = torch.tensor([line_derivatives(z0, d, y, t) for t in steps.tolist()], dtype=torch.float64).t()
    assert_close(got, want, atol=50 * TOL[dtype], rtol=50 * TOL[dtype], what=f"line_stats {dtype}")


def test_low_precision_inputs_are_read_as_given():
    """bf16/fp16 logits give the float64 loss of the rounded values, within fp32 accumulation error."""
    for dtype in (torch.bfloat16, torch.float16):
        z0, d, y = problem(33, 50, 5.0, dtype)
        steps = torch.linspace(0, 4, 5)
        want = torch.tensor([line_loss(z0, d, y, t) for t in steps.tolist()], dtype=torch.float64)
        assert_close(pof_fast.line_losses(z0, d, y, steps), want, atol=1e-4, rtol=1e-5, what=str(dtype))


def test_chunking_never_changes_results_and_bounds_memory():
    z0, d, y = problem(50, 20, 2.0, torch.float64)
    steps = torch.linspace(0, 5, 33, dtype=torch.float64)
    whole = reference.line_stats(z0, d, y, steps, -100)
    one_at_a_time = reference.line_stats(z0, d, y, steps, -100, chunk_elements=1)
    assert_close(one_at_a_time, whole, atol=1e-12, rtol=1e-12, what="chunked")


def test_inputs_not_modified():
    z0, d, y = problem(9, 4, 1.0, torch.float32, ignored=2)
    copies = [t.clone() for t in (z0, d, y)]
    pof_fast.line_losses(z0, d, y, torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip((z0, d, y), copies))
