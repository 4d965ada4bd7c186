"""Faults and bad input: kill -9 and resume, atomic checkpoints, corrupted files, NaN, dead DDP ranks, full disk,
W&B failures, one-line errors for every bad input, and what olm never does (unpickle, listen, run config code).

Faults are injected without touching the product: subprocess runs get a ``sitecustomize`` module (written to a temp
dir and put first on PYTHONPATH, so Python imports it at start-up) that patches olm only when the environment variable
OLM_TEST_FAULT is set, and only once ``olm.train.module`` is imported. This reaches every process of a run (DDP child
ranks inherit the environment) and needs no test hooks, config keys or plugin entries in olm itself. In-process runs
use pytest's monkeypatch for the same faults.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import open_dict

import olm.train.module  # noqa: F401  (Lightning at collection: its log handler must not bind to a test's capsys)
from olm.train import cli
from olm.train.cli import run_job
from olm.train.compose import compose as compose_run_config
from olm.train.outcome import one_line_error
from olm.train.run import train
from olm.checkpoint import load_checkpoint
from post_import import after_import

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=lm_tiny", "data.tokenizer=byte", "data.seq_len=32", "data.batch_size=8", "data.val_batches=2",
        "trainer=cpu", "logger=none", "sample.max_new_tokens=0", "export=false", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "callbacks.eval.tasks=[]"]

FAULTS = '''
"""Test-only fault injection for olm subprocesses, active only when OLM_TEST_FAULT (JSON) is set."""
import importlib.abc, json, os, signal, sys, time

SPEC = json.loads(os.environ.get("OLM_TEST_FAULT") or "{}")


def patch(module):
    state = {"batches": 0, "nan": False, "writes": {}}
    die = SPEC.get("die")  # {"rank": r, "batch": n}: that rank SIGKILLs itself at its n-th training batch
    step, loss = module.LMModule.training_step, module.LMModule.loss

    def training_step(self, batch, batch_idx):
        state["batches"] += 1
        if die and int(os.environ.get("LOCAL_RANK", 0)) == die["rank"] and state["batches"] == die["batch"]:
            with open(die["marker"], "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        state["nan"] = state["batches"] in SPEC.get("nan_batches", ())
        try:
            return step(self, batch, batch_idx)
        finally:
            state["nan"] = False

    def nan_loss(self, *args, **kwargs):
        value = loss(self, *args, **kwargs)
        return value * float("nan") if state["nan"] else value

    module.LMModule.training_step, module.LMModule.loss = training_step, nan_loss

    import lightning.pytorch as pl

    save = pl.Trainer.save_checkpoint
    hang = SPEC.get("hang_in_write")  # {"name": file name, "nth": n}: write half of it, then hang (to be killed)

    def slow_save(self, filepath, *args, **kwargs):
        save(self, filepath, *args, **kwargs)
        name = os.path.basename(filepath)
        state["writes"][name] = state["writes"].get(name, 0) + 1
        if hang and name == hang["name"] and state["writes"][name] == hang["nth"]:
            with open(filepath, "r+b") as f:
                f.truncate(os.path.getsize(filepath) // 2)
            with open(hang["marker"], "w") as f:
                f.write(filepath)
            time.sleep(3600)

    pl.Trainer.save_checkpoint = slow_save


''' + after_import('olm.train.module') + '''

if SPEC:
    sys.meta_path.insert(0, AfterImport())
'''


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("olm-cache")


@pytest.fixture(scope="module")
def faults_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    (d / "sitecustomize.py").write_text(FAULTS)
    return d


def olm_train(args, cache_dir, faults_dir, fault: dict, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(faults_dir), os.environ.get("PYTHONPATH", "")]),
           "OLM_TEST_FAULT": json.dumps(fault)}
    for key in list(env):  # a clean single-node start (other tests may leave cluster variables behind)
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK",
                                                                  "WORLD_SIZE", "RANK", "GROUP_RANK", "WANDB_API_KEY"):
            del env[key]
    return subprocess.Popen([sys.executable, "-m", "olm.train", *TINY, f"paths.cache_dir={cache_dir}", *args],
                            stdout=stdout, stderr=stderr, text=True, env=env, cwd=ROOT)


DDP_TEST = "test_a_dead_ddp_rank_ends_the_job_within_60_seconds"


@pytest.fixture(scope="module", autouse=True)
def ddp_run_with_a_dying_rank(request, tmp_path_factory, cache_dir, faults_dir):
    """The DDP job of DDP_TEST, started with the module so that its two start-ups (~8 s of imports each, one core)
    overlap the other tests; DDP_TEST, last in the module, checks how it ended."""
    if not any(getattr(item, "originalname", item.name) == DDP_TEST for item in request.session.items):
        yield None
        return
    d = tmp_path_factory.mktemp("ddp")
    out, err = open(d / "stdout", "w"), open(d / "stderr", "w")
    proc = olm_train(["trainer=ddp_cpu", "data.batch_size=4", "trainer.max_steps=50", "trainer.val_check_interval=50",
                      f"hydra.run.dir={d / 'run'}"], cache_dir, faults_dir,
                     {"die": {"rank": 1, "batch": 3, "marker": str(d / "died")}}, stdout=out, stderr=err)
    ended = {}
    watcher = threading.Thread(target=lambda: ended.setdefault("at", (proc.wait(), time.time())[1]), daemon=True)
    watcher.start()
    yield SimpleNamespace(proc=proc, dir=d, watcher=watcher, ended=ended)
    if proc.poll() is None:
        proc.kill()
    out.close()
    err.close()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended (rc={proc.returncode}) before {path.name} appeared:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def config(tmp_path: Path, cache_dir: Path, overrides=(), name="run"):
    cfg = compose_run_config([*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.name = name
    return cfg


def run_cli(cfg, capsys) -> tuple[int, str]:
    """run_job as olm-train runs it: (exit code, stderr)."""
    capsys.readouterr()
    try:
        run_job(cfg)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The single ``error:`` line of a failed run; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ---- kill -9, atomic checkpoints, resume


def test_sigkill_during_a_checkpoint_write_then_resume_auto_equals_an_uninterrupted_run(
        tmp_path, cache_dir, faults_dir, monkeypatch):
    """Killed (SIGKILL) while writing the step-8 checkpoint, after the step-4 one: last.ckpt is still the intact
    step-4 file, and resume=auto continues to the same per-step losses as a run that was never interrupted."""
    run_dir, marker = tmp_path / "killed", tmp_path / "writing"
    common = ["trainer.max_steps=12", "trainer.val_check_interval=4", "scheduler.warmup_steps=2"]
    proc = olm_train([*common, f"hydra.run.dir={run_dir}"], cache_dir, faults_dir,
                     {"hang_in_write": {"name": "last.ckpt.tmp", "nth": 2, "marker": str(marker)}})
    try:
        wait_for(marker, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.ckpt.tmp").is_file()  # the half-written file the kill left behind
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 4  # the previous one survived intact
    from olm.checkpoint import latest_checkpoint

    assert latest_checkpoint(run_dir) == ckpts / "last.ckpt"
    assert {0, 1, 2, 3} <= set(losses(run_dir))  # metrics.csv is flushed with every checkpoint file

    threads = torch.get_num_threads()
    try:  # one thread, as in the subprocess (OMP_NUM_THREADS=1): bit-identical arithmetic
        resume_and_compare(tmp_path, cache_dir, monkeypatch, run_dir, [*common, "cpu_threads=1"])
    finally:
        torch.set_num_threads(threads)


def resume_and_compare(tmp_path, cache_dir, monkeypatch, run_dir, common):
    ckpts = run_dir / "checkpoints"
    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    resumed = config(tmp_path, cache_dir, [*common, "resume=auto"], name="killed")
    train(resumed)
    assert loads and all(w is True for w in loads), loads  # olm's and Lightning's resume loads: weights_only
    monkeypatch.undo()
    assert not (ckpts / "last.ckpt.tmp").exists()  # the leftover is cleaned up
    train(config(tmp_path, cache_dir, common, name="uninterrupted"))
    got, expected = losses(run_dir), losses(tmp_path / "uninterrupted")
    assert sorted(expected) == list(range(12))
    assert got == expected
    assert summary(run_dir)["status"] == "finished" and summary(run_dir)["steps"] == 12


# ---- NaN / inf


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({7}): the loss of the 7th training batch of this process is NaN."""
    from olm.train.module import LMModule

    bad, seen = set(), {"n": 0}
    loss = LMModule.loss

    def nan_loss(self, idx, targets, reduction="mean"):
        value = loss(self, idx, targets, reduction)
        if self.training:
            seen["n"] += 1
            if seen["n"] in bad:
                return value * float("nan")
        return value

    monkeypatch.setattr(LMModule, "loss", nan_loss)

    def set_batches(batches):
        bad.clear()
        bad.update(batches)
        seen["n"] = 0

    return set_batches


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, capsys, nan_at):
    common = ["trainer.max_steps=12", "trainer.val_check_interval=4", "trainer.log_every_n_steps=5"]
    nan_at({7})
    code, err = run_cli(config(tmp_path, cache_dir, common, name="nan"), capsys)
    line = error_line(err)
    assert code == 1 and "non-finite training loss (nan) at step 7" in line, line
    assert "last.ckpt" in line
    run_dir = tmp_path / "nan"
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4 and all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert summary(run_dir)["status"] == "failed" and "step 7" in summary(run_dir)["error"]
    assert not (run_dir / "model").exists()  # nothing exported from diverged weights

    # callbacks.nan_guard.skip_batches=N: N bad batches are skipped (with a warning), the N+1-th stops the run
    nan_at({6, 7})
    code, err = run_cli(config(tmp_path, cache_dir, [*common, "callbacks.nan_guard.skip_batches=2"], name="skip"), capsys)
    assert code == 0 and summary(tmp_path / "skip")["status"] == "finished"
    nan_at({6, 7})
    code, err = run_cli(config(tmp_path, cache_dir, [*common, "callbacks.nan_guard.skip_batches=1"], name="skip1"), capsys)
    assert code == 1 and "non-finite loss (nan) at step 7 after skipping 1 batch(es)" in error_line(err)


