"""Multi-process training on CPU (gloo): DDP equals one process, Hydra multirun + DDP, SLURM/torchrun plumbing."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from olm.train.config import conf_dir, register_configs

CONF_DIR = conf_dir()

OLM_TRAIN = [sys.executable, "-m", "olm.train"]
TINY = ["model=lm_tiny", "data.tokenizer=byte", "data.seq_len=32", "data.val_batches=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "sample.max_new_tokens=0", "export=false",
        "callbacks.eval.tasks=[]"]


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
    """With the default optimizer, Muon. torch's Muon orthogonalises in bfloat16, which turns the all-reduce's
    rounding differences into ~1e-4 of loss after a few steps (a wrong batch split would differ by ~1e-1); with
    AdamW the same comparison holds to 2e-5 (tests/test_mixture.py, on a mixture of prepared sources)."""
    tolerance = 5e-4
    common = ["trainer.max_steps=6", "trainer.val_check_interval=3", "logger=wandb"]
    olm_train([*common, "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path / "cache")
    olm_train([*common, "trainer=cpu", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path / "cache")
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(ddp) == len(one) == 6
    assert ddp == pytest.approx(one, abs=tolerance)
    s_ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s_ddp["world_size"] == 2 and s_ddp["tokens_seen"] == s_one["tokens_seen"] == 6 * 8 * 32
    assert s_ddp["val_loss"] == pytest.approx(s_one["val_loss"], abs=tolerance)
    # rank 0 alone writes the run's records: one W&B run, one metrics file, rank 1 only its log
    assert len(list((tmp_path / "ddp" / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.suffix == ".log") == ["rank1.log", "train.log"]


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

    assert isinstance(resolve_strategy("ddp"), DDPStrategy)
    fsdp = resolve_strategy({"name": "fsdp", "activation_checkpointing": True})
    assert isinstance(fsdp, FSDPStrategy)
    assert resolve_strategy("auto") == "auto"
    with pytest.raises(ConfigError, match="trainer.strategy.name='dpp' is not known"):
        resolve_strategy({"name": "dpp"})


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


def _sigterm_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks stepping a stand-in for Lightning's loop: 12 steps of 2 batches (gradient accumulation),
    the SIGTERM check at every batch start; rank 0 alone gets the signal during step 4."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from olm.train.strategies import SigtermSync

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loop = SimpleNamespace(_batches_that_stepped=0, _broadcast_sigterm_tensor=None)
    connector = SimpleNamespace(_sigterm_notifier_fn=None, received_sigterm=False)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop), _signal_connector=connector, global_rank=rank,
                              strategy=SimpleNamespace(launcher=None, root_device=torch.device("cpu")))
    sync = SigtermSync(trainer, every=3)
    assert sync.install() and loop._broadcast_sigterm_tensor == sync.check
    all_reduce, calls = dist.all_reduce, []
    dist.all_reduce = lambda *a, **k: (calls.append(loop._batches_that_stepped), all_reduce(*a, **k))[1]
    stopped_at = None
    for step in range(12):
        loop._batches_that_stepped = step
        for batch in range(2):
            if rank == 0 and step == 4 and batch == 1:
                connector._sigterm_notifier_fn(15, None)  # what the registered signal handler calls
            try:
                loop._broadcast_sigterm_tensor()
            except SIGTERMException:
                stopped_at = step
                break
        if stopped_at is not None:
            break
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"stopped_at": stopped_at, "checked_at": calls, "received_sigterm": connector.received_sigterm}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    """SigtermSync: one all-reduce every 3 optimizer steps (not every batch), and a signal that only rank 0 got stops
    both ranks at the same step, with no collective left unpaired (a mismatch would hang here)."""
    import torch.multiprocessing as mp

    mp.spawn(_sigterm_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"stopped_at": 6, "checked_at": [0, 3, 6], "received_sigterm": True}


def test_installed_lightning_has_what_sigterm_sync_replaces():
    """SigtermSync replaces these; if a Lightning upgrade renames them, this fails instead of a silent no-op."""
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert callable(getattr(trainer.fit_loop.epoch_loop, "_broadcast_sigterm_tensor", None))
    assert isinstance(trainer.fit_loop.epoch_loop._batches_that_stepped, int)
    assert callable(getattr(trainer._signal_connector, "_sigterm_notifier_fn", None))


def test_ddp_syncs_buffers_only_when_they_are_state(monkeypatch):
    """olm's buffers (RoPE tables) are non-persistent constants: DDP need not broadcast them before every forward;
    persistent buffers (BatchNorm statistics) and an explicit setting keep DDP's behaviour."""
    import lightning.pytorch.strategies.ddp as lightning_ddp
    import torch

    import olm
    from olm.train.strategies import OlmDDPStrategy, has_state_buffers

    model = olm.build_model({"name": "lm", "vocab_size": 32, "embed_dim": 16, "num_heads": 2, "num_layers": 1,
                             "max_seq_len": 8})
    with_state = torch.nn.Sequential(model, torch.nn.BatchNorm1d(4))
    assert len(list(model.buffers())) > 0 and not has_state_buffers(model) and has_state_buffers(with_state)

    seen = []
    monkeypatch.setattr(lightning_ddp, "DistributedDataParallel", lambda module, device_ids=None, **kw: seen.append(kw))
    strategy = OlmDDPStrategy(parallel_devices=[torch.device("cpu")] * 2)
    strategy._setup_model(model)
    assert len(seen[-1]) == 1 and list(seen[-1].values()) == [False]  # forward_sync_buffers (torch >= 2.13) or broadcast_buffers
    strategy._setup_model(with_state)
    assert seen[-1] == {} and strategy._ddp_kwargs == {}  # the choice made for one model does not stick
    explicit = OlmDDPStrategy(parallel_devices=[torch.device("cpu")] * 2, broadcast_buffers=True)
    explicit._setup_model(model)
    assert seen[-1] == {"broadcast_buffers": True}


