"""``olm-train``: the Hydra application, with one validation path in front of it.

Before Hydra starts anything, the command line is composed as Hydra will compose it and checked
(olm.train.checks): a single run, each job of a grid multirun (``-m``), ``--cfg job`` (olm's dry run), with
``--config-path`` / ``--config-dir`` too. A mistake is one line, ``error: ...``, exit 2, and nothing is written (no
run or multirun dir). A resume (``resume=auto hydra.run.dir=X``) is composed from X's own overrides
(olm.train.resume). Then Hydra runs the job(s); each job's failures end through :func:`run_job`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from olm.errors import ConfigError
from olm.train.outcome import (SIGTERM_EXIT, forget_refused_run, is_fresh, one_line_error, report_error,
                               write_failed_summary)

log = logging.getLogger("olm")
# Flags that make Hydra print something and exit, untouched by olm.
HYDRA_INFO_FLAGS = ("--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version")


def run_job(cfg: DictConfig) -> float | None:
    """``train(cfg)`` as the command line runs it: input mistakes and run faults end as one ``error: ...`` line on
    stderr and a non-zero exit, with ``summary.json`` saying ``failed``; bugs keep their traceback."""
    from olm.train.run import train
    from olm.train.sweeps import JobFailed, pin_to_slot

    from olm.train.lock import RunDirLive

    pin_to_slot()  # a worker of olm's parallel launcher: its GPU (or CPU share) before anything touches CUDA
    run_dir = Path(str(cfg.paths.output_dir)) if _output_dir_known(cfg) else None
    fresh = run_dir is not None and is_fresh(run_dir)
    try:
        return train(cfg)
    except BaseException as exc:
        if run_dir is not None and isinstance(exc, ConfigError) and fresh:
            forget_refused_run(run_dir)  # refused before training: it leaves nothing for `olm compare` to list
        elif run_dir is not None and not isinstance(exc, RunDirLive):
            write_failed_summary(run_dir, exc)  # a crash or Ctrl-C too: the run dir says so (`olm compare` lists it)
        reported = one_line_error(exc, run_dir)
        if reported is None:
            raise
        code, message = reported
        report_error(message)
        if _in_sweep() and code != SIGTERM_EXIT:
            raise JobFailed(code, message) from None  # the sweeper records it and goes on with the other jobs
        sys.exit(code)


def _in_sweep() -> bool:
    """Whether this job runs under one of olm's sweepers (which go on past a failed job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN and str(hc.sweeper.get("_target_", "")).startswith("hydra_plugins.olm_plugins")


def _output_dir_known(cfg: DictConfig) -> bool:
    try:
        return bool(cfg.paths.output_dir)
    except Exception:
        return False


