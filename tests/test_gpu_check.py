"""The GPU check's parts (``benchmarks/gpu/``), checked without a GPU: each part's stages fit one device call, and
the stage machinery records what ran (ok, failed, timed out, side by side), as it goes."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from repo_path import ROOT

GPU = os.path.join(ROOT, "benchmarks", "gpu")
PART_LIMIT_S = 240  # a part fits 4 minutes of the lent GPU's 15 (docs/gpu-check.md)
CALL_LIMIT_S = 600  # one device call


def bash(script, **env):
    """Run ``script`` with bash in the repository root; the environment without POF_FAST_REQUIRE_EXT (the tree's
    pof_fast of a fresh clone has no extension: the CPU rehearsal falls back to the torch backend)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("POF_FAST_REQUIRE_EXT", "OUT", "STAGES", "DRY_RUN", "DEVICE", "BUILD")}
    env = {**base, "PYTHON": sys.executable, **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", script], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)


def grace_s():
    with open(os.path.join(GPU, "lib.sh")) as fh:
        return int(re.search(r"^GRACE_S=(\d+)$", fh.read(), re.M)[1])


def critical_path(plan):
    """The bound of a dry run's plan, worked out here: stages one after another add their limit and the kill grace;
    side-by-side stages until a wait add the longest of theirs; the build that runs only when needed adds nothing."""
    clock, side = 0, []
    for line in plan.splitlines():
        stage = re.match(r"^  (\w+) +(\d+) s  (.*)$", line)
        if line.startswith("  -- wait"):
            clock, side = clock + max(side, default=0), []
        elif stage and stage[3].startswith("(side by side)"):
            side.append(int(stage[2]) + grace_s())
        elif stage and not stage[3].startswith("only where"):
            clock += int(stage[2]) + grace_s()
    return clock + max(side, default=0)


@pytest.mark.parametrize("part", [1, 2, 3])
def test_each_part_fits_one_device_call(part, tmp_path):
    """The dry run's bound (limits plus kill grace, side-by-side stages counted once) is under 4 minutes, and under a
    device call's 10 with the build a fresh machine may need."""
    done = bash(os.path.join(GPU, f"part{part}.sh"), DRY_RUN=1, OUT=tmp_path / "out")
    assert done.returncode == 0, done.stdout
    stages = dict(re.findall(r"^  (\w+) +(\d+) s  ", done.stdout, re.M))
    assert len(stages) >= 4 and all(int(limit) > 0 for limit in stages.values()), done.stdout
    bound = int(re.search(rf"^part {part} bound: (\d+) s", done.stdout, re.M)[1])
    assert bound == critical_path(done.stdout) < PART_LIMIT_S, done.stdout
    with_build = re.search(rf"^part {part} bound with the build: (\d+) s", done.stdout, re.M)
    assert "build" in stages and (with_build is None) == (part == 1), done.stdout  # 2 and 3 build only when needed
    if with_build:
        assert int(with_build[1]) == bound + int(stages["build"]) + grace_s() < CALL_LIMIT_S
    assert not (tmp_path / "out").exists()  # nothing ran


def test_part_three_calls_the_plan_sweep_as_agreed():
    done = bash(os.path.join(GPU, "part3.sh"), DRY_RUN=1)
    assert "benchmarks/plan_sweep.py --device cuda --json $OUT/plan_sweep.json" in done.stdout


FAKE_PART = """
. {lib}
part_begin 9 "a made-up part"
stage ok 5 part9.log echo hello
stage fails 5 part9.log sh -c 'echo oops; exit 3'
stage slow 1 part9.log sleep 30
stage_bg side_a 5 side.log sh -c 'sleep 2; echo a'
stage_bg side_b 5 side.log echo b
stage_wait
stage quoted 5 part9.log printf '%s\\n' 'an "odd" \\ argument'
[ -z "${{CUT:-}}" ] || kill -9 $$
part_end
"""


@pytest.fixture
def fake_part(tmp_path):
    path = tmp_path / "part9.sh"
    path.write_text(FAKE_PART.format(lib=os.path.join(GPU, "lib.sh")))
    out = tmp_path / "out"
    out.mkdir()
    return str(path), out


def test_stages_are_recorded_with_their_status_and_output(fake_part):
    script, out = fake_part
    done = bash(script, OUT=out)
    assert done.returncode == 0, done.stdout
    record = json.loads((out / "part9.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert [s["name"] for s in record["stages"]][:3] == ["ok", "fails", "slow"]
    assert set(stages) == {"ok", "fails", "slow", "side_a", "side_b", "quoted"}
    assert (stages["ok"]["status"], stages["ok"]["exit"]) == ("ok", 0)
    assert (stages["fails"]["status"], stages["fails"]["exit"]) == ("failed", 3)
    assert (stages["slow"]["status"], stages["slow"]["exit"]) == ("timed out", 124)
    assert stages["slow"]["seconds"] <= 3 and stages["side_a"]["status"] == stages["side_b"]["status"] == "ok"
    assert shlex.split(stages["quoted"]["command"]) == ["printf", "%s\\n", 'an "odd" \\ argument']
    assert record["finished"] and record["bound_s"] == 7 + 7 + 3 + 7 + 7  # side_a and side_b count once
    log = (out / "part9.log").read_text()
    assert "hello" in log and "oops" in log and 'an "odd" \\ argument' in log
    assert "stage fails: failed (exit 3)" in log and "stage slow: timed out (exit 124)" in done.stdout
    side = (out / "side.log").read_text().splitlines()
    assert "a" in side and "b" in side and side.index("b") < side.index("a")  # b ended while a slept: side by side
    assert sorted(p.name for p in out.iterdir()) == ["part9.json", "part9.log", "side.log"]


def test_a_part_cut_off_keeps_what_it_recorded(fake_part):
    script, out = fake_part
    bash(script, OUT=out, CUT=1)
    record = json.loads((out / "part9.json").read_text())
    assert not record["finished"] and len(record["stages"]) == 6


def test_stages_selects_what_runs(fake_part):
    script, out = fake_part
    done = bash(script, OUT=out, STAGES="fails,side_b")
    assert done.returncode == 0, done.stdout
    record = json.loads((out / "part9.json").read_text())
    assert sorted(s["name"] for s in record["stages"]) == ["fails", "side_b"]


def test_a_stage_of_a_part_rehearsed_on_the_cpu(tmp_path):
    """Part 3's LM-head stage, its command as on the GPU but on the CPU and small sizes, writes its JSON."""
    done = bash(os.path.join(GPU, "part3.sh"), OUT=tmp_path, DEVICE="cpu", BUILD=0, STAGES="lm_head")
    assert done.returncode == 0, done.stdout
    record = json.loads((tmp_path / "part3.json").read_text())
    assert [(s["name"], s["status"]) for s in record["stages"]] == [("lm_head", "ok")], done.stdout
    result = json.loads((tmp_path / "lm_head.json").read_text())
    assert result["args"]["device"] == "cpu" and len(result["rows"]) == 3
