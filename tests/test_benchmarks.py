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


@pytest.mark.slow
@pytest.mark.parametrize("preset, hf_class", [("gpt2_small", "GPT2LMHeadModel"), ("llama_small", "LlamaForCausalLM")])
def test_throughput_hf_reference_has_the_same_shape(preset, hf_class):
    """The hf path times transformers' model of the preset's shape: same class olm exports to, same parameter count
    (padded vocabulary, tied embeddings), and it trains in the benchmark's loop."""
    pytest.importorskip("transformers")
    import throughput

    import olm

    overrides = ["model.num_layers=2", "model.embed_dim=64", "model.num_heads=4"]
    cfg = throughput.model_config(preset, 250, 32, overrides)
    hf = throughput.hf_model(cfg)
    assert type(hf).__name__ == hf_class and hf.config.vocab_size == 256  # 250 padded to 64
    lm_dropouts = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "dropout")  # used by the LM classes
    dropouts = {k: v for k, v in hf.config.to_dict().items() if k in lm_dropouts}
    assert dropouts and set(dropouts.values()) == {0.0}  # olm's presets train without dropout; so does the reference
    assert sum(p.numel() for p in hf.parameters()) == olm.build_model(cfg).num_parameters()
    rows = throughput.main(["--device", "cpu", "--presets", preset, "--paths", "plain", "hf", "--batch-sizes", "2",
                            "--steps", "1", "--warmup", "1", "--seq-len", "32", "--vocab-size", "250",
                            "--override", *overrides])
    assert [r["path"] for r in rows] == ["plain", "hf"] and rows[0]["params"] == rows[1]["params"]
    assert all(r["tokens_per_sec"] > 0 for r in rows)
    for olm_only in (["--activation-checkpointing"], ["--devices", "2"]):  # would be reported, not applied to hf
        with pytest.raises(SystemExit):
            throughput.main(["--device", "cpu", "--presets", preset, "--paths", "hf", *olm_only])


NANOGPT_STAND_IN = """
import dataclasses, torch

@dataclasses.dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        V, T, C, L = config.vocab_size, config.block_size, config.n_embd, config.n_layer
        self.wte = torch.nn.Embedding(V, C)
        # the rest of GPT-2's parameters (positions, per block 12 C^2 + 13 C with biases, final norm) as one tensor
        self.rest = torch.nn.Parameter(torch.zeros(T * C + L * (12 * C * C + 13 * C) + 2 * C))

    def forward(self, idx, targets=None):
        logits = self.wte(idx) @ self.wte.weight.T
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
"""


def test_throughput_nanogpt_reference_gets_the_preset_shape(tmp_path, capsys, monkeypatch):
    """--paths nanogpt loads model.py from the given checkout and builds its GPT in the preset's GPT-2 shape
    (padded vocabulary, the preset's bias, no dropout); a stand-in with nanoGPT's interface records the config."""
    import throughput

    import olm

    (tmp_path / "model.py").write_text(NANOGPT_STAND_IN)
    overrides = ["model.num_layers=3", "model.embed_dim=64", "model.num_heads=4"]
    cfg = throughput.model_config("gpt2_small", 250, 32, overrides)
    rows = throughput.main(["--device", "cpu", "--presets", "gpt2_small", "--paths", "nanogpt", "--nanogpt-dir",
                            str(tmp_path), "--batch-sizes", "2", "--steps", "1", "--warmup", "1", "--seq-len", "32",
                            "--vocab-size", "250", "--override", *overrides])
    assert [r["path"] for r in rows] == ["nanogpt"] and rows[0]["tokens_per_sec"] > 0
    assert rows[0]["params"] == olm.build_model(cfg).num_parameters()  # checked by the loader
    assert rows[0]["reference_config"] == {"block_size": cfg["max_seq_len"], "vocab_size": 256, "n_layer": 3,
                                           "n_head": 4, "n_embd": 64, "dropout": 0.0, "bias": True}
    monkeypatch.setattr(throughput, "run_case", lambda *a: pytest.fail("timed before the inputs were checked"))
    with pytest.raises(SystemExit, match="GPT-2 shapes only"):  # refused before gpt2_tiny is timed
        throughput.main(["--device", "cpu", "--presets", "gpt2_tiny", "llama_tiny", "--paths", "plain", "nanogpt",
                         "--nanogpt-dir", str(tmp_path)])
    (tmp_path / "fork").mkdir()  # a model.py that builds another shape (e.g. other norms by default) is refused
    (tmp_path / "fork" / "model.py").write_text(NANOGPT_STAND_IN.replace("+ 2 * C))", "+ 3 * C))"))
    with pytest.raises(SystemExit, match="unmodified nanoGPT"):
        throughput.main(["--device", "cpu", "--presets", "gpt2_small", "--paths", "plain", "nanogpt", "--nanogpt-dir",
                         str(tmp_path / "fork"), "--seq-len", "32", "--vocab-size", "250", "--override", *overrides])
    with pytest.raises(SystemExit):  # the path needs a checkout, and the checkout needs the path
        throughput.main(["--device", "cpu", "--presets", "gpt2_tiny", "--paths", "nanogpt"])
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cpu", "--presets", "gpt2_tiny", "--paths", "nanogpt", "--nanogpt-dir",
                         str(tmp_path / "missing")])
    assert "missing/model.py not found" in capsys.readouterr().err


