"""``pof-fast posttrain`` under torchrun: 2 processes on gloo (CPU), the embedded digits data.

One run of 1 epoch, resumed to 2 epochs, compared with an uninterrupted 2-epoch run, then checked: rank 0 alone
wrote the run folder (one metrics file, each epoch once), the head is the pretrained one bit for bit (theta0),
the ranks' feature extractors are identical, each rank trained on its own half of the rows, and PoF searched the
union of the ranks' search batches (the same mean t* on both ranks although their own data, and so their local
losses, differ). The ranks' own numbers come from the test hook of :mod:`pof_fast.training.world`
(``POF_FAST_RANK_DUMP``).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from repo_path import child_env

from pof_fast.cli.main import main
from pof_fast.models import split_model
from pof_fast.training import PostTrainConfig, load_classifier, load_run_data
from pof_fast.training.world import DUMP_VARIABLE

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

FAST = ["--no-progress", "--threads", "1", "--device", "cpu"]
BATCH = 64


def torchrun(args, env, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pof_fast", "posttrain", *args]
    # cwd outside the repository and the session's package on PYTHONPATH: the children run the pof_fast this session
    # runs (e.g. the installed one, with its extension), not the source folder python -m finds from the root.
    done = subprocess.run(cmd, env=child_env(env), cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                                  f"stderr:\n{done.stderr[-3000:]}")
    return done.stdout


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_time(lines):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in lines]


def same_models(a, b):
    sa, sb = torch.load(a)["model"], torch.load(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def head_of(path):
    model, _ = load_classifier(str(path))
    return split_model(model)[1]


def test_posttrain_under_torchrun_resumes_and_keeps_ranks_identical(tmp_path):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--epochs", "1", "--batch-size", "128", "--out", str(pre), *FAST]) == 0
    out, dump = tmp_path / "pof", tmp_path / "ranks"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{DUMP_VARIABLE: str(dump)})
    common = ["--batch-size", str(BATCH), "--search-batch-size", "64", *FAST]
    printed = torchrun(["--checkpoint", str(pre / "model.pt"), "--epochs", "1", "--out", str(out), *common], env,
                       tmp_path)
    assert printed.count("posttrain: PoF on digits") == 1  # rank 0 alone prints
    printed = torchrun(["--resume", "--epochs", "2", "--out", str(out), *common], env, tmp_path)
    assert "resumed after epoch 1" in printed
    whole = tmp_path / "whole"  # the same run, never interrupted
    torchrun(["--checkpoint", str(pre / "model.pt"), "--epochs", "2", "--out", str(whole), *common],
             dict(env, **{DUMP_VARIABLE: ""}), tmp_path)

    # rank 0 alone wrote the run folder: one metrics file, each epoch once
    assert sorted(p.parent.name for p in tmp_path.rglob("metrics.jsonl")) == ["pof", "pre", "whole"]
    lines = metrics(out)
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    assert without_time(lines) == without_time(metrics(whole))  # resumed exactly
    assert same_models(out / "model.pt", whole / "model.pt")
    assert not list(out.glob("*.tmp"))

    # the checkpoint loads; the head is theta0, bit for bit
    head, theta0 = head_of(out / "model.pt"), head_of(pre / "model.pt")
    assert torch.equal(head.weight, theta0.weight) and torch.equal(head.bias, theta0.bias)

    # the ranks' feature extractors are identical (and moved), and equal to the saved model's
    ranks = [torch.load(dump / f"rank{r}.pt") for r in (0, 1)]
    phi0, phi1 = ranks[0]["phi"], ranks[1]["phi"]
    assert phi0.keys() == phi1.keys() and all(torch.equal(phi0[k], phi1[k]) for k in phi0)
    saved = split_model(load_classifier(str(out / "model.pt"))[0])[0].state_dict()
    start = split_model(load_classifier(str(pre / "model.pt"))[0])[0].state_dict()
    assert all(torch.equal(saved[k], phi0[k]) for k in phi0)
    assert not all(torch.equal(start[k], phi0[k]) for k in phi0)

    # each rank its own half of the rows; the searches distributed (the same t* from different local data)
    n = len(load_run_data(PostTrainConfig()).train)
    (e0,), (e1,) = ranks[0]["epochs"], ranks[1]["epochs"]  # the resumed process ran epoch 2
    assert e0["epoch"] == e1["epoch"] == 2
    assert e0["steps"] == e1["steps"] == (n // 2) // BATCH == lines[2]["steps"]
    assert e0["rows"] == e1["rows"] == e0["steps"] * BATCH
    assert e0["local_train_loss"] != e1["local_train_loss"]
    assert e0["step"] == e1["step"] == lines[2]["step"]
