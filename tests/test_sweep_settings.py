"""Sweep settings checked before anything runs: seeds as an axis of a grid sweep (seeds=N), the Optuna sweeper's
sampler, pruner, trials, storage and search space, the parallel launcher's slots; and the FLOPs a run logs."""

import pytest
import torch

import olm
from olm.errors import ConfigError
from olm.nn.structure import meta_device
from olm.train.cli import prepare
from olm.train.compose import compose, seed_sweep, sweep_jobs
from olm.train.flops import active_parameters, flops_per_token

SMOKE = ["+experiment=smoke", "logger=none"]


def test_seeds_multiply_the_grid_with_the_seed_varying_fastest():
    jobs, total = sweep_jobs(["optim.lr=1e-3,3e-3"], {}, seeds=3, seed=5)
    assert total == 6
    assert [(j[0], j[-1]) for j in jobs] == [(lr, f"seed={s}") for lr in ("optim.lr=0.001", "optim.lr=0.003")
                                            for s in (5, 6, 7)]
    assert seed_sweep(1, 0, ["optim.lr=1e-3,3e-3"], {}) == []  # one seed: the grid as given


@pytest.mark.parametrize("argv, message", [
    (["-m", *SMOKE, "seeds=2", "seed=0,1"], "seeds=2 and the sweep seed=0,1 both pick the seeds; keep one"),
    (["-m", *SMOKE, "seeds=2,3"], "seeds=2,3 is a sweep; seeds takes one number"),
    ([*SMOKE, "seeds=2"], "seeds=2 runs every variant 2 times and needs a multirun: add -m, or seeds=1"),
    (["-m", *SMOKE, "seeds=0"], "seeds=0"),
    (["-m", "hparams_search=optuna", *SMOKE, "seeds=2"], "seeds=2 is for grid sweeps (hydra/sweeper=olm)"),
    (["-m", "--cfg", "job", *SMOKE], "-m and --cfg job cannot be combined"),
    (["-m", *SMOKE, "hydra/launcher=parallel", "hydra.launcher.jobs_per_gpu=0"],
     "hydra.launcher.jobs_per_gpu=0 must be a positive integer"),
])
def test_seed_mistakes_are_one_line_before_anything_runs(argv, message):
    with pytest.raises(ConfigError) as info:
        prepare(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_experiment_declares_its_seeds_and_a_single_run_can_opt_out():
    cfg = compose(["+experiment=[ffn_multiplier,smoke]"], multirun=True, return_hydra_config=True)
    assert cfg.seeds == 3 and cfg.hydra.sweeper._target_.endswith("OlmSweeper")
    jobs, total = sweep_jobs([], dict(cfg.hydra.sweeper.params), cfg.seeds, cfg.seed)
    assert total == 9 and jobs[2][-1] == "seed=2"
    assert prepare(["+experiment=[ffn_multiplier,smoke]", "seeds=1", "logger=none"])  # one run: checked, allowed
    assert prepare(["--cfg", "job", "+experiment=[ffn_multiplier,smoke]", "logger=none"])  # a dry run of one job


def test_flops_count_what_a_token_really_uses():
    with meta_device():
        dense = olm.build_model({"vocab_size": 256, "embed_dim": 64, "num_heads": 4, "num_layers": 2,
                                 "max_seq_len": 128, "ffn": "swiglu"})
        moe = olm.build_model({"vocab_size": 256, "embed_dim": 64, "num_heads": 4, "num_layers": 2,
                               "max_seq_len": 128, "ffn": {"name": "moe", "num_experts": 8, "top_k": 2}})
        local = olm.build_model({"vocab_size": 256, "embed_dim": 64, "num_heads": 4, "num_layers": 2,
                                 "max_seq_len": 128, "attention": {"name": "sliding_window", "window": 32}})
    attention = 2 * 12 * 4 * 16  # per key: layers x 12 x heads x head_dim
    assert flops_per_token(dense, 128) == 6 * dense.num_parameters() + attention * 128
    # MoE: the router and 2 of 8 experts per token, not all 8
    experts = sum(b.ffn.fc.numel() + b.ffn.proj.numel() for b in moe.blocks)
    assert active_parameters(moe) == moe.num_parameters() - experts * 6 // 8
    # a 32-key window: attention over 32 keys, not the 128 of the sequence
    assert flops_per_token(local, 128) == 6 * local.num_parameters() + attention * 32
    assert flops_per_token(local, 16) == 6 * local.num_parameters() + attention * 16


OPTUNA = ["-m", "hparams_search=optuna", *SMOKE]


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.sampler=tpee", "hydra.sweeper.sampler='tpee' is not known; did you mean 'tpe'? known: tpe, random, grid, cmaes"),
    ("hydra.sweeper.pruner=medain", "hydra.sweeper.pruner='medain' is not known; did you mean 'median'?"),
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0 must be a positive integer"),
    ("hydra.sweeper.storage=postgresql://nobody@127.0.0.1:1/none", "hydra.sweeper.storage='postgresql://nobody@127.0.0.1:1/none' cannot be opened"),
    ("optim.lrr=interval(0.1,0.2)", "hydra.sweeper.params.optim.lrr: optim.lrr is not a config key"),
    ("hydra.sweeper.direction=up", "hydra.sweeper.direction=['up'] must be minimize or maximize"),
    ("hydra.sweeper.sampler=grid", "hydra.sweeper.params.optim.lr: the grid sampler takes choice() or range()"),
])
def test_optuna_settings_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        prepare([*OPTUNA, override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_the_search_space_syntax_becomes_optuna_distributions():
    import optuna.distributions as d

    from olm.train.sweeps import search_space

    space, fixed = search_space({"optim.lr": "tag(log, interval(1e-4, 1e-2))", "model.num_layers": "tag(int, interval(1, 4))",
                                 "model/norm": "choice(layernorm, rmsnorm)", "data.batch_size": "range(4, 17, 4)",
                                 "optim.weight_decay": "0.1"})
    assert space["optim.lr"] == d.FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.num_layers"] == d.IntDistribution(1, 4)
    assert space["model/norm"] == d.CategoricalDistribution(["layernorm", "rmsnorm"])
    assert space["data.batch_size"] == d.CategoricalDistribution([4, 8, 12, 16])
    assert fixed == ["optim.weight_decay=0.1"]


def test_parallel_launcher_slots_share_gpus_and_cores():
    from olm.train.sweeps import job_slots

    assert job_slots(2, [0, 1, 2, 3], None, None, 1, "gpu") == [[0], [1], [2], [3], [0], [1], [2], [3]]
    assert job_slots(2, [0, 1, 2, 3], None, 2, 1, "gpu") == [[0], [1]]  # jobs=2: two GPUs, not one twice
    assert job_slots(1, list(range(8)), None, None, 2, "gpu") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # DDP jobs
    assert job_slots(4, [0], None, 3, 1, "gpu") == [[0], [0], [0]]
    assert job_slots(1, None, None, 2, "auto", "cpu") == [None, None]
    with pytest.raises(ConfigError, match=r"hydra.launcher.gpus_per_job=4 \(trainer.devices\) is more than the 2"):
        job_slots(1, [0, 1], None, None, 4, "gpu")
    with pytest.raises(ConfigError, match="hydra.launcher.jobs_per_gpu=0 must be a positive integer"):
        job_slots(0, [0], None, None, 1, "gpu")
