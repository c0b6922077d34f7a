"""Smoke test of the search benchmark: ``--quick`` on case A must give a complete, consistent JSON."""
import json

import torch

from pof_fast.cli import bench


def test_quick_bench_json_has_every_backend_and_baseline(tmp_path):
    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core runner, two OpenMP threads stall ~0.2 s per parallel call
        assert bench.main(["--quick", "--threads", "1", "--cases", "A", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(path.read_text())
    assert set(result["cases"]) == {"A"}
    assert result["cases"]["A"]["failed"] == {}
    rows = result["cases"]["A"]["rows"]
    expected = {(name, "bracket_grid") for name in bench.BASELINES}
    running = [name for name, status in bench.available_backends("cpu").items() if status is True]
    expected |= {(name, method) for name in running for method, _ in bench.SEARCHES}
    expected |= {(name, "floor") for name in running}
    assert {(row["name"], row["method"]) for row in rows} == expected
    for row in rows:
        assert row["median_s"] > 0 and row["p20_s"] > 0, row
        assert row["candidates"] > 0 and row["peak_bytes"] >= 0, row
        if row["kind"] == "floor":  # timed against itself; the same candidates as its bracket_grid search
            assert row["x_floor"] == 1.0, row
            search = next(r for r in rows if r["name"] == row["name"] and r["method"] == "bracket_grid")
            assert row["candidates"] == search["candidates"] and search["x_floor"] > 0, (row, search)
            continue
        assert row["agrees"], row
        assert row.get("same_point", True), row
    assert next(row for row in rows if row["name"] == "compile")["compile_s"] > 0
    assert {t["baseline"] for t in result["targets"]} == {"script"}


def test_floor_target_is_judged_on_the_auto_bracket_grid_row():
    """cuda targets include `within 2x of the floor`; a missing row is nan and never met."""
    auto = bench.dispatch.resolve("auto", torch.device("cuda")).name  # torch on a machine without a GPU

    def row(x_floor, method="bracket_grid"):
        return dict(kind="backend", name=auto, method=method, x_floor=x_floor,
                    speedup={b: 40.0 for b in bench.BASELINES}, peak_bytes=0)

    cases = {"A": {"rows": [row(1.5)]}, "B": {"rows": [row(2.5)]}, "C": {"rows": [row(1.0, "newton")]}}
    floor = {t["case"]: t for t in bench.judge_targets("cuda", cases) if t["baseline"] == "floor"}
    assert floor["A"]["met"] and floor["A"]["value"] == 1.5
    assert not floor["B"]["met"]
    assert not floor["C"]["met"] and floor["C"]["value"] != floor["C"]["value"]  # nan: no bracket_grid row
