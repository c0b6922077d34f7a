"""line_losses and the reference line_stats against float64 autograd oracles (tests/oracle.py)."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import pof_fast
from oracle import assert_close, line_derivatives, line_loss
from pof_fast import reference
from problems import line_problem

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# line_losses through the pure-PyTorch backend and, where it is built, the compiled one.
BACKENDS = ["torch"] + (["cpp"] if pof_fast.backends()["cpp"] is True else [])


def oracle_losses(z0, d, y, steps):
    return torch.tensor([line_loss(z0, d, y, t) for t in steps.tolist()], dtype=torch.float64)


def peak_cpu_bytes(fn) -> int:
    """Peak bytes held by the CPU allocator while ``fn`` runs, above what was held before.

    From the profiler's allocator events: every allocation and free, in time order, summed.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocator events: the measurement is broken"
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c", [(1, 1), (1, 7), (3, 1), (37, 10), (257, 100), (64, 1000)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_line_losses_match_float64_cross_entropy(backend, n, c, scale):
    z0, d, y = line_problem(n, c, scale=scale, ignore_every=3 if n > 1 else 0)
    steps = torch.tensor([0.0, 0.01, 0.5, 1.0, 3.7, 20.0])
    got = pof_fast.line_losses(z0, d, y, steps, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (6,)
    assert_close(got, oracle_losses(z0, d, y, steps), atol=1e-4 * max(1.0, scale), rtol=2e-5,
                 what=f"line_losses {backend}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_line_stats_derivatives(dtype):
    z0, d, y = line_problem(41, 13, dtype=dtype, ignore_every=8)
    steps = torch.tensor([0.0, 0.3, 2.0, 9.0], dtype=torch.float64)
    got = reference.line_stats(z0, d, y, steps, -100)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = torch.tensor([line_derivatives(z0, d, y, t) for t in steps.tolist()], dtype=torch.float64).t()
    assert_close(got, want, atol=50 * TOL[dtype], rtol=50 * TOL[dtype], what=f"line_stats {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_read_as_given(backend, dtype):
    """bf16/fp16 logits give the float64 loss of the rounded values, within fp32 accumulation error."""
    z0, d, y = line_problem(33, 50, dtype=dtype, scale=5.0)
    steps = torch.linspace(0, 4, 5)
    got = pof_fast.line_losses(z0, d, y, steps, backend=backend)
    assert_close(got, oracle_losses(z0, d, y, steps), atol=1e-4, rtol=1e-5, what=f"{dtype} {backend}")


def test_chunking_never_changes_results_and_bounds_memory():
    """Chunked candidates give the same stats, and the allocator peak follows the chunk, not K.

    Unchunked, one ``[K, n, C]`` float64 intermediate alone is ``K n C * 8`` bytes; chunked by
    ``chunk = 4 n C`` elements the peak stays within a few chunks whatever K is.
    """
    n, c = 50, 20
    z0, d, y = line_problem(n, c, dtype=torch.float64, scale=2.0)
    steps = torch.linspace(0, 5, 33, dtype=torch.float64)
    whole = reference.line_stats(z0, d, y, steps, -100)
    one_at_a_time = reference.line_stats(z0, d, y, steps, -100, chunk_elements=1)
    assert_close(one_at_a_time, whole, atol=1e-12, rtol=1e-12, what="chunked")

    many = torch.linspace(0, 5, 330, dtype=torch.float64)
    chunk = 4 * n * c
    chunk_bytes = chunk * z0.element_size()
    unchunked = peak_cpu_bytes(lambda: reference.line_stats(z0, d, y, many, -100))
    assert unchunked >= many.numel() * n * c * z0.element_size()  # the measurement sees the broadcast
    for steps_k in (steps, many):
        peak = peak_cpu_bytes(lambda: reference.line_stats(z0, d, y, steps_k, -100, chunk_elements=chunk))
        # at most ~6 chunk-sized intermediates live at once, plus the [3, K] output and [n] rows
        assert peak <= 8 * chunk_bytes + 3 * steps_k.numel() * 8 * 4, (steps_k.numel(), peak, chunk_bytes)


def test_inputs_not_modified():
    z0, d, y = line_problem(9, 4, scale=1.0, ignore_every=4)
    copies = [t.clone() for t in (z0, d, y)]
    for backend in BACKENDS:
        pof_fast.line_losses(z0, d, y, torch.tensor([1.0]), backend=backend)
        assert all(torch.equal(a, b) for a, b in zip((z0, d, y), copies)), backend
