"""PoF on LM heads sharded by FSDP2 and tensor parallelism (DTensor Shard(0)), without gathering the head.

Two torchrun launches on gloo (tests/sharded_worker.py): 2 processes for FSDP2 on every decoder layer and the model,
a ColwiseParallel head, the refused cases and a torch.distributed.checkpoint round trip; 4 processes for the 2 x 2
meshes (FSDP x TP, HSDP). Each layout runs three PoF steps through PoFCallback's pieces. Checked against the
single-process float64 search on the gathered rows and the gathered head: t* (rel 1e-4), the gathered perturbed
head (theta0 - gamma t u of that search), the training loss read through the perturbed head against the loss by
hand, theta0 exactly after step(), t* and gamma bitwise the same on every rank, no head logits in the search
forward (a forward hook), and the collectives counted by pof_fast.distributed.collectives.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

from lm import tiny_lm  # noqa: E402
from repo_path import child_env  # noqa: E402

import pof_fast  # noqa: E402
from pof_fast.integrations.transformers import check_lm_head  # noqa: E402

WORKER = Path(__file__).resolve().parent / "sharded_worker.py"
TWO = ("fsdp", "tp", "refusals", "small", "checkpoint")
FOUR = ("fsdp_tp", "hsdp")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every layout's per-rank results: one torchrun launch per world size."""
    out = tmp_path_factory.mktemp("sharded")
    env = child_env({**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    for world, layouts in ((2, TWO), (4, FOUR)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(WORKER), str(out), *layouts]
        done = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                                      f"stderr:\n{done.stderr[-3000:]}")
    return {layout: [json.loads((out / f"{layout}.rank{r}.json").read_text()) for r in range(world)]
            for world, layouts in ((2, TWO), (4, FOUR)) for layout in layouts}


@pytest.mark.parametrize("layout", ["fsdp", "tp", "fsdp_tp", "hsdp"])
def test_sharded_head_search_equals_the_search_on_the_gathered_head(results, layout):
    ranks = results[layout]
    for rank, result in enumerate(ranks):
        assert not result["process_group"]  # the callback left the group to the head's mesh
        assert len(result["steps"]) == 3
        for k, s in enumerate(result["steps"]):
            what = f"{layout} rank {rank} step {k}"
            assert s["same_on_ranks"], what
            assert s["step"][0] == pytest.approx(s["step"][1], rel=1e-4), what
            assert s["capped"][0] == s["capped"][1], what
            assert s["head_error"] <= 1e-5 and s["perturbation"] > 1e-3, what  # moved, as the oracle says
            assert s["loss"][0] == pytest.approx(s["loss"][1], rel=1e-5), what
            assert s["restored"] and s["no_logits"], what
        assert all(got == want for got, want in result["collectives"]), (layout, result["collectives"])
    assert [s["step"][0] for s in ranks[0]["steps"]] == [s["step"][0] for s in ranks[-1]["steps"]]


def test_tensor_parallel_ranks_search_their_shared_tokens_once(results):
    tp, fsdp = results["tp"][0]["collectives"][0], results["fsdp"][0]["collectives"][0]
    assert tp[0] == fsdp[0] - 2  # no gather of the rows the tensor-parallel ranks share


def test_fsdp_times_tp_searches_the_union_of_the_data_parallel_ranks(results):
    # dp = 2 brings the same two token sets as the 2-process FSDP run: the same t* (the first step exactly; then the
    # decoders differ by the gradient reductions' rounding)
    pairs = list(zip(results["fsdp_tp"][0]["steps"], results["fsdp"][0]["steps"]))
    assert pairs[0][0]["step"][1] == pytest.approx(pairs[0][1]["step"][1], rel=1e-12)
    assert all(a["step"][1] == pytest.approx(b["step"][1], rel=1e-5) for a, b in pairs)


def test_checkpoint_through_torch_distributed_checkpoint_resumes_bit_exactly(results):
    for r in results["checkpoint"]:
        assert r["first"] == r["again"] and r["same_weights"]
        assert r["theta0_is_dtensor"] and r["head_is_theta0"]
    assert [r["theta0_rows"] for r in results["checkpoint"]] == [[49, 32], [48, 32]]  # 97 classes in two shards


@pytest.mark.parametrize("case,kind,words", [
    ("head_sharded_on_dim_1", "ValueError", ("sharded on dim 1", "Shard(0)")),
    ("partial_features", "ValueError", ("placement P(sum)", "redistribute")),
    ("features_dim_sharded", "ValueError", ("placement S(1)", "Replicate")),
    ("features_on_another_mesh", "ValueError", ("no dim of the head's mesh", "sub-meshes")),
    ("line_search_dtensor", "TypeError", ("weight is a DTensor", "sharded_classes=(first_class, num_classes)")),
    ("head_unsharded", "RuntimeError", ("model.reshard()",)),
])
def test_refused_cases_say_the_fix_in_one_line(results, case, kind, words):
    for r in results["refusals"]:
        got_kind, message = r[case]
        assert got_kind == kind and "\n" not in message and all(w in message for w in words), (case, message)
    assert all(r["after_reshard"] == ["none", ""] for r in results["refusals"])


def test_a_sharded_bias_and_an_explicit_process_group(results):
    """A head with a bias, 2 ranks bringing 40 and 43 rows: the rows gathered unevenly, the bias perturbed as its
    rows; an explicit process_group (the data-parallel union, here the same ranks) gives the same search."""
    for rank, r in enumerate(results["small"]):
        for name in ("mesh", "explicit_group"):
            s = r[name]
            assert s["step"][0] == pytest.approx(s["step"][1], rel=1e-4), (rank, name)
            assert s["weight_error"] <= 1e-5 and s["bias_error"] <= 1e-5, (rank, name)
            assert s["bias_rows"] == [[6], [5]][rank], (rank, name)  # 11 classes: 6 + 5 rows
        assert r["mesh"]["step"] == r["explicit_group"]["step"]


def zero3_placeholder(linear: nn.Linear) -> nn.Linear:
    """What DeepSpeed ZeRO-3 leaves in a module: an empty weight with the real shape in ``ds_shape``."""
    shape = tuple(linear.weight.shape)
    linear.weight = nn.Parameter(torch.empty(0))
    linear.weight.ds_shape, linear.weight.ds_id = shape, 0
    return linear


def test_a_zero3_partitioned_head_is_refused_naming_fsdp2_or_zero2():
    with pytest.raises(ValueError, match="ZeRO-3 partitioned placeholder.*FSDP2.*ZeRO-2"):
        pof_fast.PoF(nn.Linear(3, 4).parameters(), torch.optim.SGD, head=zero3_placeholder(nn.Linear(4, 5)), lr=0.1)
    model = tiny_lm(tied=False)
    zero3_placeholder(model.lm_head)
    with pytest.raises(ValueError, match="ZeRO-3 partitioned placeholder.*real shape \\[97, 32\\]"):
        check_lm_head(model)


def test_sharded_classes_offsets_are_checked():
    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))
    for bad in ((3, 7), (0, 4), (-1, 9), (1.0, 9), (0, 5, 1)):
        with pytest.raises(ValueError, match="sharded_classes must be"):
            pof_fast.line_search(h, w, None, y, sharded_classes=bad)


def test_the_fsdp2_example_runs_under_torchrun(tmp_path):
    runner = Path(__file__).resolve().parent / "example_runner.py"  # examples/fsdp2_pof.py's main
    env = child_env({**os.environ, "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(runner),
           "fsdp2_pof", "--steps", "2", "--length", "16"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    printed = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in printed] == ["step 0", "step 1"]  # rank 0 alone prints, once a step
    assert all(float(line.split("t* = ")[1].split()[0]) > 0 for line in printed)
