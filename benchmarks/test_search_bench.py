"""pytest-benchmark timings of one PoF line search, per backend and per baseline.

Run ``pytest benchmarks --benchmark-only`` (add ``--benchmark-save=NAME`` / ``--benchmark-compare``
to track regressions). Cases A to C of SPEC section 5 on the CPU (and on CUDA when present); case D
is left to ``benchmarks/run.py``, its searches take seconds each on the CPU. Problems and baselines
come from :mod:`pof_fast.cli.bench`, the one place they are defined.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pof_fast import line_search  # noqa: E402
from pof_fast.cli.bench import BASELINES, SCRIPT, SEARCHES, Problem, available_backends, baselines, case_for  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = ["A", "B", "C"]


@functools.lru_cache(maxsize=None)
def problem(case: str, device: str) -> Problem:
    return Problem.make(case_for(case, device), device)


def synchronized(fn, device: str):
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call


SEARCH_PARAMS = [
    pytest.param(device, case, name, method, direction, id=f"{device}-{case}-{name}-{method}")
    for device in DEVICES
    for case in CASES
    for name, status in available_backends(device).items()
    if status is True
    for method, direction in SEARCHES
]
BASELINE_PARAMS = [
    pytest.param(device, case, name, id=f"{device}-{case}-{name}")
    for device in DEVICES for case in CASES for name in BASELINES
]


@pytest.mark.parametrize("device,case,backend,method,direction", SEARCH_PARAMS)
def test_line_search(benchmark, device, case, backend, method, direction):
    args = problem(case, device).args()
    fn = synchronized(lambda: line_search(*args, method=method, direction=direction, backend=backend, **SCRIPT),
                      device)
    result = benchmark.pedantic(fn, warmup_rounds=1, rounds=10)
    assert result.evaluations > 0


@pytest.mark.parametrize("device,case,name", BASELINE_PARAMS)
def test_baseline(benchmark, device, case, name):
    fn = synchronized(baselines(problem(case, device), device)[name], device)
    out = benchmark.pedantic(fn, warmup_rounds=1, rounds=10)  # the warm-up call compiles for "compile"
    assert out is not None
