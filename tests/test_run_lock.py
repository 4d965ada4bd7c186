"""One writer per run dir (olm.train.lock), resume that says what it does, and refused runs that leave nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from olm.errors import ConfigError
from test_run_config import cli_main
from olm.train.lock import LOCK_NAME, LOCKS, RunDirLive, holder, is_live, live_note

TINY = ["model=lm_tiny", "data.tokenizer=byte", "callbacks.eval.tasks=[]", "logger=csv", "sample.max_new_tokens=0",
        "trainer.enable_progress_bar=false"]
HOLD = """
import sys, time
from pathlib import Path
from olm.train.lock import LOCKS
LOCKS.acquire(Path(sys.argv[1]), float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def main(argv, monkeypatch, capsys) -> tuple[int, str]:
    """olm-train in this process: (exit code, stderr)."""
    code, _, err = cli_main(argv, monkeypatch, capsys)
    return code, err


def wait_for(predicate, what: str, deadline: float = 180.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def holder_process(tmp_path):
    """A process holding tmp_path/held's lock (as a live run does), killed at the end."""
    run_dir = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), "60"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_a_second_olm_train_on_a_live_run_dir_is_refused_naming_the_holder(tmp_path, monkeypatch, capsys):
    """Two real olm-train processes on one run dir: the second (fresh or resume=auto) is refused in one line and
    writes nothing there; the first trains on and finishes; olm eval/generate would say the run is live."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "olm.train", *TINY, "trainer.max_steps=3000",
                              "trainer.val_check_interval=1000", f"hydra.run.dir={run_dir}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: (run_dir / "metrics.csv").is_file(), "the first run to start")
        owner = holder(run_dir)
        assert owner.pid == first.pid and is_live(run_dir)
        before = {p: p.stat().st_mtime_ns for p in (run_dir / ".hydra").iterdir()}
        for extra in ([], ["resume=auto"], ["resume=allow"]):
            code, err = main([*TINY, *extra, f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
            assert code == 2 and err.count("\n") == 1, err
            assert err.startswith(f"error: {run_dir.resolve()} is live: a run holds it (pid {first.pid} on ")
        assert {p: p.stat().st_mtime_ns for p in (run_dir / ".hydra").iterdir()} == before
        assert not (run_dir / "summary.json").exists()  # the refused commands wrote no failed summary
        assert f"{run_dir} is live" in live_note(run_dir / "checkpoints" / "last.ckpt")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM  # stopped by us, through olm's own SIGTERM path
    assert not (run_dir / LOCK_NAME).exists() and not is_live(run_dir)  # released on the way out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_a_sigkilled_holder_is_taken_over_with_one_line(holder_process, capsys):
    run_dir, proc = holder_process
    with pytest.raises(RunDirLive, match=rf"is live: a run holds it \(pid {proc.pid} on "):
        LOCKS.acquire(run_dir, 60)
    proc.kill()
    proc.wait()
    capsys.readouterr()
    assert LOCKS.acquire(run_dir, 60)
    err = capsys.readouterr().err
    assert err == (f"note: {run_dir.resolve()}: took over the lock of pid {proc.pid} on {holder(run_dir).hostname}, "
                   "which no longer runs (its process is gone)\n")
    assert holder(run_dir).pid == os.getpid()
    LOCKS.release(run_dir)
    assert not (run_dir / LOCK_NAME).exists() and run_dir.is_dir()  # the dir was there before: kept


def test_a_lock_of_another_host_is_live_while_it_beats_and_taken_over_after_its_lease(holder_process, capsys):
    """A holder on another node: refused while the file's heartbeat is fresh; once it is older than the lease, the
    contender watches it for one lease (its own clock) and takes it over."""
    run_dir, proc = holder_process
    proc.kill()
    proc.wait()
    lock = run_dir / LOCK_NAME
    text = lock.read_text()
    lock.write_text("".join("host=node-that-died\n" if line.startswith("host=") else line + "\n"
                            for line in text.splitlines()).replace("duration=60.0", "duration=1.0"))
    assert is_live(run_dir)  # just touched: a live holder elsewhere
    with pytest.raises(RunDirLive, match="pid .* on node-that-died, heartbeat 0 s ago"):
        LOCKS.acquire(run_dir, 1)
    old = time.time() - 30
    os.utime(lock, (old, old))
    assert not is_live(run_dir)
    capsys.readouterr()
    assert LOCKS.acquire(run_dir, 1)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"note: {run_dir.resolve()}: the lock of pid {proc.pid} on node-that-died has had no "
                             "heartbeat for 30 s; watching it for 1 s")
    assert err[1].endswith("which no longer runs (no heartbeat for 1 s)") and len(err) == 2
    LOCKS.release(run_dir)


def test_resume_auto_on_a_path_without_a_run_is_refused_and_creates_nothing(tmp_path, monkeypatch, capsys):
    typo = tmp_path / "outputs" / "runs" / "typo"
    code, err = main([*TINY, "resume=auto", f"hydra.run.dir={typo}"], monkeypatch, capsys)
    assert code == 2 and err == (f"error: resume=auto: {typo} holds no run (no config.yaml, no checkpoint); check "
                                 "the path, or use resume=allow to start a run there if it holds none\n")
    assert not (tmp_path / "outputs").exists()
    monkeypatch.chdir(tmp_path)
    code, err = main([*TINY, "resume=auto"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: resume=auto continues the run in hydra.run.dir: give hydra.run.dir=")
    assert not (tmp_path / "outputs").exists()


def test_resume_allow_starts_then_continues(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", "resume=allow", f"hydra.run.dir={run_dir}"]
    assert main(args, monkeypatch, capsys)[0] == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    code, _ = main([*args[:-3], "trainer.max_steps=4", *args[-3:]], monkeypatch, capsys)
    assert code == 0 and json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert (run_dir / ".hydra" / "resume-2").is_dir()  # continued from its step-2 checkpoint, not started over
    assert not (run_dir / LOCK_NAME).exists()


def test_a_refused_run_leaves_no_run_dir_and_names_the_fix(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    refusals = {
        "data.source=text data.path=/nonexistent": "error: data.path='/nonexistent' does not exist",
        "ckpt_path=random.ckpt": "error: checkpoint 'random.ckpt' cannot be loaded",
        "ckpt_path=missing.ckpt": "error: ckpt_path='missing.ckpt' does not exist",
        "model.vocab_size=100": "error: model.vocab_size=100 is smaller than the tokenizer's",  # found in train()
    }
    if not torch.cuda.is_available():
        refusals["trainer=gpu"] = ("error: trainer.accelerator=gpu: this machine has no CUDA GPU that torch can use; "
                                   "use trainer=cpu (one process) or trainer=ddp_cpu (several CPU processes)")
    for overrides, line in refusals.items():
        code, err = main([*TINY, *overrides.split()], monkeypatch, capsys)
        assert code == 2 and err.startswith(line) and err.count("\n") == 1, (overrides, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["random.ckpt"], overrides
    # a sweep job refused the same way: no job dir either
    code, err = main(["-m", *TINY, "model.vocab_size=100,101", "hydra.sweep.dir=sweep"], monkeypatch, capsys)
    assert code == 1 and "2 of 2 jobs failed" in err
    assert not [p for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()]


def test_wandb_online_is_refused_in_one_line_without_a_key_or_a_server(tmp_path, monkeypatch):
    from olm.train.compose import compose
    from olm.train.wandb_logging import check_online

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = compose([*TINY, "logger=wandb", "logger.mode=online", "paths.output_dir=x"]).logger
    with pytest.raises(ConfigError, match=r"^logger.mode=online needs a W&B API key \(WANDB_API_KEY, or `wandb"):
        check_online(cfg)
    auto = compose([*TINY, "logger=wandb", "paths.output_dir=x"]).logger
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match="^WANDB_MODE=online needs a W&B API key"):
        check_online(auto)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ConfigError, match=r"^WANDB_MODE=online: W&B's server 127.0.0.1:9 cannot be reached "
                                          r"\(.*refused.*, waited 3 s\); use logger.mode=offline"):
        check_online(auto)
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_online(auto)  # offline asks nothing of the network


def test_an_interrupted_job_is_recorded_as_interrupted(tmp_path):
    """Lightning answers Ctrl-C with sys.exit(1) inside its handler: the run (an Optuna trial's too) says
    interrupted, not failed with error "1"."""
    from olm.train.outcome import write_failed_summary

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    except SystemExit as exc:
        write_failed_summary(tmp_path, exc)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "interrupted",
                                                                   "error": "stopped by SIGINT (Ctrl-C)"}


def test_debug_fdr_saves_no_checkpoint_export_or_evaluation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _ = main(["model=lm_tiny", "data.tokenizer=byte", "debug=fdr", "hydra.run.dir=fdr"], monkeypatch, capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "fdr").iterdir()) == [".hydra", "config.yaml", "hparams.yaml",
                                                                     "summary.json", "tokenizer", "train.log"]
    summary = json.loads((tmp_path / "fdr" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["checkpoint"] is None and not any(k.startswith("eval/") for k in summary)