def test_profile_script_on_cpu(tmp_path):
    import profile_step

    result = profile_step.main(["--device", "cpu", "--preset", "lm_tiny", "--batch-size", "2", "--seq-len", "32",
                                "--vocab-size", "256", "--warmup", "1", "--steps", "2", "--out", str(tmp_path)])
    families = result["families_ms_per_step"]
    assert abs(sum(families.values()) - result["busy_ms_per_step"]) < 0.05 * result["busy_ms_per_step"] + 0.02
    assert "optimizer" in families and "attention" in families  # AdamW and SDPA are found by name
    assert 0 < result["gpu_busy_fraction"] <= 1.01 and len(result["top_kernels"]) > 5
    assert result["exposed_communication_ms_per_step"] == 0  # one process: no communication
    assert result["compute_ms_per_step"] == result["busy_ms_per_step"]
    host = {op["name"]: op for op in result["top_host_ops"]}
    assert "aten::mm" in host and host["aten::mm"]["calls_per_step"] >= 1 and host["aten::mm"]["self_cpu_ms_per_step"] > 0
    assert result["idle_gaps"] == []  # GPU only
    saved = json.loads((tmp_path / "profile_lm_tiny.json").read_text())
    assert saved["families_ms_per_step"] == families
    assert json.loads((tmp_path / "trace_lm_tiny.json").read_text())["traceEvents"]


@pytest.mark.slow
def test_profile_script_lightning_path_on_cpu():
    """--path lightning profiles the steps of the Lightning Trainer (here one CPU process): same report."""
    import profile_step

    result = profile_step.main(["--path", "lightning", "--device", "cpu", "--preset", "lm_tiny", "--batch-size", "2",
                                "--seq-len", "32", "--vocab-size", "256", "--warmup", "2", "--steps", "3"])
    assert result["path"] == "lightning" and result["world_size"] == 1
    assert result["step_ms"] > 0 and "optimizer" in result["families_ms_per_step"]
    assert 0 < result["gpu_busy_fraction"] <= 1.01


@pytest.mark.slow
def test_rope_formulations_give_the_same_gradient():
    """benchmarks/rope_kernels.py: every formulation of the rotation it times computes olm's gradient (fp32 on CPU)."""
    import rope_kernels

    rows = rope_kernels.main(["--device", "cpu", "--batch-size", "1", "--seq-len", "16", "--heads", "4",
                              "--kv-heads", "2", "--head-dim", "8", "--iters", "1",
                              "--variants", "olm", "explicit_backward", "halves"])
    assert [r["variant"] for r in rows] == ["olm", "explicit_backward", "halves"]
    assert all(r["max_rel_grad_difference"] < 1e-6 and r["ms_fwd_bwd"] > 0 for r in rows)


