"""One benchmark run: every baseline, backend search, graph replay and floor on each case.

Rows (one dict each, the JSON's ``rows``): ``kind`` is ``baseline``, ``backend`` (the public call
``pof_fast.line_search(..., backend=NAME, validate=False)``), ``graph`` (that call captured in a CUDA
graph and replayed; CUDA only, cases in :data:`~.graphs.GRAPH_CASES`) or ``floor``. Every row has its
time (median and 20th/80th percentiles), candidates, peak extra memory, t*, speed-up over each baseline
and time over its backend's floor; every row but the floors has its agreement with the script.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .. import dispatch
from ..backends.base import Backend
from ..search import line_search
from .agreement import annotate
from .baselines import BASELINES, baselines, searched
from .cases import CASES, SCRIPT, SEARCHES, Case, Problem, case_for
from .environment import environment
from .floors import floor_call
from .graphs import GRAPH_CASES, capture
from .memory import peak_extra_bytes
from .report import format_case, format_target, format_time, label
from .targets import judge_targets
from .timing import synchronize, time_call

__all__ = ["NOT_TIMED", "available_backends", "bench_case", "budget_s", "run"]

# Backends that may run on a device but whose times there mean nothing.
NOT_TIMED = {("triton", "cpu"): "on the CPU only in Triton's interpreter, a test aid: not timed"}
Log = Callable[[str], None]


def available_backends(device: str) -> Dict[str, Union[bool, str]]:
    """``{name: True}`` for the backends that run on ``device``, ``{name: reason}`` for the others."""
    out: Dict[str, Union[bool, str]] = {}
    for name, status in dispatch.backends().items():
        if status is True and (name, device) in NOT_TIMED:
            status = NOT_TIMED[name, device]
        elif status is True:
            loaded = dispatch.load(name)
            if isinstance(loaded, Backend) and not loaded.handles(torch.device(device)):
                status = f"does not handle {device} tensors"
        out[name] = status
    return out


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


class _Rows:
    """The rows of one case as they are timed, and the reasons of those that failed."""

    def __init__(self, device: str, budget_s: float, log: Log) -> None:
        self.device, self.budget_s, self.log = device, budget_s, log
        self.rows: List[Dict[str, Any]] = []
        self.failed: Dict[str, str] = {}

    def time(self, kind: str, name: str, method: str, direction: str, fn: Callable[[], Any], candidates: int,
             t_star: float, peak_bytes: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
        """Time ``fn`` and add its row (``peak_bytes``: measured on one call of ``fn`` unless given)."""
        timing = time_call(fn, self.device, self.budget_s)
        if peak_bytes is None:
            peak_bytes = peak_extra_bytes(fn, self.device)
        row = dict(kind=kind, name=name, method=method, direction=direction, median_s=timing.median,
                   p20_s=timing.p20, p80_s=timing.p80, repeats=timing.repeats, candidates=candidates,
                   peak_bytes=peak_bytes, t_star=t_star, **extra)
        self.rows.append(row)
        self.log(f"  {label(row)} {method}: {format_time(timing.median)}")
        return row

    def attempt(self, what: str, add: Callable[[], Any]) -> None:
        """Run ``add`` now; an error it raises is kept as the reason ``what`` failed."""
        try:
            add()
        except Exception as exc:
            self.failed[what] = _reason(exc)


def _baseline_rows(rows: _Rows, problem: Problem) -> float:
    """Time the three baselines; returns the script's t*."""
    fns = baselines(problem)

    def add(name: str, out: Any, **extra: Any) -> float:
        t_star, candidates = searched(name, out)
        rows.time("baseline", name, "bracket_grid", "raw", fns[name], candidates, t_star, **extra)
        return t_star

    script_t = add("script", fns["script"]())
    add("eager", fns["eager"]())

    def compiled() -> None:
        start = time.perf_counter()
        out = fns["compile"]()
        synchronize(rows.device)
        add("compile", out, compile_s=time.perf_counter() - start)  # the first call compiles: reported, not timed

    rows.attempt("compile", compiled)  # torch.compile breaks on some stacks: report it, time the rest
    return script_t


def _call_row(rows: _Rows, problem: Problem, name: str, method: str, direction: str) -> None:
    search = functools.partial(line_search, *problem.args(), method=method, direction=direction, backend=name,
                               validate=False, **SCRIPT)
    result = search()
    rows.time("backend", name, method, direction, search, result.evaluations, float(result.step))