# ---- corrupted files, untrusted checkpoints


class Payload:
    """Unpickling this runs code: a checkpoint from a stranger must never be unpickled."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_corrupted_or_unsafe_checkpoints_are_one_line_errors_never_a_fresh_start(tmp_path, cache_dir, capsys, monkeypatch):
    common = ["trainer.max_steps=4", "trainer.val_check_interval=4"]
    train(config(tmp_path, cache_dir, common, name="run"))
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    rows = (run_dir / "metrics.csv").read_text()
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "olm": {"x": Payload()}}, evil)
    cases = {
        "truncated": (good[: len(good) // 2], ["resume=auto"]),
        "garbage": (os.urandom(4096), ["resume=auto"]),
        "empty": (b"", ["resume=auto"]),
        "pickle": (evil.read_bytes(), ["resume=auto"]),
    }
    for case, (content, overrides) in cases.items():
        last.write_bytes(content)
        (run_dir / "summary.json").unlink(missing_ok=True)
        code, err = run_cli(config(tmp_path, cache_dir, [*common, "trainer.max_steps=8", *overrides], name="run"), capsys)
        line = error_line(err)
        assert code == 2 and f"checkpoint {str(last)!r} cannot be loaded" in line, (case, line)
        assert (run_dir / "metrics.csv").read_text() == rows, case  # nothing was trained
        assert summary(run_dir)["status"] == "failed"
    assert not (tmp_path / "pwned").exists()
    code, err = run_cli(config(tmp_path, cache_dir, [*common, f"ckpt_path={evil}"], name="other"), capsys)
    assert code == 2 and str(evil) in error_line(err) and not (tmp_path / "pwned").exists()

    # exported models (safetensors): truncated weights or a broken config.json -> one line naming the file
    from olm.cli import main as olm_cli
    from olm.nn import Block

    last.write_bytes(good)
    model_dir = load_model_dir(run_dir, tmp_path)
    weights = model_dir / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) // 3])
    assert olm_cli(["generate", "--ckpt", str(model_dir), "--prompt", "a", "--max-new-tokens", "2"]) == 2
    assert f"{weights} cannot be loaded" in error_line(capsys.readouterr().err)
    weights.write_bytes(full)
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not a valid olm block config") as info:
        Block.load(model_dir)
    assert "\n" not in str(info.value)


def load_model_dir(run_dir: Path, tmp_path: Path) -> Path:
    """Export the model of a run's last.ckpt as a Block.save directory."""
    from olm.checkpoint import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(run_dir / "checkpoints" / "last.ckpt"))
    return model.save(tmp_path / "exported")


