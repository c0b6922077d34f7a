"""`pof-fast demo` runs end to end on the digits data and reports before/after metrics."""
import json

from pof_fast.cli.main import main


def test_demo_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--pretrain-epochs", "5", "--epochs", "2", "--no-progress", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "after PoF (2 epochs): test error" in text
    result = json.loads(out.read_text())
    assert len(result["epochs"]) == 2
    for row in result["epochs"]:
        assert row["steps"] == 23 and row["step"] > 0 and 0 <= row["capped_rate"] <= 1
        assert 0 <= row["test_error"] <= 1 and row["test_nll"] > 0
    assert result["before"]["error"] < 0.2  # the pretrained MLP has learned the digits
