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


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_states_its_question_and_sweeps_fairly(name):
    header = (ROOT / "experiments" / f"{name}.yaml").read_text().split("\ndefaults:")[0]
    assert header.startswith("# @package _global_\n# Question:") and "Fixed budget:" in header
    cfg = compose_job([f"+experiment={name}"])
    (key, values), = cfg.hydra.sweeper.params.items()
    values = str(values).split(",")
    # Fair by construction: the sweep changes the model only, never the data, its order, the optimizer or the budget.
    assert len(values) >= 2 and (key.startswith("model") or key == "shape"), key
    assert cfg.trainer.max_steps >= 1000 and cfg.data.seq_len == 256 and cfg.data.seed == cfg.seed
    assert cfg.logger.group == name
    if name == "depth_vs_width":  # about equal parameter counts
        params = []
        for shape in values:
            cfg.shape = shape
            params.append(num_parameters(cfg))
        assert max(params) / min(params) < 1.04, params

    # smoke last: tiny sizes; the sweep, the W&B group and job-specific names and tags kept
    job = compose_job([f"+experiment=[{name},smoke]", f"{key}={values[-1]}"])
    assert str(job.hydra.sweeper.params[key]).split(",") == values
    assert job.trainer.max_steps == 20 and job.trainer.accelerator == "cpu" and job.data.seq_len == 32
    assert job.logger.group == name and job.name == f"{name}+smoke/{key}={values[-1]}"
    tags = OmegaConf.to_container(job.logger.tags, resolve=True)
    assert tags[0] == name and values[-1].lower() in tags[1].lower() and all(1 <= len(t) <= 64 for t in tags)
    assert num_parameters(job) < 100_000
    if name == "depth_vs_width":
        assert (job.model.num_layers, job.model.embed_dim) == (16, 16)


def olm_train(args: list[str], sweep_dir: Path, cache_dir: Path) -> str:
    cmd = [str(OLM_TRAIN), "-m", *args, f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # toy model: threads only contend (50x slower on a busy machine)
    proc = subprocess.run(cmd, cwd=sweep_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_grid_multirun_end_to_end_then_compare(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    olm_train(["+experiment=[ffn_multiplier,smoke]", "model.ff_multiplier=2,4", *FAST], sweep, cache_dir)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    summaries = [json.loads((p / "summary.json").read_text()) for p in jobs]
    assert [s["status"] for s in summaries] == ["finished", "finished"]
    assert summaries[0]["tokens_seen"] == summaries[1]["tokens_seen"] == 6 * 4 * 32  # same budget
    assert summaries[0]["num_parameters"] < summaries[1]["num_parameters"]
    assert [yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text())[0] for p in jobs] == [
        "model.ff_multiplier=2", "model.ff_multiplier=4"]

    assert main(["compare", str(sweep), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\|( \*\*best\*\*)? +\| [01] \| finished \| [24] \|", line)]
    assert len(rows) == 2 and sum("**best**" in r for r in rows) == 1, text
    assert f"{summaries[0]['num_parameters']:,}" in rows[0] and f"{summaries[0]['val_loss']:.4f}" in rows[0]
    assert "Same data in the same order for every run" in text
    assert [len(r.curve) for r in load_runs([sweep])] == [2, 2]  # val loss at steps 3 and 6
    for png in ("val_loss.png", "final_val_loss.png"):
        with Image.open(tmp_path / "report" / png) as image:
            image.verify()
            assert image.format == "PNG"


@pytest.mark.slow
def test_optuna_search_gets_the_val_loss_back(tmp_path, cache_dir):
    sweep = tmp_path / "optuna"
    out = olm_train(["hparams_search=optuna", "+experiment=smoke", "hydra.sweeper.n_trials=2", *FAST], sweep, cache_dir)
    assert "Sampler: TPESampler" in out and "Study name: lm_hparams" in out
    losses = [json.loads((sweep / str(i) / "summary.json").read_text())["val_loss"] for i in (0, 1)]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(losses))  # the metric olm-train returned
    assert set(result["best_params"]) == {"optim.lr", "scheduler.min_lr_ratio", "optim.weight_decay", "model.ff_multiplier"}
    trials = [yaml.safe_load((sweep / str(i) / ".hydra" / "overrides.yaml").read_text()) for i in (0, 1)]
    lrs = [next(o for o in trial if o.startswith("optim.lr=")) for trial in trials]
    assert lrs[0] != lrs[1]  # the sampler proposed two trials
