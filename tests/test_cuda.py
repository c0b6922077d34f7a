"""The compiled CUDA backend ("cuda") against the float64 oracles; skipped without a GPU (conftest)."""
from __future__ import annotations

import pytest
import torch

import oracle
import pof_fast
from pof_fast import _ext

pytestmark = pytest.mark.cuda

SIZES = [(1, 1), (1, 33), (7, 31), (37, 257), (300, 1000), (9, 5000)]  # warp and block edges


def needs_cuda_ops():
    if not _ext.cuda_compiled():
        pytest.fail(f"pof_fast._C was built without CUDA ({_ext.reason() or 'CPU-only build'})")


def problem(n, classes, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = (torch.randn(n, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    d = torch.randn(n, classes, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    if n > 3:
        y[::3] = -100
    return z0, d, y


@pytest.mark.parametrize("n,classes", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_line_stats_matches_oracle(n, classes, dtype):
    needs_cuda_ops()
    z0, d, y = problem(n, classes, dtype)
    steps = torch.linspace(0, 3, 19, dtype=torch.float64)  # > 16 candidates: several register chunks
    got = torch.ops.pof_fast.line_stats(z0.cuda(), d.cuda(), y.cuda(), steps.cuda(), -100)
    want = torch.tensor([oracle.line_derivatives(z0, d, y, float(t)) for t in steps], dtype=torch.float64).t()
    tol = 1e-9 if dtype == torch.float64 else 5e-5
    oracle.assert_close(got, want, tol, tol, f"cuda line_stats {dtype} n={n} C={classes}")


def test_line_stats_all_ignored_and_huge_logits():
    needs_cuda_ops()
    z0, d, y = problem(40, 100, scale=1e3)
    got = torch.ops.pof_fast.line_stats(z0.cuda(), d.cuda(), torch.full_like(y, -100).cuda(),
                                        torch.tensor([0.0, 1.0], device="cuda"), -100)
    assert torch.equal(got.cpu(), torch.zeros(3, 2))
    got = torch.ops.pof_fast.line_stats(z0.cuda(), d.cuda(), y.cuda(), torch.tensor([0.0, 0.5], device="cuda"), -100)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("n,dim,classes", [(1, 3, 1), (37, 19, 33), (256, 640, 100), (5, 300, 1000)])
@pytest.mark.parametrize("bias", [True, False])
def test_head_gradient_matches_oracle(n, dim, classes, bias):
    needs_cuda_ops()
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(classes, dim, generator=g, dtype=torch.float64) / dim**0.5
    b = torch.randn(classes, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, classes, (n,), generator=g)
    out = torch.ops.pof_fast.head_gradient(h.cuda(), w.cuda(), b.cuda() if bias else None, y.cuda(), -100, True)
    _, residual, gw, gb, norm, scale = out
    z0, gw64, gb64, norm64 = oracle.head_gradient(h, w, b, y)
    oracle.assert_close(gw, gw64, 1e-10, 1e-8, "grad_weight")
    if bias:
        oracle.assert_close(gb, gb64, 1e-10, 1e-8, "grad_bias")
    assert norm.item() == pytest.approx(norm64, rel=1e-9, abs=1e-12)
    want_scale = 1.0 / norm64 if norm64 > 0 else 0.0
    d = torch.ops.pof_fast.direction_logits(h.cuda(), gw, gb if bias else None, scale, residual)
    oracle.assert_close(d, oracle.direction(h, gw64, gb64, want_scale), 1e-8, 1e-8, "direction")


@pytest.mark.parametrize("method", ["bracket_grid", "grid", "newton"])
@pytest.mark.parametrize("n,dim,classes", [(256, 640, 10), (256, 640, 100), (256, 256, 1000), (3, 8, 1)])
def test_search_matches_torch_backend(method, n, dim, classes):
    needs_cuda_ops()
    g = torch.Generator().manual_seed(classes)
    h = torch.randn(n, dim, generator=g).cuda()
    w = (torch.randn(classes, dim, generator=g) / dim**0.5).cuda()
    b = torch.randn(classes, generator=g).cuda()
    y = torch.randint(0, classes, (n,), generator=g).cuda()
    got = pof_fast.line_search(h, w, b, y, method=method, direction="raw", backend="cuda")
    ref = pof_fast.line_search(h, w, b, y, method=method, direction="raw", backend="torch")
    assert got.step.device.type == "cuda" and got.evaluations == ref.evaluations
    if method == "newton":
        assert got.step.item() == pytest.approx(ref.step.item(), rel=1e-3, abs=1e-6)
    elif got.step.item() != ref.step.item():
        # near-ties between grid points: the picks may differ, their losses only by fp32 noise
        assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6, abs=1e-6 * max(1.0, ref.loss0.item()))
    assert bool(got.capped) == bool(ref.capped)


def test_search_needs_no_host_sync():
    needs_cuda_ops()
    z0, d, y = problem(256, 100)
    z0, d, y = z0.cuda(), d.cuda(), y.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.ops.pof_fast.search(z0, d, y, "newton", 1.0, 100.0, 16, -100, 8, 8)
        stats = torch.ops.pof_fast.line_stats(z0, d, y, torch.zeros(3, device="cuda"), -100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out[0]).item() and torch.isfinite(stats).all().item()
