"""The benchmark scripts run on the CPU with a tiny preset (correctness of the scripts, not speed)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_throughput_script_on_cpu(tmp_path):
    import throughput

    rows = throughput.main(["--device", "cpu", "--presets", "lm_tiny", "--batch-sizes", "2", "--steps", "2",
                            "--warmup", "1", "--seq-len", "32", "--vocab-size", "256", "--log-every", "1",
                            "--out", str(tmp_path)])
    assert [r["path"] for r in rows] == ["plain", "lightning"]
    for row in rows:
        assert row["tokens_per_sec"] > 0 and row["mfu"] is None and row["params"] == 40_256
        # 6N + 12 L H Q T with N = 40,256 (lm_tiny at vocab 256, RoPE: no position table), 2 layers, 2 heads of 16
        assert row["flops_per_token"] == 6 * 40_256 + 12 * 2 * 2 * 16 * 32
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["rows"] == rows and "torch" in saved["meta"]
    assert "| lm_tiny | lightning | 1 | 2 |" in (tmp_path / "throughput.md").read_text()


def test_profile_script_on_cpu(tmp_path):
    import profile_step

    result = profile_step.main(["--device", "cpu", "--preset", "lm_tiny", "--batch-size", "2", "--seq-len", "32",
                                "--vocab-size", "256", "--warmup", "1", "--steps", "2", "--out", str(tmp_path)])
    families = result["families_ms_per_step"]
    assert abs(sum(families.values()) - result["busy_ms_per_step"]) < 0.05 * result["busy_ms_per_step"] + 0.02
    assert "optimizer" in families and "attention" in families  # AdamW and SDPA are found by name
    assert 0 < result["gpu_busy_fraction"] <= 1.5 and len(result["top_kernels"]) > 5
    saved = json.loads((tmp_path / "profile_lm_tiny.json").read_text())
    assert saved["families_ms_per_step"] == families
    assert json.loads((tmp_path / "trace_lm_tiny.json").read_text())["traceEvents"]


@pytest.mark.slow
def test_scaling_script_on_cpu(tmp_path):
    """1 and 2 processes (gloo DDP) through benchmarks/scaling.py: rows, efficiency formula and files."""
    import scaling

    rows = scaling.main(["--gpus", "1", "2", "--preset", "lm_tiny", "--batch-size", "2", "--seq-len", "32",
                         "--vocab-size", "256", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert [(r["world_size"], r["strategy"]) for r in rows] == [(1, "auto"), (2, "ddp")]
    base = rows[0]["tokens_per_sec"]
    assert rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == round(rows[1]["tokens_per_sec"] / (2 * base), 3)
    assert json.loads((tmp_path / "scaling.json").read_text()) == rows
    assert "| 2 | ddp | None | none | - | 2 |" in (tmp_path / "scaling.md").read_text()