# ---- full disk


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, cache_dir, capsys, monkeypatch):
    from lightning.fabric.plugins.io import torch_io

    real_save, writes = torch_io._atomic_save, {"n": 0}

    def disk_fills_up(checkpoint, filepath):
        if os.path.basename(filepath) == "last.ckpt.tmp":
            writes["n"] += 1
            if writes["n"] == 2:  # the second last.ckpt: half of it fits, then the disk is full
                real_save(checkpoint, filepath)
                with open(filepath, "r+b") as f:
                    f.truncate(os.path.getsize(filepath) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filepath)
        real_save(checkpoint, filepath)

    monkeypatch.setattr(torch_io, "_atomic_save", disk_fills_up)
    code, err = run_cli(config(tmp_path, cache_dir, ["trainer.max_steps=12", "trainer.val_check_interval=4"]), capsys)
    line = error_line(err)
    ckpts = tmp_path / "run" / "checkpoints"
    assert code == 1 and f"cannot write checkpoint {str(ckpts / 'last.ckpt')!r}: No space left on device" in line, line
    assert "the previous checkpoint is kept" in line
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 4
    assert not list(ckpts.glob("*.tmp"))
    assert summary(tmp_path / "run")["status"] == "failed"

    # a full disk anywhere else (an export, metrics, ...) is also one line, exit 1
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/model.safetensors")
    assert one_line_error(exc) == (1, "No space left on device (/x/model.safetensors)")
    assert one_line_error(KeyError("a bug")) is None  # bugs keep their traceback

    import olm
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(OSError):
        olm.build_model({"vocab_size": 16, "embed_dim": 8, "num_heads": 2, "num_layers": 1, "max_seq_len": 8}).save(tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []  # no partial file left


# ---- W&B failures; nothing listens on a port


def listening_sockets(pid: int, exclude: set[int] = frozenset()) -> list[str]:
    """Listening TCP and bound UDP sockets (any address) owned by ``pid`` or its descendants (e.g. wandb-core),
    except the process trees rooted at ``exclude`` (other tests' subprocesses)."""
    pids, changed = {pid}, True
    while changed:
        changed = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            child = int(stat.parent.name)
            if int(fields[1]) in pids and child not in pids and child not in exclude:
                pids.add(child)
                changed = True
    inodes = set()
    for p in pids:
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            listening = state == "0A" if table.startswith("tcp") else True
            if inode in inodes and listening:
                found.append(f"{table} {local}")
    return found


def test_wandb_failures_never_stop_training_and_nothing_listens(tmp_path, cache_dir, monkeypatch, caplog,
                                                               ddp_run_with_a_dying_rank):
    import wandb
    from wandb.sdk.wandb_run import Run

    from olm.train.callbacks import ThroughputMonitor

    real_init = wandb.init

    def init(*args, **kwargs):
        if kwargs.get("mode") == "online":
            raise wandb.errors.CommError("api.wandb.ai is unreachable (test)")
        return real_init(*args, **kwargs)

    def broken_log(self, *args, **kwargs):
        raise RuntimeError("wandb-core went away (test)")

    sockets = []
    on_batch_end = ThroughputMonitor.on_train_batch_end
    ddp = ddp_run_with_a_dying_rank  # runs beside this test: its sockets are not this run's
    exclude = {ddp.proc.pid} if ddp is not None else set()

    def watch(self, trainer, *args):
        if trainer.global_step == 2:
            sockets.append(listening_sockets(os.getpid(), exclude))
        return on_batch_end(self, trainer, *args)

    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key and a server that answers: the run starts online
    monkeypatch.setattr("olm.train.wandb_logging.unreachable", lambda host, port: None)
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(Run, "log", broken_log)
    monkeypatch.setattr(ThroughputMonitor, "on_train_batch_end", watch)
    caplog.set_level("WARNING", logger="olm")
    train(config(tmp_path, cache_dir, ["trainer.max_steps=4", "trainer.val_check_interval=4", "logger=wandb",
                                          "logger.mode=online"]))
    run_dir = tmp_path / "run"
    assert summary(run_dir)["status"] == "finished" and len(losses(run_dir)) == 4
    text = caplog.text
    assert "W&B (online) could not start: api.wandb.ai is unreachable (test)" in text
    assert "W&B online failed; logging offline to" in text
    assert "W&B log failed (wandb-core went away (test)); that row is missing from W&B" in text
    assert "W&B failed 3 times in a row; W&B logging is off for the rest of this run" in text
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert sockets == [[]]  # W&B's service talks over a Unix socket; no TCP/UDP port is opened


def test_a_failed_wandb_call_loses_only_its_own_row(tmp_path, monkeypatch, caplog):
    """One W&B call that fails (a busy service, a full socket) must not turn W&B off for the rest of the run: the
    record keeps every other row, and the log says how many calls W&B missed."""
    import wandb
    from wandb.sdk.wandb_run import Run

    from olm.train.config import LoggerConfig
    from olm.train.wandb_logging import finish_wandb, make_wandb_logger
    from wandb_records import summarize

    real_log, calls = Run.log, []

    def flaky_log(self, data, *args, **kwargs):
        calls.append(kwargs.get("step"))
        if len(calls) == 4:
            raise RuntimeError("service busy (test)")
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", flaky_log)
    caplog.set_level("WARNING", logger="olm")
    logger = make_wandb_logger(LoggerConfig(mode="offline", group=None, job_type=None), "flaky", tmp_path)
    for step in range(10):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.finalize("success")
    finish_wandb()
    record = summarize(next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")))
    logged = [row["train/loss"] for row in record["history"] if "train/loss" in row]
    assert logged == [float(s) for s in range(10) if s != 3]
    assert "W&B log failed (service busy (test)); that row is missing from W&B" in caplog.text
    assert "W&B missed 1 logging calls of this run" in caplog.text
    assert "logging is off" not in caplog.text


# ---- bad input: one line naming the key and the allowed values, before any training


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "bin").mkdir()
    np.arange(0, 300, dtype=np.uint16).repeat(4).tofile(d / "bin" / "train.bin")
    np.arange(0, 300, dtype=np.uint16).tofile(d / "bin" / "val.bin")
    (d / "empty.txt").write_text("")
    (d / "empty_dir").mkdir()
    (d / "a_file").write_text("x")
    return d


BAD_COMMAND_LINES = {
    "unknown preset": (["model=lm_tinyy"], "model=lm_tinyy is not a known option of 'model'; did you mean 'lm_tiny'? known: "),
    "unknown component": (["model/attention=gqa2"], "model/attention=gqa2 is not a known option of 'model/attention'; did you mean 'gqa'? known: gqa, mha, mla, mqa, sliding_window"),
    "unknown key": (["trainer.max_stepz=5"], "trainer.max_stepz is not a config key; did you mean 'max_steps'? known keys of 'trainer': "),
    "unknown component key": (["model.attention.num_kv_head=2"], "model.attention.num_kv_head is not a config key; known keys of 'model.attention': bias, head_dim, name, "),
    "wrong type": (["model.num_heads=two"], "model.num_heads='two': Value 'two' of type 'str' could not be converted to Integer"),
    "malformed override": (["optim.lr=[1,"], "cannot parse the override 'optim.lr=[1,'"),
    "unknown optimizer": (["optim=adamx"],
                          "optim=adamx is not a known option of 'optim'; did you mean 'adamw'? known: adamw, lion, muon, sgd"),
    "key of another optimizer": (["optim=adamw", "optim.momentum=0.9"],
                                 "optim.momentum is not a config key; known keys of 'optim': "),
    "negative lr multiplier": (["optim.lr_multipliers.head=-1"],
                               "optim.lr_multipliers.head=-1.0 must be a number >= 0 (0 freezes the role)"),
    "muP without a base width": (["model.parametrization=mup"],
                                 "model.parametrization=mup needs model.mup_base_width: the width (embed_dim)"),
    "unknown parametrization": (["model.parametrization=mu"],
                                "model.parametrization='mu' is not known; known: standard, mup"),
    "muP with SGD": (["optim=sgd", "model.parametrization=mup", "model.mup_base_width=16"],
                     "model.parametrization=mup works with optim=adamw, lion or muon"),
    "Muon with FSDP": (["optim=muon", "trainer.strategy=fsdp"],
                       "optim=muon does not work with trainer.strategy=fsdp"),
    "code from a config": (["+hydra.callbacks.x._target_=os.system"],
                           "hydra.callbacks.x._target_='os.system' is not allowed: a config may only make Hydra instantiate"),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES)
def test_bad_command_lines_are_one_line_errors(case, monkeypatch, capsys):
    overrides, message = BAD_COMMAND_LINES[case]
    monkeypatch.setattr(sys, "argv", ["olm-train", *TINY, *overrides])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert message in line, line


BAD_RUNS = {
    "token ids >= vocab_size": (["data=bin", "data.path={d}/bin", "data.vocab_size=256", "model.vocab_size=256"],
                                "token id 299 in the train split is >= the vocab size 256"),
    "data path not set": (["data=text"], "data.path must be set for data.source='text' (a file or a directory)"),
    "missing data path": (["data=text", "data.path={d}/nothing"], "data.path='{d}/nothing' does not exist"),
    "empty data file": (["data=text", "data.path={d}/empty.txt"], "data.path='{d}/empty.txt' is empty"),
    "empty data dir": (["data=text", "data.path={d}/empty_dir"], "matches no file under data.path='{d}/empty_dir'"),
    "unwritable output dir": (["paths.output_dir={d}/a_file/run"], "paths.output_dir='{d}/a_file/run' is not writable"),
    "negative lr": (["optim.lr=-0.1"], "optim.lr=-0.1 must be a positive number"),
    "zero steps": (["trainer.max_steps=0"], "trainer.max_steps=0 must be a positive integer"),
    "bad skip count": (["callbacks.nan_guard.skip_batches=-1"], "callbacks.nan_guard.skip_batches=-1 must be an integer >= 0"),
    "bad betas": (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    "cuda-graph compile mode": (["compile_mode=reduce-overhead"],
                                "compile_mode='reduce-overhead' is not known; known: default, max-autotune-no-cudagraphs"),
    "unknown inductor option": (["+compile_options.coordinate_descent=true"],
                                "compile_options.coordinate_descent is not a torch inductor option"),
    "bad compile scope": (["compile_scope=layers"], "compile_scope='layers' is not known; known: model, blocks"),
    "bad gradient compression": (["trainer.strategy={{name:ddp,gradient_compression:int8}}"],
                                 "trainer.strategy.gradient_compression='int8' is not known; known: none, bf16, fp16"),
}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_inputs_are_one_line_errors_before_training(case, tmp_path, cache_dir, data_files, capsys):
    overrides, message = BAD_RUNS[case]
    overrides = [o.format(d=data_files) for o in overrides]
    output_dir = [o.split("=", 1)[1] for o in overrides if o.startswith("paths.output_dir=")]
    cfg = config(tmp_path, cache_dir, ["trainer.max_steps=2", *[o for o in overrides if not o.startswith("paths.")]])
    if output_dir:
        with open_dict(cfg):
            cfg.paths.output_dir = output_dir[0]
    code, err = run_cli(cfg, capsys)
    line = error_line(err)
    assert code == 2 and message.format(d=data_files) in line, line
    assert not (tmp_path / "run" / "metrics.csv").exists()


# ---- DDP: a dead rank ends the job, fast and in one line


@pytest.mark.slow
def test_a_dead_ddp_rank_ends_the_job_within_60_seconds(ddp_run_with_a_dying_rank):
    """Rank 1 of a 2-process gloo job SIGKILLs itself at its 3rd batch: the job exits non-zero well within 60 s of
    the death, with one line naming the dead rank, and its summary.json says failed."""
    run = ddp_run_with_a_dying_rank
    run.watcher.join(timeout=240)
    err = (run.dir / "stderr").read_text()
    assert "at" in run.ended, "the job hung:\n" + err[-3000:]
    assert (run.dir / "died").exists(), err[-3000:]
    assert run.ended["at"] - float((run.dir / "died").read_text()) < 60
    assert run.proc.returncode == 1, err[-3000:]
    line = error_line(err)
    assert re.search(r"error: rank 1 \(pid \d+\) was killed by SIGKILL; the whole job stops", line), line
    assert summary(run.dir / "run")["status"] == "failed"


# ---- security: no pickle, no code from configs


def test_no_unpickling_no_config_code_and_no_listening_in_the_sources():
    sources = {p: p.read_text() for p in (ROOT / "olm").rglob("*.py")}
    for path, text in sources.items():
        rel = path.relative_to(ROOT)
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), rel
        assert "weights_only=False" not in text, rel
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), (rel, call.group(0))
        assert not re.search(r"(?<![.\w])(eval|exec)\(|instantiate\(|\.listen\(|socket\.socket\(", text), rel
    # a config picks registered components by name; it cannot name an arbitrary callable
    import olm
    from olm.registry import ConfigError

    with pytest.raises(ConfigError, match="model.name='os.system' is not a registered model"):
        olm.build_model({"name": "os.system"})
    with pytest.raises(ConfigError, match=r"model.imports\[0\]=3 must be a module name"):
        olm.build_model({"imports": [3]})
