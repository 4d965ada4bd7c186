"""`olm compare` on hand-made run dirs: multirun expansion, differing overrides, best row, unfinished/failed runs."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from olm.cli import main
from olm.compare import load_runs, write_report

HEADER = ["epoch", "lr", "step", "tokens_seen", "train/loss", "val/bpb", "val/loss"]


def make_run(path: Path, overrides: list[str], val_losses: list[float], summary: dict | None = None,
             log: str = "", seed: int = 0) -> Path:
    """A run dir as olm-train writes it: .hydra/overrides.yaml, config.yaml, metrics.csv (val every 10 steps)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / "config.yaml").write_text(f"seed: {seed}\ndata: {{source: stdlib, seed: {seed}, seq_len: 32, batch_size: 4}}\n"
                                      "trainer: {max_steps: 20}\n")
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for i, loss in enumerate(val_losses):
            step = 10 * (i + 1) - 1
            writer.writerow([0, 1e-3, step, (step + 1) * 128, loss + 0.1, "", ""])
            writer.writerow([0, "", step, "", "", loss / 0.693, loss])
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if log:
        (path / "app.log").write_text(log)
    return path


def finished(val_loss: float, params: int) -> dict:
    return {"status": "finished", "val_loss": val_loss, "val_bpb": val_loss / 0.693, "num_parameters": params,
            "tokens_seen": 2560, "tokens_per_sec": 1000.0, "mfu": None}


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    common = ["+experiment=[ffn_multiplier,smoke]", "paths.cache_dir=/tmp/a"]
    make_run(root / "0", ["model.ff_multiplier=2", *common], [4.0, 3.5], finished(3.5, 1000))
    make_run(root / "1", ["model.ff_multiplier=4", *common], [3.9, 3.2], finished(3.2, 2000))
    make_run(root / "2", ["model.ff_multiplier=8", *common], [3.8])  # killed after its first validation
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_multirun_dir_expands_and_marks_best_and_unfinished(sweep, tmp_path):
    report = write_report([sweep], tmp_path / "report")
    runs = report["runs"]
    assert [r.label for r in runs] == ["0", "1", "2"]
    assert [r.status for r in runs] == ["finished", "finished", "unfinished"]
    assert report["best"].label == "1"
    text = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[3] == "model.ff_multiplier"  # only the override that differs
    assert "paths.cache_dir" not in text and "experiment" not in rows[0]
    assert "**best** | 1 | finished | 4 | 2,000 | 2,560 | 3.2000" in rows[2]
    assert "| 2 | unfinished | 8 | — | 1,280 | 3.8000 (last logged)" in rows[3]
    assert "Same data in the same order for every run (source=stdlib, seed=0" in text
    for name in ("val_loss.png", "final_val_loss.png"):
        with Image.open(tmp_path / "report" / name) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_run_dir_without_summary_is_unfinished(tmp_path, capsys):
    done = make_run(tmp_path / "a", ["optim.lr=1e-3"], [3.0, 2.5], finished(2.5, 500))
    crashed = make_run(tmp_path / "b", ["optim.lr=1e-1"], [6.0])
    assert main(["compare", str(done), str(crashed), "--out", str(tmp_path / "r"), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "| b | unfinished | 1e-1 |" in out and "| **best** | a | finished | 1e-3 |" in out
    with open(tmp_path / "r" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["optim.lr"], r["best"]) for r in rows] == [
        ("a", "finished", "1e-3", "True"), ("b", "unfinished", "1e-1", "False")]


def test_failed_runs_are_listed_with_their_error(tmp_path):
    make_run(tmp_path / "s" / "0", ["seed=0"], [3.0], finished(3.0, 500))
    make_run(tmp_path / "s" / "1", ["seed=1"], [], log="[2026-01-01 00:00:00,000][olm][ERROR] - data.seq_len=64 exceeds "
                                                       "model.max_seq_len=32\n", seed=1)
    make_run(tmp_path / "s" / "2", ["seed=2"], [5.0], {"status": "failed", "error": "loss is nan"}, seed=2)
    report = write_report([tmp_path / "s"], tmp_path / "r", fmt="json")
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [(r["run"], r["status"], r["error"]) for r in data["runs"]] == [
        ("0", "finished", None), ("1", "failed", "data.seq_len=64 exceeds model.max_seq_len=32"),
        ("2", "failed", "loss is nan")]
    assert data["runs"][2]["val_loss"] == 5.0  # the last one logged
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| 2 | failed | 2 | — | 1,280 | 5.0000 (last logged) |" in text
    assert "(failed: data.seq_len=64 exceeds model.max_seq_len=32)" in text
    assert "- `data.seed` differs between runs: 0, 1, 2" in text  # seeds were swept: not the same tokens
    assert report["best"].label == "0"


def test_nested_folders_and_bad_arguments(sweep, tmp_path, capsys):
    assert len(load_runs([tmp_path / "multiruns"])) == 3  # a folder of multiruns: every job
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [
        ([str(tmp_path / "nope")], f"error: {str(tmp_path / 'nope')!r} is not a directory"),
        ([str(empty)], f"error: {str(empty)!r} holds no run dirs"),
    ]:
        assert main(["compare", *args, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
