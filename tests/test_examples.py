"""The examples under examples/ run for a few steps: plain PyTorch + AMP, Lightning (automatic and
manual optimisation), Accelerate. The framework examples need their framework (in the ``test`` extra)."""
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module", autouse=True)
def examples_on_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def run(name, *argv):
    return importlib.import_module(name).main(list(argv))


def test_plain_amp_example():
    summary = run("plain_amp", "--steps", "3", "--device", "cpu")
    assert summary["steps"] == 3 and summary["perturbations"] == 3
    assert summary["step"] > 0 and summary["loss"] < summary["loss0"]  # searched, and the loss fell along u


@pytest.mark.parametrize("manual", [False, True])
def test_lightning_example(manual):
    pytest.importorskip("lightning", reason="lightning is not installed (pip install '.[test]')")
    module = run("lightning_pof", "--steps", "3", *(["--manual"] if manual else []))
    opt = module.trainer.optimizers[0]
    assert opt.summary()["steps"] == 3 and opt.summary()["perturbations"] == 3  # the user's PoF saw every step
    assert torch.equal(module.model.head.weight, opt.theta0_weight)
    assert "pof/step" in module.trainer.callback_metrics


def test_accelerate_example():
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install '.[test]')")
    summary = run("accelerate_pof", "--steps", "3", "--accumulate", "2")
    assert summary["steps"] == 3 and summary["perturbations"] == 3  # one perturbation per optimizer step


def test_transformers_example(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")
    results = run("transformers_pof", "--pretrain-steps", "20", "--steps", "3", "--length", "24", "--device", "cpu",
                  "--out", str(tmp_path))
    summary = results["pof_summary"]
    assert summary["steps"] == 3 and summary["perturbations"] == 3 and summary["step"] > 0
    assert results["before"]["loss"] < 5.5  # pretrained below log(512) = 6.24, the untrained loss
    for name in ("before", "plain", "pof"):
        assert results[name]["perplexity"] == pytest.approx(math.exp(results[name]["loss"]))
