"""A Transformers Trainer with PoFCallback under torchrun: 2 gloo processes on the CPU (tests/hf_ddp_worker.py).

Every rank searches the union of the ranks' search batches (PoF built without a process group gets the world
group from the callback): t* and ||g|| are identical on both ranks although their own search batches differ, the
gamma streams (seeded differently on each rank) are agreed, and DDP keeps the extractors identical.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_path import child_env

pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORKER = Path(__file__).resolve().parent / "hf_ddp_worker.py"


def run_ranks(tmp_path, *worker_args):
    """The worker on 2 gloo ranks; each rank's rank{r}.json."""
    env = child_env({**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path), *worker_args]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                                  f"stderr:\n{done.stderr[-3000:]}")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_trainer_under_torchrun_searches_the_union_with_identical_steps_on_both_ranks(tmp_path):
    ranks = run_ranks(tmp_path)
    assert all(r["world"] == 2 and r["process_group"] and r["head_is_theta0"] for r in ranks)
    assert len(ranks[0]["searches"]) == 3 and ranks[0]["searches"] == ranks[1]["searches"]  # t*, gamma, ||g||
    assert ranks[0]["search_label_sums"] != ranks[1]["search_label_sums"]  # each rank searched its own rows
    assert ranks[0]["extractor"] == ranks[1]["extractor"]