def test_profile_interval_union():
    """Busy time is the union of kernel intervals; communication is exposed where no compute kernel covers it."""
    import profile_step

    assert profile_step.covered([]) == 0
    assert profile_step.covered([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    compute, comm = [(0, 10), (12, 20)], [(8, 14), (19, 23)]
    assert profile_step.covered(compute + comm) - profile_step.covered(compute) == 2 + 3  # 10-12 and 20-23
    # idle gaps (us) after the kernel that ended last, before the next one; shorter than min_us are not gaps
    timeline = [(0, 10, "a"), (5, 12, "b"), (40, 50, "c"), (50, 55, "d"), (60, 70, "a"), (115, 120, "c")]
    assert profile_step.idle_gaps(timeline, steps=1, min_us=20) == [
        {"ms_per_step": 0.045, "count_per_step": 1.0, "after": "a", "before": "c"},
        {"ms_per_step": 0.028, "count_per_step": 1.0, "after": "b", "before": "c"},
    ]
    # a long kernel on another stream covers short ones: the gap comes after the one that ended last ("long")
    nested = [(0, 100, "long"), (10, 20, "s1"), (50, 60, "s2"), (130, 140, "next"), (130, 135, "same_start")]
    assert profile_step.idle_gaps(nested, steps=2, min_us=20) == [
        {"ms_per_step": 0.015, "count_per_step": 0.5, "after": "long", "before": "same_start"},
    ]


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
    assert "| 2 | ddp | None | none | - | 2 | 1 |" in (tmp_path / "scaling.md").read_text()


def test_scaling_summary_of_repeats():
    """Repeated points: each GPU count's median, spread and the efficiency of the medians."""
    import scaling

    def row(n, tokens):
        return {"world_size": n, "tokens_per_sec": tokens, "strategy": "ddp" if n > 1 else "auto", "batch_size": 32,
                "mfu": 0.4, "peak_mem_gib": 16.0, "compile_scope": "model", "gradient_compression": None, "ddp_options": None}

    rows = [row(1, 500), row(2, 960), row(1, 490), row(2, 940), row(1, 520), row(2, 950)]
    table = scaling.summarize(rows, "cmd")
    assert "| 1 | auto | model | None | - | 32 | 3 | 500 | 490-520 | 1.0 | 40.0% | 16.0 |" in table
    assert "| 2 | ddp | model | None | - | 32 | 3 | 950 | 940-960 | 0.95 | 40.0% | 16.0 |" in table
    assert [r["efficiency"] for r in rows] == [1.0, 0.96, 0.98, 0.94, 1.04, 0.95]  # each run against the 1-GPU median
    with pytest.raises(SystemExit):
        scaling.main(["--repeats", "0"])


def _planted_run(run_dir: Path, optim: dict, val: dict[int, float], rates: dict[int, float], tokens_per_step: int):
    import yaml

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"optim": optim}))
    rows = ["step,tokens_seen,perf/tokens_per_sec,val/loss"]
    for step in sorted(set(val) | set(rates)):
        seen = (step + 1) * tokens_per_step if step in rates else ""
        rows.append(f"{step},{seen},{rates.get(step, '')},{val.get(step, '')}")
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_time_to_target_counts_training_time_up_to_the_first_validation_below_target(tmp_path):
    import time_to_target

    # logged every 10 steps at 1000 tokens/step; the first interval (compilation) at 10 tokens/s is counted at the
    # second's rate; val at or below 2.0 first at step 29
    rates = {9: 10.0, 19: 2000.0, 29: 4000.0, 39: 4000.0}
    _planted_run(tmp_path / "a", {"name": "muon", "lr": 0.01, "adamw_lr": 0.001}, {19: 2.5, 29: 2.0, 39: 1.5}, rates,
                 1000)
    r = time_to_target.time_to_target(tmp_path / "a", 2.0)
    assert r["steps"] == 30 and r["tokens"] == 30_000 and r["final_val_loss"] == 1.5
    assert r["seconds"] == pytest.approx(10_000 / 2000 + 10_000 / 2000 + 10_000 / 4000)
    assert r["lr"] == "0.01 (AdamW half 0.001)"
    assert time_to_target.time_to_target(tmp_path / "a", 1.0)["steps"] is None


def test_mup_transfer_table_finds_the_best_lr_per_width_and_seed(tmp_path, capsys):
    import mup_transfer
    import yaml

    losses = {("mup", 64, 1e-3): [2.2, 2.3], ("mup", 64, 3e-3): [2.0, 2.1], ("mup", 512, 1e-3): [2.1, 1.95],
              ("mup", 512, 3e-3): [1.9, 2.0]}
    job = 0
    for (parametrization, width, lr), values in losses.items():
        for seed, loss in enumerate(values):
            d = tmp_path / str(job)
            d.mkdir()
            (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "optim": {"lr": lr}, "model": {
                "parametrization": parametrization, "embed_dim": width}}))
            (d / "summary.json").write_text(json.dumps({"status": "finished", "val_loss": loss}))
            job += 1
    assert mup_transfer.collect(tmp_path)[("mup", 512, 1e-3)] == {0: 2.1, 1: 1.95}
    sys.argv = ["mup_transfer.py", str(tmp_path)]
    mup_transfer.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| mup | 64 | 2.250 ± 0.071 | 2.050 ± 0.071 | 0.003 (2/2) |"
    assert lines[3] == "| mup | 512 | 2.025 ± 0.106 | 1.950 ± 0.071 | 0.003 (1/2) |"  # seed 1: 1e-3 wins


def test_attention_kinds_script_on_cpu(tmp_path, monkeypatch):
    import attention_kinds

    out = tmp_path / "kinds.json"
    monkeypatch.setattr(sys, "argv", ["attention_kinds.py", "--device", "cpu", "--seq-len", "16", "--batch-size", "1",
                                      "--width", "32", "--heads", "8", "--layers", "6", "--vocab", "64", "--window",
                                      "4", "--warmup", "0", "--steps", "1", "--repeats", "1", "--mla-dims", "8", "16",
                                      "4", "4", "8", "--json", str(out)])
    attention_kinds.main()
    rows = json.loads(out.read_text())
    assert list(rows) == ["mha", "gqa (8 kv)", "mqa", "sliding_window 4", "gqa + sinks", "local x5 / global", "mla"]
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    params = {name: row["params"] for name, row in rows.items()}
    assert params["sliding_window 4"] == params["local x5 / global"] == params["gqa (8 kv)"]
    assert params["gqa + sinks"] - params["gqa (8 kv)"] == 6 * 8  # one sink logit per head and layer
    assert params["mqa"] < params["mha"]
