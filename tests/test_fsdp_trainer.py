"""A real Transformers Trainer with FSDP2 (``fsdp_config={"fsdp_version": 2}``) and PoFCallback: CUDA only, since
Accelerate enables FSDP only with an accelerator (the CPU tests run the callback's pieces under raw ``fully_shard``:
tests/test_sharded_heads.py). Runs tests/fsdp_trainer_worker.py under torchrun on every visible GPU (up to 2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_path import child_env

pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")
pytestmark = pytest.mark.cuda

WORKER = Path(__file__).resolve().parent / "fsdp_trainer_worker.py"


def test_trainer_with_fsdp2_perturbs_the_sharded_head_and_restores_it(tmp_path):
    world = min(2, torch.cuda.device_count())
    env = child_env({**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), str(WORKER),
           str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                                  f"stderr:\n{done.stderr[-3000:]}")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r in ranks:
        assert r["sharded"] and r["head_is_theta0"]
        assert len(r["searches"]) == 3 and all(t > 0 for t, _ in r["searches"])
        assert any(r["perturbed_forwards"])  # every step not skipped (capped) trained through a perturbed head
    assert all(r["searches"] == ranks[0]["searches"] for r in ranks)