def _graph_row(rows: _Rows, problem: Problem, name: str, method: str, direction: str) -> None:
    graph = capture(problem, name, method, direction)
    rows.time("graph", name, method, direction, graph.replay, graph.result.evaluations, float(graph.result.step),
              peak_bytes=graph.pool_bytes)


def _floor_row(rows: _Rows, problem: Problem, name: str) -> None:
    search = next((r for r in rows.rows if r["kind"] == "backend" and r["name"] == name
                   and r["method"] == "bracket_grid"), None)
    if search is not None:
        candidates = search["candidates"]
        rows.time("floor", name, "floor", "raw", floor_call(problem, name, candidates), candidates, float("nan"))


def _in_order(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Baselines, then each backend's rows: each search as a call then as a graph replay, then its floor."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    methods = [m for m, _ in SEARCHES] + ["floor"]
    kinds = ("baseline", "backend", "graph", "floor")
    return sorted(rows, key=lambda r: (names.index(r["name"]), methods.index(r["method"]), kinds.index(r["kind"])))


def budget_s(device: str, quick: bool) -> float:
    """Seconds of timed repeats per row."""
    return (0.05 if quick else 0.3) if device == "cuda" else (0.1 if quick else 1.5)


def bench_case(case: Case, device: str, quick: bool, log: Log = lambda line: None) -> Dict[str, Any]:
    """Every baseline and every available backend on one case. ``log`` gets one progress line per timed row."""
    problem = Problem.make(case, device)
    rows = _Rows(device, budget_s(device, quick), log)
    script_t = _baseline_rows(rows, problem)
    status = available_backends(device)
    running = [n for n, s in status.items() if s is True]
    for name in running:  # an error fails its row only: one broken backend must not hide the others' numbers
        for method, direction in SEARCHES:
            rows.attempt(f"{name} {method}", lambda: _call_row(rows, problem, name, method, direction))
        # e.g. [n, C] buffers that do not fit fail the floor: the search rows stand without it
        rows.attempt(f"{name} floor", lambda: _floor_row(rows, problem, name))
    if device == "cuda" and case.name in GRAPH_CASES:
        # After every plain row, so that a capture that fails cannot disturb them.
        for name in running:
            for method, direction in SEARCHES:
                rows.attempt(f"{name} {method} graph", lambda: _graph_row(rows, problem, name, method, direction))
    ordered = _in_order(rows.rows)
    annotate(ordered, problem, script_t)
    medians = {r["name"]: r["median_s"] for r in ordered if r["kind"] == "baseline"}
    floors = {r["name"]: r["median_s"] for r in ordered if r["kind"] == "floor"}
    for row in ordered:
        row["speedup"] = {b: medians[b] / row["median_s"] if b in medians else float("nan") for b in BASELINES}
        row["x_floor"] = row["median_s"] / floors[row["name"]] if row["name"] in floors else float("nan")
    return dict(asdict(case), script_t=script_t, skipped={n: s for n, s in status.items() if s is not True},
                failed=rows.failed, rows=ordered)


def run(device: str = "cpu", cases: Sequence[Union[str, Case]] = tuple(CASES), quick: bool = False,
        json_path: Optional[str] = None, plot_path: Optional[str] = None,
        log: Log = lambda line: None) -> Dict[str, Any]:
    """Benchmark ``cases`` (names of SPEC section 5, or :class:`Case` objects) on ``device``.

    ``log`` gets the progress lines, each case's table when it is done, and the targets at the end. The
    JSON and the plot (if asked) are rewritten after every case, so a run stopped by a time limit keeps
    the cases it finished.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch.cuda.is_available() is False")
    chosen = [c if isinstance(c, Case) else case_for(c, device) for c in cases]
    results: Dict[str, Any] = dict(device=device, quick=quick, env=environment(device), cases={}, targets=[])
    for case in chosen:
        results["cases"][case.name] = bench_case(case, device, quick, log)
        results["targets"] = judge_targets(device, results["cases"])
        log(format_case(results["cases"][case.name]) + "\n")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(results, fh, indent=1)
        if plot_path:
            try:
                from .plot import plot

                plot(results, plot_path)
            except ImportError as exc:
                log(f"no plot written: {exc} (pip install matplotlib)")
                plot_path = None
    for target in results["targets"]:
        log(format_target(target))
    return results
