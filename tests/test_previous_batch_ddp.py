"""PoFCallback(search_data="previous") under torchrun, 2 gloo processes on the CPU (tests/hf_ddp_worker.py): every
step after the first searches the union of the ranks' previous training batches, so both ranks perturb the head
identically; checked against a hand call of line_search on the two ranks' recorded rows put together."""
import pytest
import torch
from test_transformers_ddp import pytestmark, run_ranks  # noqa: F401  (its skip marks apply here too)

import pof_fast


def test_trainer_under_torchrun_searches_the_union_of_the_ranks_previous_batches(tmp_path):
    ranks = run_ranks(tmp_path, "previous")
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
