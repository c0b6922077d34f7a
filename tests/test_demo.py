"""`pof-fast demo` runs pretrain -> posttrain -> eval end to end on the digits data and prints the table."""
import json

from pof_fast.cli.main import main


def test_demo_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--pretrain-epochs", "5", "--epochs", "2", "--no-progress", "--threads", "1",
                 "--json", str(out), "--out", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "after PoF (2 epochs): test error" in text
    for label in ("test error", "test NLL", "test ECE", "head sharpness", "t* ratio test/train", "plain SGD"):
        assert label in text
    result = json.loads(out.read_text())
    assert len(result["epochs"]) == 2
    for row in result["epochs"]:
        assert row["steps"] == 22 and row["step"] > 0 and 0 <= row["capped_rate"] <= 1
        assert 0 <= row["test_error"] <= 1 and row["test_nll"] > 0
    for column in ("before", "plain_SGD", "after"):
        assert result[column]["head_converged"] and result[column]["head_lambda_max"] > 0
        assert result[column]["t_ratio"] > 0 and 0 <= result[column]["test_ece"] <= 1
    assert result["before"]["test_error"] < 0.2  # the SAM-pretrained MLP has learned the digits
    for run in ("pretrain", "sgd", "posttrain"):  # the run folders are kept with --out
        assert (tmp_path / "runs" / run / "model.pt").is_file()


def test_demo_without_control_on_the_cnn(tmp_path, capsys):
    assert main(["demo", "--model", "cnn", "--pretrain-optimizer", "sgd", "--pretrain-epochs", "1", "--epochs", "1",
                 "--no-control", "--no-progress", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "after PoF (1 epochs)" in text and "plain SGD" not in text
