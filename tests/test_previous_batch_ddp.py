"""PoFCallback(search_data="previous") under torchrun, 2 gloo processes on the CPU (tests/hf_ddp_worker.py): every
step after the first searches the union of the ranks' previous training batches, so both ranks perturb the head
identically; checked against a hand call of line_search on the two ranks' recorded rows put together."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_path import child_env

import pof_fast

pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORKER = Path(__file__).resolve().parent / "hf_ddp_worker.py"


def test_trainer_under_torchrun_searches_the_union_of_the_ranks_previous_batches(tmp_path):
    env = child_env({**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path), "previous"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                                  f"stderr:\n{done.stderr[-3000:]}")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["process_group"] and r["head_is_theta0"] for r in ranks)
    assert ranks[0]["searches"] == ranks[1]["searches"] and len(ranks[0]["searches"]) == 3
    assert ranks[0]["extractor"] == ranks[1]["extractor"]
    assert all(len(s["recorded"]) == 3 for s in saved)  # one training batch per step and rank
    theta0 = saved[0]["theta0"]
    for step in (1, 2):
        rows = [s["recorded"][step - 1] for s in saved]
        assert not torch.equal(rows[0][1], rows[1][1])  # each rank recorded its own batch
        want = pof_fast.line_search(torch.cat([f for f, _ in rows]), theta0, None, torch.cat([t for _, t in rows]))
        t_star, _, grad_norm = ranks[0]["searches"][step]
        assert t_star == pytest.approx(float(want.step), rel=1e-4) and grad_norm == pytest.approx(
            float(want.grad_norm), rel=1e-5)
