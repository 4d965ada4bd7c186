"""SLURM for real: sweeps, DDP over srun tasks, preemption and cancellation on a one-node cluster
(scripts/slurm-cluster.sh), plus the launcher preset and the restart rules without one.

The cluster tests (marked ``slurm``) need the cluster: they start it when they may (root), else skip saying why;
with OLM_REQUIRE_SLURM=1 (CI) a cluster that cannot be started fails them instead. Jobs are paused right after their
first checkpoint by a ``sitecustomize`` module put first on the job's PYTHONPATH (sbatch passes the environment on),
active only when OLM_TEST_PAUSE names the job, and only in its first start: the preemption then always comes
between the first checkpoint and the end, without sleeping in the test.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from olm.errors import ConfigError
from olm.train.config import register_configs
from post_import import after_import

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "olm" / "conf"
SCRIPT = ROOT / "scripts" / "slurm-cluster.sh"
SMOKE = ["hydra/launcher=slurm", "+experiment=smoke", "hydra.launcher.timeout_min=10"]

PAUSE = '''
"""Test-only: pause a SLURM job after its first checkpoint until it gets SIGTERM (OLM_TEST_PAUSE: job dir names)."""
import importlib.abc, os, sys, time

JOBS = os.environ.get("OLM_TEST_PAUSE", "").split(",")


def patch(callbacks):
    save = callbacks.AtomicModelCheckpoint._save_checkpoint

    def save_then_pause(self, trainer, filepath):
        save(self, trainer, filepath)
        first_start = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
        if first_start and os.path.basename(trainer.default_root_dir) in JOBS and filepath.endswith("last.ckpt"):
            open(os.path.join(trainer.default_root_dir, "paused"), "w").close()
            deadline = time.time() + 120
            while not trainer._signal_connector.received_sigterm and time.time() < deadline:
                time.sleep(0.05)

    callbacks.AtomicModelCheckpoint._save_checkpoint = save_then_pause


''' + after_import('olm.train.callbacks') + '''

if JOBS != [""]:
    sys.meta_path.insert(0, AfterImport())
'''


# -- the cluster --------------------------------------------------------------------------------------------------
def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and bool({"idle", "mix", "alloc"} & set(out.stdout.split()))


@pytest.fixture(scope="session")
def cluster():
    """A running one-node cluster: reused, else started (root only, scripts/slurm-cluster.sh)."""
    required = os.environ.get("OLM_REQUIRE_SLURM") == "1"
    if not _cluster_up():
        reason = None
        if os.geteuid() != 0:
            reason = "not root, so scripts/slurm-cluster.sh cannot install and start a SLURM cluster here"
        else:
            started = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
            if started.returncode != 0:
                reason = f"scripts/slurm-cluster.sh failed: {started.stderr.strip().splitlines()[-1:]}"
        if reason:
            if required:
                pytest.fail(f"OLM_REQUIRE_SLURM=1 but {reason}")
            pytest.skip(f"SLURM tests need a one-node cluster: {reason}")


@pytest.fixture(scope="module")
def pause_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pause")
    (d / "sitecustomize.py").write_text(PAUSE)
    return d


def submit(args, sweep: Path, cache: Path, pause_dir: Path, pause: str = "") -> subprocess.Popen:
    """``olm-train -m`` on the cluster, as a user would type it (the submitting process waits for the jobs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", OLM_TEST_PAUSE=pause,
               PYTHONPATH=os.pathsep.join([str(pause_dir), env.get("PYTHONPATH", "")]))
    out = open(sweep.parent / f"{sweep.name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "olm.train", "-m", *SMOKE, *args, f"hydra.sweep.dir={sweep}",
                             f"paths.cache_dir={cache}"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def finish(proc: subprocess.Popen, sweep: Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (sweep.parent / f"{sweep.name}.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    return log


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the sweep command ended (rc={proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


def slurm_job(sweep: Path, job: int) -> str:
    """The SLURM id of a sweep's job (submitit names its folders after them: <array>_<task>, or <id> for a sweep
    of one job, which submitit submits as a plain job)."""
    names = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir()]
    ids = [n for n in names if n.endswith(f"_{job}")] or (names if len(names) == 1 else [])
    assert len(ids) == 1, ids
    return ids[0]


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def logged_steps(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train loss) of every training row of metrics.csv, in file order."""
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


# -- on the cluster -----------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_a_two_job_sweep_runs_on_slurm(cluster, tmp_path, pause_dir):
    sweep = tmp_path / "sweep"
    log = finish(submit(["optim.lr=3e-3,1e-3"], sweep, tmp_path / "cache", pause_dir), sweep)
    runs = [summary(sweep / str(job)) for job in (0, 1)]
    assert [r["status"] for r in runs] == ["finished", "finished"] and [r["steps"] for r in runs] == [20, 20]
    assert runs[0]["val_loss"] != runs[1]["val_loss"]  # two different jobs, not one run twice
    from omegaconf import OmegaConf

    assert [OmegaConf.load(sweep / str(job) / "config.yaml").optim.lr for job in (0, 1)] == [3e-3, 1e-3]
    batch = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()  # the array's sbatch script
    assert "--cpus-per-task=1" in batch and "--gpus" not in batch and "--requeue" in batch
    assert "--signal=USR2@120" in batch
    assert log.count("sacct") == 1, log  # accounting is off: said once, not at every poll


@pytest.mark.slurm
def test_a_ddp_job_runs_as_two_srun_tasks(cluster, tmp_path, pause_dir):
    sweep = tmp_path / "ddp"
    finish(submit(["trainer=ddp_cpu"], sweep, tmp_path / "cache", pause_dir), sweep)
    run = summary(sweep / "0")
    assert run["status"] == "finished" and run["world_size"] == 2
    assert run["tokens_seen"] == 20 * 2 * 4 * 32  # 20 steps of both ranks' batches (4 x 32 tokens each)
    steps = [s for s, _ in logged_steps(sweep / "0")]
    assert steps == [4, 9, 14, 19]  # rank 0 alone writes metrics.csv: every logged step once
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    job = slurm_job(sweep, 0)
    batch = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "--ntasks-per-node=2" in batch and "--gpus" not in batch
    tasks = sorted(p.name for p in (sweep / ".submitit" / job).glob("*_log.out"))
    assert tasks == [f"{job}_0_log.out", f"{job}_1_log.out"]  # two srun tasks, one per rank


def uninterrupted_run(tmp_path: Path) -> Path:
    """The jobs' config (+experiment=smoke) trained here without a break, on one thread as the jobs are."""
    import torch

    from olm.train.compose import compose as compose_run
    from olm.train.run import train

    run_dir = tmp_path / "uninterrupted"
    threads = torch.get_num_threads()
    try:
        train(compose_run(["+experiment=smoke", "cpu_threads=1", f"paths.output_dir={run_dir}",
                           f"paths.cache_dir={tmp_path / 'cache'}"]))
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.mark.slurm
@pytest.mark.slow  # the slowest of them: three job starts and an uninterrupted run
def test_a_preempted_job_is_requeued_and_ends_as_an_uninterrupted_run(cluster, tmp_path, pause_dir):
    """Right after their step-10 checkpoint, job 1 is requeued by ``scontrol requeue`` (as a preemption is) and
    job 2 gets submitit's USR2 (as before the time limit: submitit requeues it once olm has stopped). Both
    continue from step 10 and end with the val loss and per-step losses of the same config run through here, in
    this process (one thread each, so equal up to float rounding: 1e-6), no step logged twice."""
    sweep = tmp_path / "sweep"
    proc = submit(["name=preempted,timed_out"], sweep, tmp_path / "cache", pause_dir, pause="0,1")
    reference_dir = uninterrupted_run(tmp_path)
    wait_for(sweep / "0" / "paused", proc)
    wait_for(sweep / "1" / "paused", proc)
    jobs = [slurm_job(sweep, 0), slurm_job(sweep, 1)]
    subprocess.run(["scontrol", "requeue", jobs[0]], check=True)
    subprocess.run(["scancel", "--signal=USR2", jobs[1]], check=True)
    time.sleep(1)
    deadline = time.time() + 120
    while {squeue_state(job) for job in jobs} - {"RUNNING", ""}:
        assert time.time() < deadline, [squeue_state(job) for job in jobs]
        for job in jobs:  # SLURM holds a requeued job for a while (its BeginTime): start it now
            if squeue_state(job) == "PENDING":
                subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], capture_output=True)
        time.sleep(0.5)
    finish(proc, sweep)
    reference = summary(reference_dir)
    reference_losses = [loss for _, loss in logged_steps(reference_dir)]
    for job, restarted_by in ((0, "SIGTERM"), (1, "signal SIGUSR2: stopping to be requeued")):
        run = summary(sweep / str(job))
        assert run["status"] == "finished" and run["steps"] == 20
        assert run["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)
        steps = logged_steps(sweep / str(job))
        assert [s for s, _ in steps] == [4, 9, 14, 19]
        assert [loss for _, loss in steps] == pytest.approx(reference_losses, abs=1e-6)
        log = (sweep / str(job) / "train.log").read_text()
        assert restarted_by in log and "stopped by SIGTERM" in log
        assert "SLURM_RESTART_COUNT=1: a restarted job continues its own run" in log
        assert "continuing from step 10" in log


@pytest.mark.slurm
def test_a_cancelled_job_stays_interrupted_and_resumes_by_hand(cluster, tmp_path, pause_dir):
    sweep = tmp_path / "sweep"
    proc = submit([], sweep, tmp_path / "cache", pause_dir, pause="0")
    try:
        wait_for(sweep / "0" / "paused", proc)
        job = slurm_job(sweep, 0)
        subprocess.run(["scancel", job], check=True)
        deadline = time.time() + 60
        while not (sweep / "0" / "summary.json").exists() or squeue_state(job):
            assert time.time() < deadline, squeue_state(job)
            time.sleep(0.2)
    finally:
        proc.kill()  # without accounting, submitit never learns that a job was cancelled: it would wait forever
        proc.wait()
    run_dir = sweep / "0"
    assert summary(run_dir) == {"status": "interrupted", "error": "stopped by SIGTERM"}
    before = logged_steps(run_dir)
    assert [s for s, _ in before] == [4, 9]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    resumed = subprocess.run([sys.executable, "-m", "olm.train", "resume=auto", f"hydra.run.dir={run_dir}"],
                             capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(run_dir)["status"] == "finished" and summary(run_dir)["steps"] == 20
    after = logged_steps(run_dir)
    assert after[:2] == before and [s for s, _ in after] == [4, 9, 14, 19]


# -- without a cluster --------------------------------------------------------------------------------------------
def launcher(overrides):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_the_slurm_preset_takes_its_size_from_the_trainer(monkeypatch, capsys):
    cpu = launcher(["trainer=ddp_cpu"])
    assert (cpu["nodes"], cpu["tasks_per_node"], cpu["gpus_per_node"], cpu["cpus_per_task"]) == (1, 2, None, 1)
    gpu = launcher(["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=8", "data.num_workers=3",
                    "hydra.launcher.partition=gpu", "hydra.launcher.qos=high", "hydra.launcher.constraint=h200"])
    assert (gpu["nodes"], gpu["tasks_per_node"], gpu["gpus_per_node"], gpu["cpus_per_task"]) == (2, 8, 8, 4)
    assert (gpu["partition"], gpu["qos"], gpu["constraint"]) == ("gpu", "high", "h200")
    assert launcher(["trainer=cpu", "cpu_threads=4"])["cpus_per_task"] == 4
    with pytest.raises(Exception) as info:
        launcher(["trainer=ddp"])  # devices=-1: not a number of tasks
    assert "trainer.devices=-1: under hydra/launcher=slurm it is the number of tasks per node" in str(info.value)
    with pytest.raises(Exception) as info:
        launcher([])  # accelerator=auto: GPUs or not?
    assert "trainer.accelerator='auto': under hydra/launcher=slurm" in str(info.value)
    from olm.train import cli

    monkeypatch.setattr(sys, "argv", ["olm-train", "-m", "hydra/launcher=slurm", "trainer=ddp", "optim.lr=1e-3,3e-3"])
    with pytest.raises(SystemExit) as exited:
        cli.main()  # checked before anything is submitted: one line, exit 2
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: trainer.devices=-1: under hydra/launcher=slurm it is the number of tasks per node")


def test_a_restart_continues_only_its_own_run(tmp_path, monkeypatch, capsys):
    """A restarted job (SLURM_RESTART_COUNT, TORCHELASTIC_RESTART_COUNT) on a run dir holding a checkpoint resumes
    it when the config is the run's own, and is refused in one line, writing nothing, when it is not."""
    from olm.train import resume

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    argv = ["+experiment=smoke", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setattr("olm.train.resume.checkpoint_step", lambda d: 10 if Path(d) == run_dir else None)
    monkeypatch.setattr("olm.train.resume.latest_record", lambda d: None)  # no Hydra record: see below
    for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert "resume=auto" not in resume.on_restart(argv)  # a first start: refused later, as any fresh run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resume.on_restart(argv)[-1] == "resume=auto"
    assert "resume=auto" not in resume.on_restart([*argv, "ckpt_path=x.ckpt"])

    from omegaconf import OmegaConf

    from olm.train.compose import compose as compose_run
    from olm.train.resume import check_own_run

    own = compose_run(["+experiment=smoke", f"paths.output_dir={run_dir}"])
    OmegaConf.save(own, run_dir / "config.yaml", resolve=True)
    check_own_run(run_dir, own)  # its own config: goes on
    with pytest.raises(ConfigError) as info:
        check_own_run(run_dir, compose_run(["+experiment=smoke", "optim.lr=1e-2", f"paths.output_dir={run_dir}"]))
    line = str(info.value)
    assert "\n" not in line and line.startswith("TORCHELASTIC_RESTART_COUNT=1: ") and "optim.lr: 0.012 -> 0.01" in line
