"""End-to-end training on CPU: the run dir, learning, resume equality, W&B offline files, generation CLI."""

import csv
import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from olm.train.config import conf_dir, register_configs
from olm.train.run import train

CONF_DIR = conf_dir()
from wandb_records import summarize

TINY_RUN = [
    "model=lm_tiny", "data.tokenizer=byte", "data.seq_len=32", "data.batch_size=8", "data.val_batches=4", "trainer=cpu",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "sample.max_new_tokens=8",
    "optim.lr=3e-3", "callbacks.eval.tasks=[]",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("olm-cache")


def run(tmp_path: Path, cache_dir: Path, overrides=(), name="run") -> tuple[Path, float]:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_RUN, *overrides])
    out = tmp_path / name
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.name = name
    value = train(cfg)
    return out, value


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(run_dir: Path) -> dict[float, float]:
    return {float(r["tokens_seen"]): float(r["train/loss"]) for r in read_metrics(run_dir) if r.get("train/loss")}


def test_tiny_run_learns_and_writes_its_run_dir(tmp_path, cache_dir, caplog):
    caplog.set_level("WARNING", logger="olm")
    out, value = run(tmp_path, cache_dir, ["trainer.max_steps=60", "trainer.val_check_interval=30", "logger=wandb"])
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt", "model/config.json",
                 "model/model.safetensors", "model/tokenizer/tokenizer_meta.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 60
    assert summary["tokens_seen"] == 60 * 8 * 32
    assert summary["num_parameters"] == 40_256  # lm_tiny at vocab 256: see test_blocks' formula
    assert summary["val_loss"] == pytest.approx(value)
    assert summary["val_bpb"] == pytest.approx(value / math.log(2))  # byte tokens: one byte per token
    assert 0.5 < summary["gzip_bpb"] < 8 and summary["tokens_per_sec"] > 0 and summary["mfu"] is None  # no MFU on CPU
    assert 0.5 < summary["bz2_bpb"] < 8 and 0.5 < summary["xz_bpb"] < 8
    losses = list(train_losses(out).values())
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5  # it learned
    assert value < math.log(256) - 1.0  # well below a uniform guess
    best = Path(summary["checkpoint"])
    assert best.is_file() and best.parent.name == "checkpoints"
    # W&B offline run in the run dir: read its records back
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    record = summarize(runs[0])
    assert record["config"]["model"]["embed_dim"] == 32 and record["config"]["num_parameters"] == 40_256
    logged = [h["train/loss"] for h in record["history"] if "train/loss" in h]
    wandb_warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert not wandb_warnings and logged == pytest.approx(losses, abs=1e-6), (len(logged), wandb_warnings)
    assert record["summary"]["val_loss"] == pytest.approx(summary["val_loss"])


def test_resume_continues_the_same_loss_curve(tmp_path, cache_dir):
    common = ["trainer.val_check_interval=10", "logger=none", "sample.max_new_tokens=0", "export=false"]
    full, _ = run(tmp_path, cache_dir, [*common, "trainer.max_steps=20"], name="full")
    first, _ = run(tmp_path, cache_dir, [*common, "trainer.max_steps=10", "scheduler.total_steps=20"], name="part")
    with_resume = [*common, "trainer.max_steps=20", "resume=auto"]
    resumed, _ = run(tmp_path, cache_dir, with_resume, name="part")  # same run dir: picks up last.ckpt
    expected = train_losses(full)
    got = train_losses(resumed)  # steps 1-10 from the first part (kept in metrics.csv), 11-20 after the resume
    assert len(expected) == 20 and sorted(got) == sorted(expected)
    for tokens, loss in expected.items():
        assert got[tokens] == pytest.approx(loss, abs=1e-5), tokens


def test_no_wandb_files_when_disabled(tmp_path, cache_dir):
    out, _ = run(tmp_path, cache_dir, ["trainer.max_steps=4", "trainer.val_check_interval=4", "logger=none", "sample.max_new_tokens=0"])
    assert not (out / "wandb").exists()
    assert (out / "metrics.csv").is_file() and (out / "summary.json").is_file()


