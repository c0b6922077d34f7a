"""The targets of a GPU check judged on the JSON files its parts write (``pof_fast.bench.targets``,
``benchmarks/gpu/judge.py``), on made-up files: each target once met and once missed."""
import json
import os
import subprocess
import sys

import pytest

from pof_fast.bench.baselines import BASELINES
from pof_fast.bench.report import format_target
from pof_fast.bench.targets import auto_backend, judge_results, judge_step, load_results, trainer_split
from repo_path import ROOT

CUDA_RUN = {"torch": True, "triton": True, "cpp": "does not handle cuda tensors", "cuda": True}


def row(kind, name, method, median_s, speedup=1.0, x_floor=1.0, peak_bytes=0):
    return dict(kind=kind, name=name, method=method, median_s=median_s, x_floor=x_floor, peak_bytes=peak_bytes,
                speedup={b: speedup for b in BASELINES} if isinstance(speedup, float) else speedup)


def bench(cases, backends=CUDA_RUN):
    return {"device": "cuda", "env": {"backends": backends}, "cases": cases}


def by_key(targets):
    return {(t["case"], t["baseline"], t["backend"], t["timing"]): t for t in targets}


def test_a_to_c_speedups_are_judged_with_the_auto_backend_of_the_run():
    """>= 30x the loop and >= 1.3x torch.compile: A meets both, B misses both, as a call and as a graph replay."""
    met = dict(script=31.0, eager=10.0, compile=1.4)
    missed = dict(script=29.0, eager=10.0, compile=1.2)
    cases = {name: {"rows": [row(kind, "cuda", "bracket_grid", 1e-4, s) for kind in ("backend", "graph")]}
             for name, s in (("A", met), ("B", missed))}
    got = by_key(judge_results([("bench_abc.json", bench(cases))]))
    for timing in ("call", "graph"):
        for baseline in ("script", "compile"):
            assert got["A", baseline, "cuda", timing]["met"], (baseline, timing)
            assert not got["B", baseline, "cuda", timing]["met"], (baseline, timing)
    assert got["A", "script", "cuda", "call"]["value"] == 31.0
    assert got["A", "script", "cuda", "call"]["source"] == "bench_abc.json"
    # a machine whose cuda backend did not load: "auto" was triton there, whatever this machine picks
    no_cuda = dict(CUDA_RUN, cuda="pof_fast._C is not built")
    assert auto_backend("cuda", no_cuda) == "triton" and auto_backend("cuda", CUDA_RUN) == "cuda"
    judged = judge_results([("x.json", bench(cases, no_cuda))])
    assert {t["backend"] for t in judged if t["baseline"] == "eager"} == {"triton"}


def test_case_d_floor_memory_and_newton_targets():
    """cuda bracket_grid <= 2x its floor with <= two 16-bit [n, C] arrays; triton (logits-free) <= 3x the floor and
    no [n, C] array; newton <= 1.5x bracket_grid on each case."""
    n, classes, dim = 4096, 128256, 4096  # case D: one 16-bit [n, C] array is 1 GiB
    array, returned = n * classes * 2, classes * dim * 4 + classes * 4

    def case_d(cuda_x_floor, cuda_arrays, triton_s, triton_extra, newton_s):
        return {"n": n, "classes": classes, "dim": dim, "rows": [
            row("backend", "cuda", "bracket_grid", 1.0, x_floor=cuda_x_floor,
                peak_bytes=int(returned + cuda_arrays * array)),
            row("backend", "cuda", "newton", newton_s),
            row("backend", "triton", "bracket_grid", triton_s, peak_bytes=returned + classes * dim * 2 + triton_extra),
            row("backend", "triton", "newton", triton_s * newton_s),
            row("floor", "cuda", "floor", 0.5), row("floor", "triton", "floor", 5.0)]}

    good = by_key(judge_results([("d.json", bench({"D": case_d(1.9, 2, 1.4, 0, 1.4)}))]))
    bad = by_key(judge_results([("d.json", bench({"D": case_d(2.1, 2.5, 1.6, array, 1.6)}))]))
    for key in (("D", "floor", "cuda", "call"), ("D", "floor", "triton", "call"), ("D", "memory", "cuda", "call"),
                ("D", "memory", "triton", "call"), ("D", "bracket_grid", "cuda", "call"),
                ("D", "bracket_grid", "triton", "call")):
        assert good[key]["met"] and not bad[key]["met"], key
    assert good["D", "floor", "triton", "call"]["value"] == pytest.approx(1.4 / 0.5)  # the case's lowest floor
    assert bad["D", "memory", "cuda", "call"]["value"] == pytest.approx(2.5)


