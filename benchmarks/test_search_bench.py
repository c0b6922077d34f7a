"""pytest-benchmark timings of one PoF line search, per backend, per baseline and (CUDA) per graph replay.

Run ``pytest benchmarks --benchmark-only`` (add ``--benchmark-save=NAME`` / ``--benchmark-compare``
to track regressions; ``--benchmark-disable`` runs each search once, as a test). Cases A to C of SPEC
section 5 on the CPU (and on CUDA when present); case D is left to ``benchmarks/run.py``, its searches take
seconds each on the CPU. Problems, baselines and graph capture come from :mod:`pof_fast.bench`, the one place
they are defined. Every timed search must also be right: its t* scores no worse, on the script's line in
float64, than the reference script's own search run in float64 on the same data, and never above l(0).
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pof_fast import line_search, reference  # noqa: E402
from pof_fast.bench.agreement import ScriptLine  # noqa: E402
from pof_fast.bench.baselines import BASELINES, baselines, searched  # noqa: E402
from pof_fast.bench.cases import SCRIPT, SEARCHES, Problem, case_for, plan  # noqa: E402
from pof_fast.bench.graphs import capture  # noqa: E402
from pof_fast.bench.suite import available_backends  # noqa: E402
from pof_fast.drivers import evaluations  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = ["A", "B", "C"]


@functools.lru_cache(maxsize=None)
def problem(case: str, device: str) -> Problem:
    return Problem.make(case_for(case, device), device)


@functools.lru_cache(maxsize=None)
def oracle(case: str, device: str) -> tuple:
    """The script's line in float64 and the script's own search run on it in float64: (line, t*)."""
    p = problem(case, device)
    t_star, _ = reference.script_search(p.features.double(), p.weight.double(), p.bias.double(), p.target, **SCRIPT)
    return ScriptLine(p), t_star


def assert_as_good_as_the_script(case: str, device: str, t_star: float, direction: str, method: str) -> None:
    line, script_t = oracle(case, device)
    verdict = line.judge(t_star, direction, method, script_t)
    assert verdict["agrees"], (f"t*={t_star} ({direction}) scores {verdict['loss_gap']:.3g} above the float64 "
                               f"script's t*={script_t} (tolerance {line.tolerance:.3g})")


def synchronized(fn, device: str):
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def backend_params(devices):
    return [
        pytest.param(device, case, name, method, direction, id=f"{device}-{case}-{name}-{method}")
        for device in devices
        for case in CASES
        for name, status in available_backends(device).items()
        if status is True
        for method, direction in SEARCHES
    ]


BASELINE_PARAMS = [
    pytest.param(device, case, name, id=f"{device}-{case}-{name}")
    for device in DEVICES for case in CASES for name in BASELINES
]


@pytest.mark.parametrize("device,case,backend,method,direction", backend_params(DEVICES))
def test_line_search(benchmark, device, case, backend, method, direction):
    args = problem(case, device).args()
    fn = synchronized(lambda: line_search(*args, method=method, direction=direction, backend=backend, **SCRIPT),
                      device)
    result = benchmark.pedantic(fn, warmup_rounds=1, rounds=10)
    assert_as_good_as_the_script(case, device, float(result.step), direction, method)
    assert float(result.loss) <= float(result.loss0), (float(result.loss), float(result.loss0))


@pytest.mark.parametrize("device,case,backend,method,direction", backend_params([d for d in DEVICES if d == "cuda"]))
def test_graph_replay(benchmark, device, case, backend, method, direction):
    graph = capture(problem(case, device), backend, method, direction)
    benchmark.pedantic(synchronized(graph.replay, device), warmup_rounds=1, rounds=10)
    result = graph.result
    assert_as_good_as_the_script(case, device, float(result.step), direction, method)
    assert float(result.loss) <= float(result.loss0), (float(result.loss), float(result.loss0))


@pytest.mark.parametrize("device,case,name", BASELINE_PARAMS)
def test_baseline(benchmark, device, case, name):
    fn = synchronized(baselines(problem(case, device))[name], device)
    out = benchmark.pedantic(fn, warmup_rounds=1, rounds=10)  # the warm-up call compiles for "compile"
    t_star, candidates = searched(name, out)
    assert_as_good_as_the_script(case, device, t_star, "raw", "bracket_grid")
    # The script scores l(0), at least one bracket candidate and the grid, and never more than the fixed
    # count that the sync-free drivers score (the whole bracket at once).
    assert 2 + SCRIPT["partitions"] <= candidates <= evaluations(plan()), candidates
    if name != "script":
        assert float(out.loss) <= float(out.loss0), (float(out.loss), float(out.loss0))