def test_generate_cli_from_run_dir(tmp_path, cache_dir, capsys):
    from olm.cli import main

    out, _ = run(tmp_path, cache_dir, ["trainer.max_steps=4", "trainer.val_check_interval=4", "logger=none", "sample.max_new_tokens=0"])
    capsys.readouterr()
    args = ["generate", "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    assert main([*args, "--ckpt", str(out)]) == 0
    from_dir = capsys.readouterr().out
    assert from_dir.startswith("def ") and len(from_dir.rstrip("\n").encode("utf-8", "surrogateescape")) >= 4
    assert main([*args, "--ckpt", str(out / "checkpoints" / "last.ckpt")]) == 0
    assert capsys.readouterr().out == from_dir  # same weights either way, greedy decoding


def test_resume_continues_the_same_wandb_run(tmp_path, cache_dir, caplog):
    import time

    common = ["trainer.val_check_interval=4", "logger=wandb", "sample.max_new_tokens=0", "export=false"]
    run(tmp_path, cache_dir, [*common, "trainer.max_steps=4", "scheduler.total_steps=8"], name="w")
    out, _ = run(tmp_path, cache_dir, [*common, "trainer.max_steps=8", "resume=auto"], name="w")
    # Both parts may start within one second: W&B then names the second dir "offline-run-<time>-<id>-1".
    runs = sorted((out / "wandb").glob("offline-run-*"), key=lambda p: (len(p.name), p.name))
    files = [next(p.glob("run-*.wandb")) for p in runs]
    assert len(files) == 2
    assert len({f.stem.removeprefix("run-") for f in files}) == 1  # one W&B run continued, not two

    def steps():
        return [h["trainer/global_step"] for f in files for h in summarize(f)["history"] if "train/loss" in h]

    deadline = time.monotonic() + 30  # W&B's service process may still be writing the last records of a finished run
    while steps() != list(range(8)) and time.monotonic() < deadline:
        time.sleep(0.5)
    wandb_warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]  # why, if rows are missing
    assert steps() == list(range(8)), (steps(), wandb_warnings)
    # W&B's own step continues too (an offline run cannot ask the server where it was): the resumed part's rows
    # are at steps 4..7, not at 0..3 again, so the two parts line up as one history.
    own_steps = [[h["_step"] for h in summarize(f)["history"] if "train/loss" in h] for f in files]
    assert own_steps == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_bad_inputs_fail_before_training(tmp_path, cache_dir):
    from olm.errors import ConfigError

    cases = {
        ("data.batch_size=0",): "data.batch_size=0 must be a positive integer",
        ("data.seq_len=64", "model.max_seq_len=32"): "data.seq_len=64 exceeds model.max_seq_len=32",
        ("model.vocab_size=100",): "model.vocab_size=100 is smaller than the tokenizer's vocabulary (256",
        ("resume=sometimes",): "resume='sometimes' is not known",
        ("scheduler.name=cosin",): "scheduler.name='cosin' is not known; did you mean 'cosine'? known: cosine, linear, constant, wsd",
        ("model.num_heads=3",): "model.embed_dim=32 must be divisible by model.num_heads=3",
        ("float8=fp8",): "float8='fp8' must be false, true (= tensorwise), tensorwise, rowwise",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError) as info:
            run(tmp_path, cache_dir, ["trainer.max_steps=2", "logger=none", *overrides], name="bad")
        assert message in str(info.value) and "\n" not in str(info.value), overrides


def test_training_steps_between_log_steps_do_not_read_device_values(tmp_path, cache_dir, monkeypatch):
    """A read of a tensor's value (.item(), float(), bool()) waits for the device: between log steps the training
    loop must not do one, or the GPU idles while the host catches up. Lightning converts every metric logged with
    prog_bar=True at every batch, so the progress bar shows a number read at the log step instead."""
    import torch

    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    from olm.train.callbacks import _ShowsLastLoss
    from olm.train.module import LMModule

    state = {"step": None, "reads": [], "bars": []}

    def on_train_batch_start(self, batch, batch_idx):
        state["step"] = self.trainer.global_step + 1  # the optimizer step this batch completes
        state["bars"] += [cb for cb in self.trainer.callbacks if isinstance(cb, _ShowsLastLoss)]

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            if state["step"] is not None and self.device.type != "meta":
                state["reads"].append(state["step"])
            return original(self, *args)
        return read

    monkeypatch.setattr(LMModule, "on_train_batch_start", on_train_batch_start, raising=False)
    for name in ("item", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    # fused AdamW, as on a GPU: the CPU's for-loop AdamW reads its step counters; the fused kernel does not
    out, _ = run(tmp_path, cache_dir, ["trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.log_every_n_steps=5",
                                       "trainer.enable_progress_bar=true", "optim=adamw", "optim.fused=true", "logger=csv",
                                       "sample.max_new_tokens=0", "export=false"])
    assert state["reads"] and {step % 5 for step in state["reads"]} == {0}  # only in batches that end at a log step
    bar, module_loss = state["bars"][-1], list(train_losses(out).values())[-1]
    assert isinstance(bar, RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar)  # the bar Lightning would pick
    assert bar.get_metrics(bar.trainer, bar.trainer.lightning_module)["loss"] == f"{module_loss:.4g}"


def test_progress_bar_follows_lightnings_choice_and_switch(monkeypatch):
    """olm's bar is the class Lightning would pick (rich when installed, else tqdm), on for true and for null (as in
    Lightning), off for false and 0."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    import olm.train.callbacks as callbacks

    for rich, expected in ((True, RichProgressBar), (False, TQDMProgressBar)):
        monkeypatch.setattr(callbacks, "_RICH_AVAILABLE", rich)
        for enabled in (True, None):
            (bar,) = callbacks.progress_bars(enabled)
            assert isinstance(bar, expected) and isinstance(bar, callbacks._ShowsLastLoss)
        assert callbacks.progress_bars(False) == [] and callbacks.progress_bars(0) == []
    bar = callbacks.LossProgressBar()

    class Module:
        last_train_loss = 2.3456789

    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, pl_module: {"v_num": 0})
    assert bar.get_metrics(None, Module()) == {"loss": "2.346"}  # and not the logger id
    Module.last_train_loss = None  # before the first log step: no loss shown
    assert bar.get_metrics(None, Module()) == {}


def test_the_final_lines_show_the_reference_compressors():
    from olm.train.outcome import final_lines

    summary = {"val_loss": 1.1, "val_bpb": 1.598, "gzip_bpb": 1.9365, "bz2_bpb": 1.711, "xz_bpb": 1.7817,
               "tokens_per_sec": 8000.0, "mfu": None}
    lines = final_lines(Path("outputs/runs/x"), summary)
    assert "val bits/byte 1.598 (on the same text: gzip -9 1.937, bz2 -9 1.711, xz -9e 1.782)" in lines
    lines = final_lines(Path("outputs/runs/x"), {**summary, "gzip_bpb": None, "bz2_bpb": None, "xz_bpb": None})
    assert "val bits/byte 1.598" in lines  # a bin source without a byte-level tokenizer: no text to compress