def test_newton_is_judged_on_every_case():
    cases = {name: {"rows": [row("backend", "cuda", "bracket_grid", 1e-4), row("backend", "cuda", "newton", s)]}
             for name, s in (("A", 1.4e-4), ("C", 1.6e-4))}
    got = by_key(judge_results([("abc.json", bench(cases))]))
    assert got["A", "bracket_grid", "cuda", "call"]["met"]
    assert not got["C", "bracket_grid", "cuda", "call"]["met"]
    assert got["C", "bracket_grid", "cuda", "call"]["value"] == pytest.approx(1.6)
    missing = got["A", "bracket_grid", "triton", "call"]  # no triton rows: nan, never met
    assert missing["value"] != missing["value"] and not missing["met"]


def step_result(sgd_s, search_s, gpu=True):
    env = {"gpu": "NVIDIA H200"} if gpu else {}
    return {"model": "wrn-28-10" if gpu else "wrn-10-2", "backend": "cuda" if gpu else "cpp", "env": env,
            "search_share_of_sgd": search_s / sgd_s,
            "times": {"sgd": {"median_s": sgd_s}, "search": {"median_s": search_s}}}


def test_search_share_of_a_training_step():
    """<= 2% of a WRN-28-10 SGD step on a GPU; the CPU's WRN-10-2 keeps its 5%."""
    met, missed = judge_step(step_result(0.020, 0.0003)), judge_step(step_result(0.020, 0.0005))
    assert met["met"] and met["value"] == pytest.approx(0.015) and met["case"] == "wrn-28-10 step"
    assert not missed["met"] and missed["value"] == pytest.approx(0.025)
    assert judge_step(step_result(1.0, 0.04, gpu=False))["met"]
    assert not judge_step(step_result(1.0, 0.06, gpu=False))["met"]


def lm_step_result():
    """benchmarks/lm_step.py's JSON: the plain and PoF steps, and the parts timed alone."""
    args = dict(vocab=128256, hidden=2048, layers=4, seq=1024, batch=4, bf16=True, method="newton", device="cuda")
    seconds = {"plain step": 0.200, "pof step": 0.260, "search forward": 0.040, "search": 0.015}
    return {"environment": {"backends": CUDA_RUN}, "args": args, "seconds": seconds, "plain_steps": [0.2],
            "pof_steps": [0.26]}


def test_trainer_step_split_is_reported_without_a_threshold():
    (split,) = trainer_split(lm_step_result())
    assert split["met"] is None and split["value"] == pytest.approx(1.3) and split["backend"] == "cuda"
    assert "pof step, method newton 260.0 ms = 1.30x the plain step (200.0 ms)" in split["what"]
    assert "alone: search forward 40.0 ms; search 15.0 ms" in split["what"] and "vocabulary 128256" in split["what"]
    assert format_target(split).endswith(": reported")
    assert format_target(dict(split, met=False)).endswith(": MISSED")


def test_trainer_split_of_each_search_mode():
    """lm_step.py with several methods and search modes (--method, --search): one row per PoF run."""
    result = lm_step_result()
    result["seconds"] = {"plain": 0.2, "pof newton fresh": 0.3, "pof newton previous": 0.22}
    result["parts"] = {"search forward": 0.04, "search newton": 0.015}
    rows = {t["what"].split(": ")[1].split(" ")[2]: t for t in trainer_split(result)}
    assert set(rows) == {"fresh", "previous"}
    assert rows["previous"]["value"] == pytest.approx(1.1) and rows["fresh"]["value"] == pytest.approx(1.5)
    assert "alone: search forward 40.0 ms; search newton 15.0 ms" in rows["fresh"]["what"]


def test_files_and_folders_of_a_run(tmp_path):
    """A folder's JSON files are judged by kind; a part's record and a sweep are left out."""
    files = {"step.json": step_result(0.02, 0.0003), "lm_step.json": lm_step_result(),
             "part2.json": {"part": 2, "stages": [], "seconds": 3}, "sweep.json": {"meta": {}, "rows": []},
             "targets.json": [{"case": "A"}],
             "bench_abc.json": bench({"A": {"rows": [row("backend", "cuda", "bracket_grid", 1e-4, 40.0)]}})}
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    results = load_results([tmp_path])
    assert [os.path.basename(name) for name, _ in results] == sorted(files)
    judged = judge_results(results)
    assert {os.path.basename(t["source"]) for t in judged} == {"step.json", "lm_step.json", "bench_abc.json"}
    # the command prints every target with its file, and writes them
    env = {k: v for k, v in os.environ.items() if k != "POF_FAST_REQUIRE_EXT"}  # it loads no extension
    out = tmp_path / "targets.out"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "judge.py"), str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(judged) + 1
    assert "target wrn-28-10 step: the search with the default checks <= 2% of an SGD step (cuda): 1.50%: met  " \
           "[step.json]" in lines
    assert lines[-1] == f"{sum(t['met'] is True for t in judged)} met, {sum(t['met'] is False for t in judged)} " \
                        "missed, 1 reported"
    assert len(json.loads(out.read_text())) == len(judged)
