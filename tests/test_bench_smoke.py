"""Smoke tests of the search benchmark (``pof_fast.bench``, ``pof-fast bench``) on a tiny head.

One quick CPU run of every baseline, backend and floor must give a complete JSON whose numbers agree with
each other and whose searches agree with the reference script; the targets and the table are checked on
made-up rows (CUDA graph rows included); on a GPU, a captured search must rerun on new inputs.
"""
import json
import math

import pytest
import torch

from pof_fast import dispatch, line_search, reference
from pof_fast.bench import suite
from pof_fast.bench.baselines import BASELINES
from pof_fast.bench.cases import SCRIPT, SEARCHES, Case, Problem, plan
from pof_fast.bench.graphs import capture
from pof_fast.bench.report import format_case
from pof_fast.bench.targets import judge_targets
from pof_fast.cli import bench as command
from pof_fast.drivers import evaluations

TINY = Case("tiny", "odd sizes", 37, 19, 7, "float32")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(the JSON written, the lines logged) of one quick CPU run on TINY."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    lines = []
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core runner, two OpenMP threads stall ~0.2 s per parallel call
        torch.set_num_threads(1)
        suite.run("cpu", [TINY], quick=True, json_path=str(path), log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return json.loads(path.read_text()), lines


def running_backends(device):
    return [name for name, status in suite.available_backends(device).items() if status is True]


def test_every_baseline_backend_and_floor_has_a_row_and_a_table_line(tiny_run):
    result, lines = tiny_run
    assert result["device"] == "cpu" and result["env"]["torch"] == torch.__version__
    case = result["cases"]["tiny"]
    assert case["failed"] == {}
    assert set(case["skipped"]) == set(dispatch.backends()) - set(running_backends("cpu"))
    rows = case["rows"]
    expected = {(name, "bracket_grid") for name in BASELINES}
    expected |= {(name, method) for name in running_backends("cpu") for method, _ in SEARCHES}
    expected |= {(name, "floor") for name in running_backends("cpu")}
    assert sorted((r["name"], r["method"]) for r in rows) == sorted(expected)  # each once; no CUDA graph on the CPU
    table = next(line for line in lines if line.startswith("case tiny:")).splitlines()
    assert len([line for line in table if line.split()[0] in {r["name"] for r in rows}]) == len(rows)


def test_numbers_of_a_row_agree_with_each_other(tiny_run):
    rows = tiny_run[0]["cases"]["tiny"]["rows"]
    medians = {r["name"]: r["median_s"] for r in rows if r["kind"] == "baseline"}
    floors = {r["name"]: r["median_s"] for r in rows if r["kind"] == "floor"}
    for row in rows:
        assert 0 < row["p20_s"] <= row["median_s"] <= row["p80_s"], row
        assert row["repeats"] >= 3 and row["peak_bytes"] >= 0, row
        for baseline in BASELINES:
            assert math.isclose(row["speedup"][baseline], medians[baseline] / row["median_s"]), (row, baseline)
        if row["kind"] != "baseline":
            assert math.isclose(row["x_floor"], row["median_s"] / floors[row["name"]]), row
    compile_row = next(r for r in rows if r["name"] == "compile")
    assert compile_row["compile_s"] > 0


def test_candidates_are_the_searches_exact_counts(tiny_run):
    rows = tiny_run[0]["cases"]["tiny"]["rows"]
    for row in rows:
        if row["name"] == "script":  # l(0), the bracket up to its first rise, the grid
            assert 2 + SCRIPT["partitions"] <= row["candidates"] <= evaluations(plan()), row
        elif row["kind"] == "floor":  # the floor scores what its bracket_grid search scores
            assert row["candidates"] == evaluations(plan()), row
        else:
            searched = plan(row["method"], row["direction"])
            if row["method"] == "newton":  # the rounds x points of the backend's path (pof_fast.plans)
                p = Problem.make(TINY, "cpu")
                searched = dispatch.load(row["name"]).resolve_plan(searched, p.features, p.weight)
            assert row["candidates"] == evaluations(searched), row


def test_every_search_agrees_with_the_script(tiny_run):
    case = tiny_run[0]["cases"]["tiny"]
    p = Problem.make(TINY, "cpu")
    script_t64, _ = reference.script_search(p.features.double(), p.weight.double(), p.bias.double(), p.target,
                                            **SCRIPT)
    assert case["script_t"] == pytest.approx(script_t64, rel=1e-6)  # float32 picks the float64 grid point
    for row in (r for r in case["rows"] if r["kind"] != "floor"):
        assert row["agrees"] and row["loss_gap"] <= 1e-5, row
        if row["method"] == "bracket_grid":
            assert row["same_point"] and row["t_star"] == case["script_t"], row
        else:  # newton's minimiser is strictly better than a grid point here, in units of g/||g||
            assert row["loss_gap"] < 0 and row["direction"] == "normalized", row


def search_rows(auto, script_speedup):
    """A made-up case: ``auto``'s bracket_grid call at 40x everything, and its graph replay at ``script_speedup``."""
    def row(kind, speedup, x_floor):
        return dict(kind=kind, name=auto, method="bracket_grid", direction="raw", x_floor=x_floor,
                    speedup=speedup, peak_bytes=0)

    return {"n": 256, "dim": 640, "classes": 10, "rows": [row("backend", {b: 40.0 for b in BASELINES}, 1.5),
                                              row("graph", dict(script=script_speedup, eager=40.0, compile=2.0), 1.0)]}


def test_cuda_targets_are_judged_on_calls_and_graph_replays_of_cuda_and_auto():
    auto = dispatch.resolve("auto", torch.device("cuda")).name  # torch on a machine without a GPU
    cases = {"A": search_rows(auto, 20.0), "B": search_rows(auto, 31.0), "D": search_rows(auto, 31.0)}
    got = {(t["case"], t["baseline"], t["backend"], t["timing"]): t for t in judge_targets("cuda", cases)}
    judged = {("cuda", "call"), ("cuda", "graph"), (auto, "call"), (auto, "graph")}
    for baseline in ("script", "compile"):
        assert {k[2:] for k in got if k[:2] == ("A", baseline)} == judged
    assert {k[2:] for k in got if k[:2] == ("A", "eager")} == {(auto, "call")}
    # case D: speed-ups of the cuda call only (the LM-head targets), besides floors, newton and memory
    assert {k[1:] for k in got if k[0] == "D" and k[1] in ("script", "eager", "compile")} == {
        ("script", "cuda", "call"), ("compile", "cuda", "call")}
    assert got["A", "script", auto, "call"]["met"] and not got["A", "script", auto, "graph"]["met"]
    assert got["B", "script", auto, "graph"]["met"] and got["A", "compile", auto, "graph"]["met"]
    if auto != "cuda":  # no cuda rows: nan, never met
        missing = got["A", "script", "cuda", "graph"]
        assert missing["value"] != missing["value"] and not missing["met"]
    floor = got["A", "floor", auto, "call"]
    assert floor["met"] and floor["value"] == 1.5  # the call's floor ratio, not the graph's


def test_floor_target_is_judged_on_the_auto_bracket_grid_row():
    """cuda targets include `within 2x of the floor`; a missing row is nan and never met."""
    auto = dispatch.resolve("auto", torch.device("cuda")).name

    def row(x_floor, method="bracket_grid"):
        return dict(kind="backend", name=auto, method=method, x_floor=x_floor,
                    speedup={b: 40.0 for b in BASELINES}, peak_bytes=0)

    cases = {"A": {"rows": [row(1.5)]}, "B": {"rows": [row(2.5)]}, "C": {"rows": [row(1.0, "newton")]}}
    floor = {t["case"]: t for t in judge_targets("cuda", cases) if t["baseline"] == "floor"}
    assert floor["A"]["met"] and floor["A"]["value"] == 1.5
    assert not floor["B"]["met"]
    assert not floor["C"]["met"] and floor["C"]["value"] != floor["C"]["value"]  # nan: no bracket_grid row


def test_case_d_targets_judge_newton_and_memory_per_backend():
    """Newton within 1.5x of bracket_grid on its backend; triton within 3x of the lowest floor of the case; peak
    memory beyond the returned direction in 16-bit [n, C] arrays: two (plus an 8 MiB chunk) for cuda, none (plus a
    16-bit u_W) for triton."""
    n, classes, dim = 64, 1000, 32
    array, returned = n * classes * 2, classes * dim * 4 + classes * 4

    def row(name, method, median_s, peak_bytes):
        return dict(kind="backend", name=name, method=method, median_s=median_s, peak_bytes=peak_bytes,
                    x_floor=1.0, speedup={b: 10.0 for b in BASELINES})

    rows = [row("cuda", "bracket_grid", 1.0, returned + 2 * array + (1 << 23)), row("cuda", "newton", 1.4, 0),
            row("triton", "bracket_grid", 1.0, returned + classes * dim * 2 + 1), row("triton", "newton", 1.6, 0),
            dict(row("cuda", "floor", 0.4, 0), kind="floor"), dict(row("triton", "floor", 2.0, 0), kind="floor")]
    got = {(t["backend"], t["baseline"]): t for t in judge_targets("cuda", {"D": dict(
        n=n, classes=classes, dim=dim, rows=rows)})}
    # triton against the lowest floor of the case (cuda's 0.4 s: 2.5x), not its own (2.0 s)
    assert got["triton", "floor"]["value"] == pytest.approx(2.5) and got["triton", "floor"]["met"]
    assert got["cuda", "floor"]["value"] == 1.0  # cuda against its own floor: the row's x_floor
    assert got["cuda", "bracket_grid"]["met"] and got["cuda", "bracket_grid"]["value"] == pytest.approx(1.4)
    assert not got["triton", "bracket_grid"]["met"]
    assert got["cuda", "memory"]["met"] and got["cuda", "memory"]["value"] == pytest.approx(2 + (1 << 23) / array)
    assert not got["triton", "memory"]["met"]  # one byte over its 16-bit u_W


def test_table_puts_each_graph_replay_under_its_call_in_aligned_columns():
    def row(kind, name, method, median_s):
        return dict(kind=kind, name=name, method=method, direction="raw", median_s=median_s, p20_s=median_s,
                    p80_s=median_s, candidates=24, peak_bytes=0, t_star=20.0, agrees=True, loss_gap=0.0,
                    same_point=True, speedup={b: 1.0 for b in BASELINES}, x_floor=float("nan"))

    timed = [row("baseline", "script", "bracket_grid", 3e-3), row("backend", "triton", "bracket_grid", 1e-3),
             row("backend", "triton", "newton", 2e-3), row("floor", "triton", "floor", 5e-4),
             row("graph", "triton", "bracket_grid", 1e-4), row("graph", "triton", "newton", 2e-4)]
    ordered = suite._in_order(timed)
    assert [(r["kind"], r["method"]) for r in ordered[1:]] == [
        ("backend", "bracket_grid"), ("graph", "bracket_grid"), ("backend", "newton"), ("graph", "newton"),
        ("floor", "floor")]
    case = dict(name="A", n=256, dim=640, classes=10, dtype="float32", what="x", note="", rows=ordered,
                failed={}, skipped={})
    lines = format_case(case).splitlines()
    assert lines[4].startswith("triton graph bracket_grid") and "graph.replay()" in lines[-1]
    assert {line.index("bracket_grid") for line in lines[2:5]} == {lines[1].index("method")}


def test_command_hands_its_arguments_to_the_library(monkeypatch):
    calls = []
    monkeypatch.setattr(suite, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    threads = torch.get_num_threads()
    try:
        assert command.main(["--cases", "a, c", "--quick", "--threads", "1", "--json", "x.json"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert calls == [(("cpu", ["A", "C"], True, "x.json", None), {"log": print})]
    with pytest.raises(SystemExit, match="unknown case"):
        command.main(["--cases", "A,Z"])
    assert len(calls) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_graph_replay_reruns_the_search_on_new_inputs(backend):
    if backend not in running_backends("cuda"):
        pytest.skip(f"backend {backend} does not run here: {suite.available_backends('cuda')[backend]}")
    first, second = (Problem.make(TINY, "cuda", seed=seed) for seed in (0, 1))
    graph = capture(first, backend, "bracket_grid", "raw")
    for problem in (first, second):
        for static, new in zip(graph.inputs, problem.args()):
            static.copy_(new)
        graph.replay()
        expected = line_search(*problem.args(), method="bracket_grid", direction="raw", backend=backend,
                               validate=False, **SCRIPT)
        for what in ("step", "loss0", "loss", "grad_norm"):
            torch.testing.assert_close(getattr(graph.result, what), getattr(expected, what), msg=what)
