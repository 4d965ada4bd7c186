"""Multi-process training on CPU (gloo): DDP equals one process, Hydra multirun + DDP, SLURM/torchrun plumbing."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from olm.train.app import CONF_DIR
from olm.train.schema import register_configs

OLM_TRAIN = [sys.executable, "-m", "olm.train.app"]
TINY = ["model=lm_tiny", "data.tokenizer=byte", "data.seq_len=32", "data.val_batches=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "sample.max_new_tokens=0", "export=false"]


def olm_train(args, cache_dir, timeout=240):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_API_KEY", None)
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run([*OLM_TRAIN, *flags, *TINY, f"paths.cache_dir={cache_dir}", *overrides], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    common = ["trainer.max_steps=6", "trainer.val_check_interval=3", "logger=wandb"]
    olm_train([*common, "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path / "cache")
    olm_train([*common, "trainer=cpu", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path / "cache")
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(ddp) == len(one) == 6
    assert ddp == pytest.approx(one, abs=2e-5)
    s_ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s_ddp["world_size"] == 2 and s_ddp["tokens_seen"] == s_one["tokens_seen"] == 6 * 8 * 32
    assert s_ddp["val_loss"] == pytest.approx(s_one["val_loss"], abs=2e-5)
    # rank 0 alone writes the run's records: one W&B run, one metrics file, rank 1 only its log
    assert len(list((tmp_path / "ddp" / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.suffix == ".log") == ["app.log", "rank1.log"]


@pytest.mark.slow
def test_multirun_with_ddp_gives_one_run_dir_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = olm_train(["-m", "trainer=ddp_cpu", "data.batch_size=4", "trainer.max_steps=3",
                      "trainer.val_check_interval=3", "logger=wandb", "model.ff_multiplier=2,4",
                      f"hydra.sweep.dir={sweep}"], tmp_path / "cache", timeout=400)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"], proc.stdout[-2000:]
    for job in jobs:
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["world_size"] == 2
        assert len(list((sweep / job / "wandb").glob("offline-run-*"))) == 1
    assert (sweep / "multirun.yaml").is_file()
    params = [json.loads((sweep / j / "summary.json").read_text())["num_parameters"] for j in jobs]
    assert params[0] != params[1]  # the two jobs really ran different models


def test_launcher_configs_compose():
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
                                          "trainer.devices=8", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 8, 8, "gpu")
    for preset in ("cpu", "gpu", "ddp", "ddp_cpu", "fsdp"):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"trainer={preset}", "model=gpt2_small"])
        assert cfg.trainer.max_steps > 0


def test_strategies_resolve():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from olm.registry import ConfigError
    from olm.train.strategies import resolve_strategy

    assert isinstance(resolve_strategy({"strategy": "ddp"})["strategy"], DDPStrategy)
    fsdp = resolve_strategy({"strategy": {"name": "fsdp", "activation_checkpointing": True}})["strategy"]
    assert isinstance(fsdp, FSDPStrategy)
    assert resolve_strategy({"strategy": "auto"})["strategy"] == "auto"
    with pytest.raises(ConfigError, match="trainer.strategy.name='dpp' is not known"):
        resolve_strategy({"strategy": {"name": "dpp"}})


def test_slurm_and_torchrun_environments_are_read_as_lightning_expects(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK"):
            monkeypatch.delenv(key, raising=False)
    # SLURMEnvironment.main_address writes MASTER_ADDR/PORT into os.environ: set-then-delete makes monkeypatch
    # remove whatever Lightning writes when the test ends (a leaked MASTER_ADDR would break later DDP tests)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unused")
        monkeypatch.delenv(key)
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NODEID": "1",
             "SLURM_JOB_NAME": "olm", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "1234", "SLURM_NTASKS_PER_NODE": "8"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (16, 11, 3, 1)
    assert env.main_address == "gpu01" and env.creates_processes_externally
    for key in slurm:
        monkeypatch.delenv(key)
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "GROUP_RANK": "1",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    assert TorchElasticEnvironment.detect()
    env = TorchElasticEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 5, 1, 1)


def test_sigterm_check_runs_every_n_batches():
    """Lightning's per-batch SIGTERM broadcast (a host sync per step) runs on the first batch and every n-th after."""
    from olm.train.strategies import throttle_sigterm_check

    class Loop:
        def __init__(self):
            self.calls = 0

        def _broadcast_sigterm_tensor(self):
            self.calls += 1

    loop = Loop()
    assert throttle_sigterm_check(loop, 10)
    for _ in range(25):
        loop._broadcast_sigterm_tensor()
    assert loop.calls == 3  # batches 0, 10 and 20
    assert not throttle_sigterm_check(object(), 10)  # no such check: nothing changed
    assert not throttle_sigterm_check(Loop(), 1)


def test_installed_lightning_has_the_per_batch_sigterm_check():
    """The throttle targets this method; if a Lightning upgrade renames it, this fails instead of a silent no-op."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))


def test_ddp_broadcasts_buffers_only_when_they_are_state():
    """olm's buffers (RoPE tables) are non-persistent constants: DDP need not broadcast them before every forward."""
    import torch

    import olm
    from olm.train.strategies import has_state_buffers

    model = olm.build_model({"name": "lm", "vocab_size": 32, "embed_dim": 16, "num_heads": 2, "num_layers": 1,
                             "max_seq_len": 8})
    assert len(list(model.buffers())) > 0 and not has_state_buffers(model)
    assert has_state_buffers(torch.nn.Sequential(model, torch.nn.BatchNorm1d(4)))


@pytest.mark.slow
def test_ddp_step_issues_only_the_gradient_all_reduce():
    """Two gloo processes through the Lightning path (benchmarks/profile_step.py): between logging steps a training
    step issues one collective, the gradient all-reduce; no buffer broadcast, no SIGTERM broadcast."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "profile_step.py"), "--path", "lightning", "--devices", "2",
         "--strategy", "ddp", "--device", "cpu", "--preset", "lm_tiny", "--batch-size", "2", "--seq-len", "32",
         "--vocab-size", "256", "--warmup", "3", "--steps", "4"],
        capture_output=True, text=True, timeout=240, env=env, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["world_size"] == 2
    assert result["collectives_per_step"] == {"c10d::allreduce_": 1.0}
