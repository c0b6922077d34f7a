"""The command-line path end to end on the digits data and tiny synthetic folders: pretrain, posttrain, eval,
landscape; exact resume; the runaway guard; data readers; SAM against its definition; clear errors."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pof_fast import data as datasets
from pof_fast import training
from pof_fast.training import posttraining, pretraining
from pof_fast.cli.main import COMMANDS, main

FAST = ["--no-progress", "--threads", "1", "--device", "cpu"]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_time(lines):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in lines]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An MLP pretrained on the digits for 5 epochs (SGD)."""
    out = tmp_path_factory.mktemp("pretrained")
    assert main(["pretrain", "--epochs", "5", "--out", str(out), *FAST]) == 0
    return out / "model.pt"


# -- each command end to end -----------------------------------------------------------------------------


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "pof_fast", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in COMMANDS)
    assert set(COMMANDS) == {"demo", "pretrain", "posttrain", "eval", "landscape", "bench"}


def test_pretrain_writes_checkpoint_metrics_and_model(pretrained):
    out = pretrained.parent
    lines = rows(out / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == list(range(6))  # epoch 0: the untrained model
    assert lines[-1]["test_error"] < 0.5 < lines[0]["test_error"]
    assert {"lr", "train_loss", "test_nll", "test_ece"} <= set(lines[-1])
    state = training.load_checkpoint(out / "last.pt")
    assert state["epoch"] == 5 and state["kind"] == "pretrain" and state["model_spec"]["model"] == "mlp"


def test_pretrain_sam_on_the_cnn_with_step_schedule(tmp_path):
    out = tmp_path / "cnn"
    assert main(["pretrain", "--model", "cnn", "--optimizer", "sam", "--schedule", "step", "--milestones", "1",
                 "--epochs", "2", "--batch-size", "128", "--out", str(out), *FAST]) == 0
    lines = rows(out / "metrics.jsonl")
    assert lines[1]["lr"] == pytest.approx(0.05) and lines[2]["lr"] == pytest.approx(0.005)
    assert lines[-1]["test_error"] < 0.9


def test_posttrain_logs_pof_telemetry_and_keeps_the_head(pretrained, tmp_path, capsys):
    out = tmp_path / "post"
    assert main(["posttrain", "--checkpoint", str(pretrained), "--epochs", "2", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "t*" in text and "test error" in text
    lines = rows(out / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    for r in lines[1:]:
        assert r["steps"] == 22 and r["perturbations"] == 22 and r["step"] > 0 and r["grad_norm"] > 0
        assert 0 <= r["capped_rate"] <= 1 and 0 <= r["skipped_rate"] <= 1 and r["perturbation_norm"] > 0
        assert r["train_loss"] > 0 and 0 <= r["test_error"] <= 1 and r["test_nll"] > 0 and r["runaway"] is False
    before, after = torch.load(pretrained)["model"], torch.load(out / "model.pt")["model"]
    assert torch.equal(before["head.weight"], after["head.weight"]) and torch.equal(before["head.bias"], after["head.bias"])
    assert not torch.equal(before["phi.1.weight"], after["phi.1.weight"])
    assert (out / "best.pt").is_file()


def test_posttrain_options_adam_cosine_bracket_grid_raw_clip(pretrained, tmp_path):
    out = tmp_path / "post"
    assert main(["posttrain", "--checkpoint", str(pretrained), "--epochs", "1", "--out", str(out),
                 "--base-optimizer", "adam", "--schedule", "cosine", "--method", "bracket_grid", "--direction", "raw",
                 "--on-capped", "clip", "--gamma", "1", "--gamma-sampling", "fixed", "--search-batch-size", "128",
                 "--batch-size", "32", "--max-step", "50", *FAST]) == 0
    (row,) = rows(out / "metrics.jsonl")[1:]
    assert row["steps"] == 44 and row["gamma"] == pytest.approx(1.0) and row["skipped_rate"] == 0


def test_eval_reports_error_nll_ece_and_converged_sharpness(pretrained, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(pretrained), "--hessian", "both", "--hessian-samples", "300",
                 "--out", str(out), *FAST]) == 0
    assert "head sharpness lambda_max" in capsys.readouterr().out
    (row,) = rows(out / "eval.jsonl")
    assert 0 <= row["test_error"] <= 1 and row["test_nll"] > 0 and 0 <= row["test_ece"] <= 1
    assert row["head_converged"] and row["head_lambda_max"] > 0 and row["head_method"] == "lanczos"
    assert row["network_converged"] and row["network_lambda_max"] >= row["head_lambda_max"] * 0.99
    assert sum(b["count"] for b in row["calibration"]) == 360


def test_landscape_reports_the_ratio_and_writes_a_png(pretrained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "land"
    assert main(["landscape", "--checkpoint", str(pretrained), "--batches", "4", "--batch-size", "64",
                 "--out", str(out), *FAST]) == 0
    assert "test / train" in capsys.readouterr().out
    (row,) = rows(out / "landscape.jsonl")
    assert len(row["t_train"]) == len(row["t_test"]) == 4 and row["ratio"] > 0
    assert row["ratio"] == pytest.approx(row["t_star_test"] / row["t_star_train"])
    assert (out / "landscape.png").stat().st_size > 1000


def test_plots_of_the_training_commands(pretrained, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "post"
    assert main(["posttrain", "--checkpoint", str(pretrained), "--epochs", "1", "--out", str(out), "--plot",
                 *FAST]) == 0
    assert (out / "curves.png").stat().st_size > 1000
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--plot", *FAST]) == 0
    assert (out / "eval.png").stat().st_size > 1000


# -- resume ----------------------------------------------------------------------------------------------


def interrupt_after(monkeypatch, epoch):
    """Make the run die right after it saved the checkpoint of ``epoch`` (as a killed process would)."""
    real = training.save_checkpoint

    def save(path, state):
        real(path, state)
        if path.name == "last.pt" and state["epoch"] == epoch:
            raise KeyboardInterrupt

    for loop in (pretraining, posttraining):
        monkeypatch.setattr(loop, "save_checkpoint", save)


def same_models(a, b):
    sa, sb = torch.load(a)["model"], torch.load(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrain_resume_continues_exactly(tmp_path, monkeypatch):
    args = ["pretrain", "--model", "cnn", "--optimizer", "sam", "--epochs", "3", "--batch-size", "256", *FAST]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    assert len(rows(tmp_path / "cut" / "metrics.jsonl")) == 2
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert without_time(rows(tmp_path / "cut" / "metrics.jsonl")) == without_time(rows(tmp_path / "whole" / "metrics.jsonl"))
    assert same_models(tmp_path / "cut" / "model.pt", tmp_path / "whole" / "model.pt")


def test_posttrain_resume_continues_exactly(tmp_path, monkeypatch):
    assert main(["pretrain", "--model", "cnn", "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path / "pre"),
                 *FAST]) == 0
    ckpt = str(tmp_path / "pre" / "model.pt")
    args = ["posttrain", "--checkpoint", ckpt, "--epochs", "3", "--batch-size", "256", "--search-batch-size", "128",
            "--schedule", "cosine", "--norm-stats", "update", *FAST]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a line of an epoch that never got its checkpoint
        f.write(json.dumps({"epoch": 3, "partial": True}) + "\n")
    assert main(["posttrain", "--out", str(tmp_path / "cut"), "--resume", *FAST]) == 0
    assert without_time(rows(tmp_path / "cut" / "metrics.jsonl")) == without_time(rows(tmp_path / "whole" / "metrics.jsonl"))
    assert same_models(tmp_path / "cut" / "model.pt", tmp_path / "whole" / "model.pt")
    whole, cut = torch.load(tmp_path / "whole" / "last.pt"), torch.load(tmp_path / "cut" / "last.pt")
    assert torch.equal(whole["optimizer"]["gamma_stream"]["counter"], cut["optimizer"]["gamma_stream"]["counter"])


def test_resume_warns_about_ignored_settings(pretrained, tmp_path, capsys):
    args = ["posttrain", "--checkpoint", str(pretrained), "--out", str(tmp_path / "p"), *FAST]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume", "--gamma", "3"]) == 0
    assert "--gamma 3.0 ignored" in capsys.readouterr().out
    assert [r["epoch"] for r in rows(tmp_path / "p" / "metrics.jsonl")] == [0, 1, 2]


# -- the runaway guard -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sam")
    assert main(["pretrain", "--optimizer", "sam", "--epochs", "20", "--out", str(out), *FAST]) == 0
    return out / "model.pt"


def test_runaway_guard_fires_on_fixed_gamma_with_a_large_lr_and_keeps_the_best(sam_pretrained, tmp_path, capsys):
    out = tmp_path / "runaway"
    assert main(["posttrain", "--checkpoint", str(sam_pretrained), "--gamma-sampling", "fixed", "--gamma", "2",
                 "--lr", "0.01", "--epochs", "6", "--stop-on-runaway", "--out", str(out), *FAST]) == 0
    assert "warning: runaway" in capsys.readouterr().out
    lines = rows(out / "metrics.jsonl")
    assert lines[-1]["runaway"] is True and len(lines) < 7  # stopped early
    best = min(lines, key=lambda r: r["test_nll"])
    kept = torch.load(out / "model.pt")
    assert kept["epoch"] == best["epoch"]
    assert same_models(out / "model.pt", out / "best.pt")


def test_runaway_guard_stays_quiet_on_the_defaults(sam_pretrained, tmp_path, capsys):
    out = tmp_path / "calm"
    assert main(["posttrain", "--checkpoint", str(sam_pretrained), "--epochs", "5", "--stop-on-runaway",
                 "--out", str(out), *FAST]) == 0
    assert "warning: runaway" not in capsys.readouterr().out
    assert [r.get("runaway", False) for r in rows(out / "metrics.jsonl")] == [False] * 6


def test_runaway_guard_rule():
    guard = training.RunawayGuard(window=2)
    assert not guard.update(1, 0.1, 0.2, 0.10)
    assert not guard.update(2, 0.2, 0.4, 0.20)
    assert guard.update(3, 0.4, 0.8, 0.30) and guard.fired_at == [3]
    calm = training.RunawayGuard(window=2)  # t* grows, the NLL rises only by noise
    assert not any(calm.update(e, 0.1 * 1.2 ** e, 0.1, 0.090 + 0.0001 * e) for e in range(1, 6))
    falling = training.RunawayGuard(window=2)  # t* grows while the NLL falls
    assert not any(falling.update(e, 0.1 * e, 0.1 * e, 1.0 / e) for e in range(1, 6))


# -- data ------------------------------------------------------------------------------------------------


def write_cifar(root, name, rows_per_file=6):
    gen = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    key = b"labels" if name == "cifar10" else b"fine_labels"
    classes = 10 if name == "cifar10" else 100
    for f in files:
        n = rows_per_file * (5 if name == "cifar100" and f == "train" else 1)
        batch = {b"data": gen.integers(0, 256, (n, 3072), dtype=np.uint8), key: gen.integers(0, classes, n).tolist()}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh)
    return root


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader_and_pretrain_posttrain_on_it(tmp_path, name):
    root = write_cifar(tmp_path / "data", name)
    data = datasets.load_data(name, root)
    assert data.input_shape == (3, 32, 32) and len(data.train) == 30 and len(data.test) == 6
    assert data.num_classes == (10 if name == "cifar10" else 100) and data.train.x.dtype == torch.uint8
    first_file = "cifar-10-batches-py/data_batch_1" if name == "cifar10" else "cifar-100-python/train"
    with open(root / first_file, "rb") as f:
        first = pickle.load(f, encoding="bytes")
    assert torch.equal(data.train.x[0].reshape(-1), torch.from_numpy(first[b"data"][0]))
    out = tmp_path / "pre"
    assert main(["pretrain", "--data", name, "--data-dir", str(root), "--model", "cnn", "--epochs", "1",
                 "--batch-size", "8", "--out", str(out), *FAST]) == 0
    assert main(["posttrain", "--checkpoint", str(out / "model.pt"), "--epochs", "1", "--batch-size", "8",
                 "--search-batch-size", "16", "--out", str(tmp_path / "post"), *FAST]) == 0
    assert rows(tmp_path / "post" / "metrics.jsonl")[-1]["steps"] == 3  # the data came from the checkpoint


def write_folder(root, png):
    gen = np.random.default_rng(1)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("ant", "bee"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                image = gen.integers(0, 256, (10, 12, 3) if i % 2 else (10, 12), dtype=np.uint8)
                if png and i == 0:
                    from PIL import Image

                    Image.fromarray(image).save(root / split / label / f"{i}.png")
                else:
                    np.save(root / split / label / f"{i}.npy", image)
    return root


def test_image_folder_reader_and_pretrain(tmp_path):
    import importlib.util

    png = importlib.util.find_spec("PIL") is not None
    root = write_folder(tmp_path / "images", png)
    data = datasets.load_data("folder", root, image_size=8)
    assert data.num_classes == 2 and len(data.train) == 8 and len(data.test) == 4
    x, y = data.train.batch(torch.arange(8))
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.uint8 and y.tolist() == [0] * 4 + [1] * 4
    assert main(["pretrain", "--data", "folder", "--data-dir", str(root), "--image-size", "8", "--epochs", "1",
                 "--batch-size", "4", "--workers", "1", "--out", str(tmp_path / "pre"), *FAST]) == 0
    assert len(rows(tmp_path / "pre" / "metrics.jsonl")) == 2


def test_digits_split_and_augmentation():
    data = datasets.load_digits()
    assert len(data.train) == 1437 and len(data.test) == 360 and data.input_shape == (1, 8, 8)
    assert torch.equal(datasets.load_digits().test.y, data.test.y)  # a fixed split
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = datasets.augment(x, torch.Generator().manual_seed(0))
    b = datasets.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    for i in range(2):  # every output pixel is an input pixel of the same image and channel, or padding
        values = set(x[i].reshape(-1).tolist()) | {0.0}
        assert set(a[i].reshape(-1).tolist()) <= values


# -- training pieces -------------------------------------------------------------------------------------


def test_sam_step_matches_its_definition():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(3, (16,))
    lr, rho = 0.1, 0.05
    w = [p.detach().clone() for p in net.parameters()]

    def loss_at(params):
        h = torch.tanh(x @ params[0].t() + params[1])
        return nn.functional.cross_entropy(h @ params[2].t() + params[3], y)

    params = [p.clone().requires_grad_() for p in w]
    g = torch.autograd.grad(loss_at(params), params)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    moved = [(p + rho * t / norm).requires_grad_() for p, t in zip(w, g)]
    g_sam = torch.autograd.grad(loss_at(moved), moved)
    expected = [p - lr * t for p, t in zip(w, g_sam)]

    opt = training.SAM(net.parameters(), torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(loss_at(w).item())
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="closure"):
        opt.step()


def test_lr_schedules():
    assert training.lr_factor("constant", 3.0, 10) == 1.0
    assert training.lr_factor("cosine", 0.0, 10) == 1.0 and training.lr_factor("cosine", 5.0, 10) == pytest.approx(0.5)
    assert training.lr_factor("cosine", 10.0, 10) == pytest.approx(0.0)
    assert [training.lr_factor("step", e, 8) for e in (0, 3.9, 4, 6)] == pytest.approx([1, 1, 0.1, 0.01])
    assert training.lr_factor("step", 5, 8, milestones=(2,), decay=0.5) == 0.5


# -- clear errors ----------------------------------------------------------------------------------------


def fails(argv, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert match in str(info.value.code), info.value.code


def test_bad_paths_give_clear_errors(pretrained, tmp_path):
    fails(["posttrain", "--checkpoint", str(tmp_path / "nope.pt"), *FAST], "checkpoint not found")
    fails(["eval", "--checkpoint", str(tmp_path / "nope.pt"), *FAST], "checkpoint not found")
    fails(["posttrain", *FAST], "--checkpoint FILE is needed")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["pretrain", "--data", "cifar10", "--data-dir", str(empty), "--out", str(tmp_path / "o"), *FAST],
          "never downloads")
    fails(["pretrain", "--data", "cifar100", "--data-dir", str(empty), "--out", str(tmp_path / "o"), *FAST],
          "cifar-100-python")
    fails(["pretrain", "--data", "cifar10", "--out", str(tmp_path / "o"), *FAST], "needs --data-dir")
    assert not (tmp_path / "o").exists()  # nothing is written for a run that cannot start
    fails(["pretrain", "--data", "folder", "--data-dir", str(empty), "--out", str(tmp_path / "o"), *FAST], "train")
    fails(["pretrain", "--data", "cifar10", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
           *FAST], "is not a folder")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    fails(["eval", "--checkpoint", str(text), *FAST], "not a pof-fast checkpoint")
    fails(["pretrain", "--resume", "--out", str(tmp_path / "fresh"), *FAST], "no checkpoint")
    fails(["pretrain", "--epochs", "1", "--out", str(pretrained.parent), *FAST], "already holds a run")


def test_bad_arguments_give_clear_errors(pretrained, tmp_path, capsys):
    fails(["pretrain", "--lr", "-1", "--out", str(tmp_path / "a"), *FAST], "--lr must be")
    fails(["posttrain", "--checkpoint", str(pretrained), "--gamma", "-2", "--out", str(tmp_path / "b"), *FAST],
          "--gamma must be")
    fails(["posttrain", "--checkpoint", str(pretrained), "--head", "phi.9", "--out", str(tmp_path / "c"), *FAST],
          "no submodule 'phi.9'")
    fails(["posttrain", "--checkpoint", str(pretrained), "--head", "phi.0", "--out", str(tmp_path / "c"), *FAST],
          "not an nn.Linear")
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(pretrained)["model"], plain)
    fails(["eval", "--checkpoint", str(plain), *FAST], "--model")
    fails(["eval", "--checkpoint", str(plain), "--model", "cnn", *FAST], "does not fit --model cnn")
    assert main(["eval", "--checkpoint", str(plain), "--model", "mlp", "--hessian", "none", "--out",
                 str(tmp_path / "e"), *FAST]) == 0
    if not torch.cuda.is_available():
        fails(["eval", "--checkpoint", str(pretrained), "--device", "cuda", "--no-progress"], "cuda.is_available")
    fails(["eval", "--checkpoint", str(pretrained), "--device", "tpu9", "--no-progress"], "--device")
    for argv in (["pretrain", "--data", "mnist"], ["pretrain", "--epochs", "0"], ["posttrain", "--method", "bisect"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_pickled_model_needs_unsafe_load_and_a_head(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    fails(["eval", "--checkpoint", str(path), *FAST], "not a pof-fast checkpoint")
    assert main(["posttrain", "--checkpoint", str(path), "--unsafe-load", "--epochs", "1",
                 "--out", str(tmp_path / "p"), *FAST]) == 0
    fails(["eval", "--checkpoint", str(tmp_path / "p" / "model.pt"), *FAST], "--unsafe-load")
    assert main(["eval", "--checkpoint", str(tmp_path / "p" / "model.pt"), "--unsafe-load", *FAST]) == 0
