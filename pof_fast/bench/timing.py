"""Seconds per call: ``triton.testing.do_bench`` on CUDA, a median of repeats after a warm-up on the CPU."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Timing", "interleaved", "synchronize", "time_call"]


@dataclass
class Timing:
    """Seconds per call: median and the 20th / 80th percentiles over ``repeats`` calls (0: do_bench chose)."""

    median: float
    p20: float
    p80: float
    repeats: int


def synchronize(device: str) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str, budget_s: float, min_repeats: int = 3,
              max_repeats: int = 50) -> Timing:
    """Seconds per call of ``fn``: ``do_bench`` on CUDA (median, CUDA events, L2 flushed between calls; else
    synchronised repeats); on the CPU one untimed warm-up call sizes the repeats to ``budget_s`` (at least
    ``min_repeats``)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            median, p20, p80 = do_bench(fn, warmup=max(1, int(budget_s * 250)), rep=max(1, int(budget_s * 1000)),
                                        quantiles=[0.5, 0.2, 0.8])
            return Timing(median / 1e3, p20 / 1e3, p80 / 1e3, 0)
    start = time.perf_counter()
    fn()
    synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    repeats = int(min(max_repeats, max(min_repeats, budget_s / estimate)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return Timing(statistics.median(samples), pick(0.2), pick(0.8), repeats)


def interleaved(calls: list, device: str, budget_s: float, min_rounds: int = 5, max_rounds: int = 1 << 30) -> list:
    """Seconds of each call in rounds of one call each (after one warm-up call each), until ``budget_s`` is spent
    (at least ``min_rounds``, at most ``max_rounds``): every ratio compares calls made moments apart."""
    for call in calls:
        call()
    samples = [[] for _ in calls]
    start = time.perf_counter()
    while len(samples[0]) < min_rounds or (time.perf_counter() - start < budget_s and len(samples[0]) < max_rounds):
        for call, times in zip(calls, samples):
            synchronize(device)
            t0 = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return samples