@hydra.main(version_base="1.3", config_path="pkg://olm.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


# -- the checks before Hydra -----------------------------------------------------------------------------------------
def _parse(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _absolute_config_path(argv: list[str]) -> list[str]:
    """``--config-path conf`` relative to the working directory (Hydra would take it relative to olm's source)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--config-path", "-cp"):
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
                out += [flag, value if value.startswith("pkg://") else os.path.abspath(value)]
                i += 2
                break
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
                out.append(f"{flag}={value if value.startswith('pkg://') else os.path.abspath(value)}")
                i += 1
                break
        else:
            out.append(arg)
            i += 1
    return out


def prepare(argv: list[str]) -> list[str]:
    """Check the command line as Hydra will run it; returns the argv to hand to Hydra (a resume's own overrides
    filled in). Raises ConfigError for the first mistake; exits 0 when a resume has nothing left to train."""
    from olm.train import resume
    from olm.train.checks import check_machine, check_run
    from olm.train.compose import compose, sweep_jobs
    from olm.train.resume import refuse_fresh_start

    argv = _absolute_config_path(argv)
    args = _parse(argv)
    if args.multirun and args.cfg:
        raise ConfigError(f"-m and --cfg {args.cfg} cannot be combined (Hydra does one of them); --cfg job without -m "
                          "prints one job's config, -m runs the sweep")
    where = dict(config_path=args.config_path, config_dir=args.config_dir, config_name=args.config_name or "train")
    overrides = list(args.overrides)
    flags = list(argv)  # the flags (-m, --cfg job, --config-path X, ...): everything but the overrides
    for override in overrides:
        flags.remove(override)

    planned = None
    if not args.multirun:
        from olm.train.lock import refuse_if_live

        refuse_if_live(resume.given_run_dir(overrides))  # before a resume reads the run, or Hydra writes into it
        overrides = resume.on_restart(overrides)
        planned = resume.plan(overrides, lambda o: compose(o, **where))
        if planned is not None:
            if planned.finished_note:
                print(planned.finished_note, file=sys.stderr, flush=True)
                sys.exit(0)
            overrides = [*planned.overrides, "resume=auto", f"hydra.run.dir={planned.run_dir}",
                         f"hydra.output_subdir={planned.record_subdir}"]
        cfg = compose(overrides, return_hydra_config=True, **where)
        check_run(cfg, dry_run=bool(args.cfg))
        run_dir = Path(str(cfg.hydra.run.dir))
        if planned is None and cfg.resume is None and not cfg.ckpt_path:
            refuse_fresh_start(run_dir)
        if not args.cfg:
            overrides = hold_run_dir(cfg, overrides)
        return [*flags, *overrides]

    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        compose(overrides, multirun=True, **where)  # reports the parse error in one line
        raise
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose(fixed, multirun=True, return_hydra_config=True, **where)
    sweeper = str(base.hydra.sweeper.get("_target_", ""))
    here = not str(base.hydra.launcher.get("_target_", "")).endswith("OlmSlurmLauncher")  # jobs run on this machine
    if not sweeper.endswith(("BasicSweeper", "OlmSweeper")):
        check_run(base)
        if here:
            check_machine(base)
        _check_search_space(base, [o.get_key_element() for o in parsed if o.is_sweep_override()])
        if sweeper.endswith("OptunaSweeper"):
            from olm.train.sweeps import check_optuna

            check_optuna(base.hydra.sweeper)
        _check_launcher(base)
        if base.seeds > 1:
            raise ConfigError(f"seeds={base.seeds} is for grid sweeps (hydra/sweeper=olm); {sweeper.rsplit('.', 1)[-1]} "
                              "runs one seed per trial: drop seeds, or give seed=N")
        return [*flags, *overrides]
    _check_launcher(base)
    params = base.hydra.sweeper.get("params") or {}
    jobs, total = sweep_jobs(overrides, dict(params), int(base.seeds), int(base.seed))
    checked = set()
    for job in jobs:
        variant = tuple(o for o in job if not o.startswith("seed="))
        if base.seeds > 1 and variant in checked:
            continue  # the seeds of a variant (seed, ..., seed+N-1, all valid) compose the same config
        checked.add(variant)
        job_cfg = compose(job, multirun=True, return_hydra_config=True, **where)
        check_run(job_cfg)
        if here:
            check_machine(job_cfg)
    if total > len(jobs):
        log.info("checked the first %d of the sweep's %d jobs before starting it", len(jobs), total)
    return [*flags, *overrides]


def hold_run_dir(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """A single run: what it needs of this machine is checked, then its run dir's lock is taken (olm.train.lock),
    both before Hydra creates the dir or writes its record there. Returns the overrides with the run dir pinned
    (``hydra.run.dir``'s default holds the time, which would move on before Hydra composes it again)."""
    from olm.train.checks import check_machine
    from olm.train.lock import LOCKS, first_process
    from olm.train.resume import given_run_dir

    check_machine(cfg)
    run_dir = Path(str(cfg.hydra.run.dir))
    if first_process():
        LOCKS.acquire(run_dir, cfg.lock_timeout)
    if given_run_dir(overrides) is not None:
        return overrides
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    return [*overrides, f"hydra.run.dir='{quoted}'"]


def _check_launcher(cfg: DictConfig) -> None:
    """olm's parallel launcher: its slot settings; the SLURM launcher: the allocation it derives from the trainer
    (olm.train.slurm); before the sweep starts."""
    launcher = cfg.hydra.launcher
    if str(launcher.get("_target_", "")).endswith("OlmSlurmLauncher"):
        from omegaconf import OmegaConf

        OmegaConf.to_container(launcher, resolve=True)
        return
    if not str(launcher.get("_target_", "")).endswith("ParallelLauncher"):
        return
    from olm.train.sweeps import job_slots

    job_slots(launcher.jobs_per_gpu, None if launcher.gpus is None else list(launcher.gpus), launcher.gpus_per_job,
              launcher.jobs, cfg.trainer.devices, str(cfg.trainer.accelerator))


def _check_search_space(cfg: DictConfig, command_line: list[str] = ()) -> None:
    """A search space (Optuna's ``hydra.sweeper.params``, and sweeps given on the command line) names keys the
    config has."""
    from omegaconf import OmegaConf

    for key in [*map(str, cfg.hydra.sweeper.get("params") or {}), *command_line]:
        if "/" in key or key.startswith("+"):
            continue  # a config group, checked by the sweeper's first compose
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise ConfigError(f"hydra.sweeper.params.{key}: {key} is not a config key"
                              + (" (a sweep of the command line)" if key in command_line else ""))


def wrap(line: str) -> list[str]:
    """A help line wrapped at the terminal's width, continued under its first item."""
    import shutil
    import textwrap

    indent = " " * (line.index(": ") + 2) if ": " in line else "    "
    width = shutil.get_terminal_size().columns
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) or [line]


def help_text() -> str:
    """``olm-train --help``: what the command does, its groups and options, common overrides, where outputs go."""
    from hydra.core.object_type import ObjectType

    from olm.train.compose import hydra_app

    lines = [
        "olm-train: train a language model composed from olm's config tree (a Hydra app).",
        "",
        "  olm-train [group=option ...] [key=value ...]    one run",
        "  olm-train -m key=a,b [+experiment=NAME] ...     a sweep: one job per combination",
        "  olm-train --cfg job [overrides]                 check the run and print its config; nothing is trained",
        "  olm-train resume=auto hydra.run.dir=RUN_DIR     continue a run with its own saved config",
        "  olm-train resume=allow hydra.run.dir=RUN_DIR    continue it if it exists, else start it there (job scripts)",
        "",
        "Config groups (group=option; the default is marked *):",
    ]
    with hydra_app() as app:
        loader = app.config_loader
        choices = app.compose_config("train", [], run_mode=None, with_log_configuration=False).hydra.runtime.choices
        # a team's experiments/ folder answers for the experiment group: not a group of its own
        groups = sorted(g for g in loader.get_group_options("", ObjectType.GROUP) if g not in ("hydra", "experiments"))
        for group in groups:
            options = [o for o in loader.get_group_options(group, ObjectType.CONFIG) if not o.startswith("schema")]
            if not options:
                continue
            chosen = choices.get(group)
            lines += wrap(f"  {group}: {', '.join(f'{o}*' if o == chosen else o for o in options)}")
        for kind in ("attention", "norm", "ffn", "position"):
            options = loader.get_group_options(f"model/{kind}", ObjectType.CONFIG)
            lines += wrap(f"  model/{kind}: {', '.join(options)}")
    lines += [
        "",
        "Common overrides:",
        "  model=llama_small trainer.max_steps=2000 data.seq_len=512 data.batch_size=32 optim.lr=1e-3 seed=1",
        "  trainer=gpu compile=true | trainer=ddp | logger=csv | +experiment=ffn_multiplier | debug=fdr",
        "  Every key, its default and allowed values: olm/train/config.py; components: `olm components`;",
        "  model presets: `olm models`.",
        "",
        "Outputs: outputs/runs/<date>_<time>/ (a sweep: outputs/multiruns/<date>_<time>/<job>/) with config.yaml,",
        "  metrics.csv, summary.json, checkpoints/, model/ and wandb/ (offline unless WANDB_API_KEY is set).",
        "  Cache (tokenizers, tokenized corpora): $OLM_CACHE_DIR, else $XDG_CACHE_HOME/olm, else ~/.cache/olm.",
        "",
        "Hydra's own flags: olm-train --hydra-help",
    ]
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    if any(a in ("--help", "-h") for a in argv):
        print(help_text())
        return
    from olm.train.lock import LOCKS

    try:
        _main(argv)
    finally:
        LOCKS.release_all()  # a single run's lock, taken before Hydra started (hold_run_dir)


def _main(argv: list[str]) -> None:
    is_child_rank = "LOCAL_RANK" in os.environ and any(a in ("--config-path", "-cp") for a in argv)
    if not is_child_rank and not any(a.split("=")[0] in HYDRA_INFO_FLAGS for a in argv):
        try:
            argv = prepare(argv)
        except Exception as exc:
            reported = one_line_error(exc)
            if reported is None:
                raise
            print(f"error: {reported[1]}", file=sys.stderr, flush=True)
            sys.exit(reported[0])
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()
