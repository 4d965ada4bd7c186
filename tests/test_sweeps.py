"""Experiments and sweeps: every experiment composes (alone and at smoke size), a grid multirun end to end on CPU
through `olm compare`, and an Optuna search that gets val loss back from olm-train."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

import olm
from olm.cli import main
from olm.compare import load_runs
from olm.train.config import conf_dir, register_configs

CONF_DIR = conf_dir()
ROOT = Path(__file__).resolve().parents[1]

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml") if p.stem != "smoke")
OLM_TRAIN = Path(sys.executable).parent / "olm-train"
FAST = ["logger=none", "trainer.max_steps=6", "trainer.val_check_interval=3"]  # on top of +experiment=smoke


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("olm-cache")


@pytest.fixture(autouse=True)
def _no_hydra_config_left_behind():
    yield
    HydraConfig.instance().cfg = None  # compose_job sets the global one; later tests must not see it


def compose_job(overrides: list[str]):
    """The config of one job, with the hydra: resolver answering for it and the byte vocabulary filled in.

    HydraConfig is global: read what depends on it before composing the next config.
    """
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.data.vocab_size = 256
    return cfg


def num_parameters(cfg) -> int:
    return olm.build_model(OmegaConf.to_container(cfg.model, resolve=True)).num_parameters()


LADDERS = [name for name in EXPERIMENTS if "\nladder: {size:" in (ROOT / "experiments" / f"{name}.yaml").read_text()]


# Experiments about the run rather than the model: what each may sweep besides the model.
RUN_SWEEPS = {"optimizers": "optim"}
GRIDS = ["mup_transfer"]  # several keys swept together; tested on their own


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in LADDERS + GRIDS])
def test_experiment_states_its_question_and_sweeps_fairly(name):
    header = (ROOT / "experiments" / f"{name}.yaml").read_text().split("\ndefaults:")[0]
    assert header.startswith("# @package _global_\n# Question:") and "Fixed budget:" in header
    cfg = compose_job([f"+experiment={name}"])
    (key, values), = cfg.hydra.sweeper.params.items()
    values = str(values).split(",")
    # Fair by construction: the sweep changes the model only (or the optimizer, in the experiment about it), never
    # the data, its order or the budget.
    assert len(values) >= 2 and (key.startswith("model") or key == "shape" or RUN_SWEEPS.get(name) == key), key
    assert cfg.trainer.max_steps >= 1000 and cfg.data.seq_len == 256 and cfg.data.seed == cfg.seed
    assert cfg.logger.group == name == cfg.compare.experiment and cfg.compare.question
    assert cfg.seeds == 3  # the seeds per variant of the real budget
    assert cfg.compare.baseline in [f"{key}={value}" for value in values]  # names one of the variants
    if name == "depth_vs_width":  # about equal parameter counts
        params = []
        for shape in values:
            cfg.shape = shape
            params.append(num_parameters(cfg))
        assert max(params) / min(params) < 1.04, params

    # smoke last: tiny sizes; the sweep, the seeds, the W&B group and job-specific names and tags kept
    job = compose_job([f"+experiment=[{name},smoke]", f"{key}={values[-1]}", "seed=1"])
    assert str(job.hydra.sweeper.params[key]).split(",") == values
    assert job.trainer.max_steps == 20 and job.trainer.accelerator == "cpu" and job.data.seq_len == 32
    assert job.logger.group == name and job.name == f"{name}+smoke/{key}={values[-1]}/seed=1"
    assert job.logger.job_type == f"{key}={values[-1]}" and job.seeds == 3
    tags = OmegaConf.to_container(job.logger.tags, resolve=True)
    assert tags[0] == name and values[-1].lower() in tags[1].lower() and all(1 <= len(t) <= 64 for t in tags)
    assert num_parameters(job) < 100_000
    if name == "depth_vs_width":
        assert (job.model.num_layers, job.model.embed_dim) == (16, 16)


def test_optimizers_experiment_gives_each_optimizer_its_own_learning_rate():
    lrs = {}
    for optimizer in ("adamw", "muon", "lion"):
        job = compose_job(["+experiment=[optimizers,smoke]", f"optim={optimizer}", "seed=0"])
        assert job.optim.name == optimizer and job.logger.job_type == f"optim={optimizer}"
        lrs[optimizer] = (job.optim.lr, job.optim.weight_decay)
    assert lrs == {"adamw": (3e-3, 0.1), "muon": (1.2e-2, 0.1), "lion": (1e-3, 1.0)}


def test_mup_transfer_experiment_sweeps_width_lr_and_parametrization():
    header = (ROOT / "experiments" / "mup_transfer.yaml").read_text().split("\ndefaults:")[0]
    assert header.startswith("# @package _global_\n# Question:") and "Fixed budget:" in header
    cfg = compose_job(["+experiment=mup_transfer"])
    grid = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert grid == {"model.parametrization": ["standard", "mup"], "model.embed_dim": ["64", "512"],
                    "optim.lr": ["1e-3", "3e-3", "1e-2", "3e-2"]} and cfg.seeds == 3
    for parametrization, base in (("standard", None), ("mup", 64)):
        job = compose_job(["+experiment=[mup_transfer,smoke]", f"model.parametrization={parametrization}",
                           "model.embed_dim=512", "optim.lr=1e-2", "seed=0"])
        assert job.model.mup_base_width == base and job.optim.name == "adamw"
        assert job.trainer.max_steps == 20 and job.data.seq_len == 32  # the smoke size runs on a CPU


@pytest.mark.parametrize("name", LADDERS)
def test_ladder_experiment_is_compute_matched(name):
    header = (ROOT / "experiments" / f"{name}.yaml").read_text().split("\ndefaults:")[0]
    assert header.startswith("# @package _global_\n# Question:") and "Budget: " in header
    cfg = compose_job([f"+experiment={name}"])
    params = dict(cfg.hydra.sweeper.params)
    sizes = str(params.pop("shape")).split(",")
    (key, values), = params.items()
    assert len(sizes) >= 3 and key.startswith("model") and cfg.compare.baseline.startswith(key)
    for smoke in (False, True):
        budgets = []
        for size in sizes:
            job = compose_job([f"+experiment=[{name},smoke]" if smoke else f"+experiment={name}", f"shape={size}",
                               f"{key}={values.split(',')[0]}"])
            n = num_parameters(job) - (job.model.max_seq_len * job.model.embed_dim if job.model.position == "learned"
                                       else 0)
            tokens = job.trainer.max_steps * job.data.batch_size * job.data.seq_len
            assert job.ladder.size == size
            assert tokens / n == pytest.approx(job.ladder.tokens_per_parameter, rel=0.02)  # tokens = k x parameters
            budgets.append(tokens)
        assert budgets == sorted(budgets) and budgets[-1] > 4 * budgets[0]


def olm_train(args: list[str], sweep_dir: Path, cache_dir: Path) -> str:
    cmd = [str(OLM_TRAIN), "-m", *args, f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # toy model: threads only contend (50x slower on a busy machine)
    proc = subprocess.run(cmd, cwd=sweep_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def run_until(args: list[str], sweep_dir: Path, cache_dir: Path, stop_after: Path) -> None:
    """Start olm-train -m and SIGKILL it (its whole process group) once ``stop_after`` exists: a killed sweep."""
    import signal
    import time

    cmd = [str(OLM_TRAIN), "-m", *args, f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=sweep_dir.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not stop_after.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


OPTUNA_PLANTED = ["hydra/sweeper=optuna", "+experiment=smoke", "logger=none", "hydra.sweeper.n_trials=6",
                  "optim.lr=choice(1e-6,3e-3)", "optim.weight_decay=interval(0.0,0.2)", "hydra.sweeper.sampler=random",
                  "hydra.sweeper.seed=0", "hydra.sweeper.pruner=median",
                  "hydra.sweeper.pruner_options={n_startup_trials:2,n_warmup_steps:0}", "trainer.max_steps=16",
                  "trainer.val_check_interval=4"]


@pytest.mark.slow
def test_optuna_study_is_killed_resumed_and_prunes_the_bad_region(tmp_path, cache_dir):
    import optuna

    assert int(optuna.__version__.split(".")[0]) >= 4
    sweep = tmp_path / "optuna"
    run_until(OPTUNA_PLANTED, sweep, cache_dir, stop_after=sweep / "3" / "config.yaml")  # killed in trial 3
    out = olm_train(OPTUNA_PLANTED, sweep, cache_dir)  # the same command: the study continues
    study = optuna.load_study(study_name="olm", storage=f"sqlite:///{sweep / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4, 5]  # six trials, none run twice
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # distinct proposals
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert any(t.params["optim.lr"] == 1e-6 for t in pruned)  # the planted bad region is pruned
    for t in pruned:
        summary = json.loads((sweep / str(t.number) / "summary.json").read_text())
        assert summary["status"] == "pruned" and summary["steps"] < 16
    for t in trials:
        if t.state.name == "COMPLETE":
            assert t.value == json.loads((sweep / str(t.number) / "summary.json").read_text())["val_loss"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(study.best_value) and result["best_params"]["optim.lr"] == 3e-3
    assert "Optuna 5" in out or "Optuna 4" in out


@pytest.mark.slow
def test_a_killed_grid_resumes_and_the_parallel_launcher_overlaps_jobs(tmp_path, cache_dir):
    # 2 x 2 seeds, the seed varying fastest: jobs 0 and 2 are the same config (lr 1e-3, seed 0), job 0 runs alone
    # (before the kill), job 2 side by side with job 1 or 3
    args = ["+experiment=smoke", "logger=none", "optim.lr=1e-3,1e-3", "seeds=2", "trainer.max_steps=24",
            "trainer.val_check_interval=12"]
    sweep = tmp_path / "grid"
    run_until(args, sweep, cache_dir, stop_after=sweep / "0" / "summary.json")
    files = lambda job: {p.relative_to(job): (p.stat().st_mtime_ns, p.read_bytes())  # noqa: E731
                         for p in job.rglob("*") if p.is_file()}
    first = files(sweep / "0")
    # the same sweep again, two jobs at a time, now logging to W&B too (offline)
    out = olm_train([*args, "hydra/launcher=parallel", "hydra.launcher.jobs=2", "logger=wandb"], sweep, cache_dir)
    assert "jobs 0 finished, skipped" in out
    assert files(sweep / "0") == first  # the finished job's files are untouched
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(4)]
    assert [s["status"] for s in summaries] == ["finished"] * 4 and all(s["steps"] == 24 for s in summaries)
    assert len(load_runs([sweep])) == 4  # olm compare sees every job once
    from wandb_records import summarize

    for i in (1, 2, 3):  # every job's W&B run is complete: its config, history and final summary
        run, = (sweep / str(i) / "wandb").glob("offline-run-*/run-*.wandb")
        record = summarize(run)
        assert record["config"]["seed"] == i % 2 and record["config"]["data"]["seed"] == i % 2  # paired by seed
        assert record["summary"]["val_loss"] == pytest.approx(summaries[i]["val_loss"])
    configs = [yaml.safe_load((sweep / str(i) / "config.yaml").read_text()) for i in range(4)]
    assert [c["name"].rsplit("/", 1)[1] for c in configs] == ["seed=0", "seed=1", "seed=0", "seed=1"]
    assert configs[1]["logger"]["job_type"] == "optim.lr=0.001,trainer.max_steps=24,trainer.val_check_interval=12"
    # jobs 1 to 3 ran two at a time: some two of their windows (run start to summary) overlap
    windows = [((sweep / str(i) / "config.yaml").stat().st_mtime, (sweep / str(i) / "summary.json").stat().st_mtime)
               for i in (1, 2, 3)]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(windows) for b in windows[i + 1:]), windows
    # a job run side by side learns what it learns alone (same seed, same data order): the same loss
    assert summaries[2]["val_loss"] == pytest.approx(summaries[0]["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_ladder_end_to_end_then_compare(tmp_path, cache_dir):
    """The ladder experiment at smoke size (2 variants x 3 sizes), then olm compare: a power-law fit per variant."""
    sweep = tmp_path / "ladder"
    olm_train(["+experiment=[mlp_ladder,smoke]", "seeds=1", "ladder.tokens_per_parameter=0.1", "logger=none",
               "trainer.val_check_interval=5"], sweep, cache_dir)
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    summaries = [json.loads((p / "summary.json").read_text()) for p in jobs]
    assert len(jobs) == 6 and {s["status"] for s in summaries} == {"finished"}
    configs = [yaml.safe_load((p / "config.yaml").read_text()) for p in jobs]
    assert [c["ladder"]["size"] for c in configs] == ["s", "m", "l"] * 2
    assert configs[1]["logger"]["group"] == "mlp_ladder"
    assert summaries[0]["train_flops"] == summaries[0]["flops_per_token"] * summaries[0]["tokens_seen"]
    flops = sorted(s["train_flops"] for s in summaries)
    assert flops[-1] > 10 * flops[0]  # three sizes, compute growing with the square of the parameters

    assert main(["compare", str(sweep), "--out", str(tmp_path / "r"), "--target-compute", f"{flops[-1] * 10:g}",
                 "--x", "flops"]) == 0
    study, = json.loads((tmp_path / "r" / "report.json").read_text())["studies"]
    assert study["name"] == "mlp_ladder" and study["baseline"] == "ffn=gelu_mlp" and study["sizes"] == ["s", "m", "l"]
    rows = {r["variant"]: r for r in study["variants"] if r["metric"] == "val_loss"}
    assert rows["ffn=swiglu"]["n"] == 1 and rows["ffn=swiglu"]["size"] == "l"
    assert rows["ffn=swiglu"]["verdict"] == "n=1: no interval"
    fits = {r["variant"]: r for r in study["ladder"]}
    for fit in fits.values():
        assert fit["sizes"] == 3 and fit["points"] == 3 and fit["alpha"] > 0 and fit["predicted"] > 0
        assert fit["predicted_low"] is None  # one seed per size: no interval
    for png in ("val_loss.png", "train_loss.png", "final.png", "ladder.png"):
        with Image.open(tmp_path / "r" / png) as image:
            image.verify()
            assert image.format == "PNG"