@pytest.mark.slow
def test_ddp_step_issues_only_the_gradient_all_reduce():
    """Two gloo processes through the Lightning path (benchmarks/profile_step.py): between logging steps a training
    step issues only the gradient all-reduce (one bucket here) and reads no tensor value on the host; no buffer
    broadcast, no SIGTERM broadcast. The profiled steps come after the first log step (10), from which on a metric
    logged for the progress bar used to be read at every batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "profile_step.py"), "--path", "lightning", "--devices", "2",
         "--strategy", "ddp", "--device", "cpu", "--preset", "lm_tiny", "--batch-size", "2", "--seq-len", "32",
         "--vocab-size", "256", "--warmup", "12", "--steps", "4"],
        capture_output=True, text=True, timeout=240, env=env, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["rank"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert sorted(results) == [0, 1] and results[0]["world_size"] == 2  # every rank reports its own steps
    for result in results.values():
        assert result["collectives_per_step"] == {"c10d::allreduce_": 1.0}
        assert result["host_reads_per_step"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp_cpu", "cpu"])
def test_sigterm_to_rank_0_stops_the_ddp_job_at_once(trainer, tmp_path):
    """olm-train with 2 gloo ranks (or one process): a SIGTERM to rank 0 alone (as `kill` would send it) stops every
    rank within seconds, with exit 143, a one-line error and summary.json saying interrupted; nothing is left."""
    import signal
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*OLM_TRAIN, *TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"trainer={trainer}", "trainer.max_steps=100000",
         "trainer.val_check_interval=5", "trainer.log_every_n_steps=5", "logger=csv", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "last.ckpt").exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "error: stopped by SIGTERM" in stderr.strip().splitlines()[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {"status": "interrupted", "error": "stopped by SIGTERM"}
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True).stdout
    assert not left.strip(), f"ranks left running: {left}"
