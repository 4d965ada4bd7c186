"""What olm's sweepers and its parallel launcher share (hydra_plugins/olm_plugins): the state of a sweep's job dirs,
so that a multirun resumes; Optuna studies, search spaces, samplers and pruners; and the GPU slots of jobs running
side by side.

Resuming a multirun: re-running it on the same ``hydra.sweep.dir`` skips the jobs whose ``summary.json`` says
finished (or pruned) and leaves their files as they are; a job that stopped after a checkpoint continues from it
(``resume=auto``, its Hydra record in ``.hydra/resume-<step>/`` as for a single run); a job that stopped before
its first checkpoint starts again. A job dir that holds a job with other overrides is refused: the sweep changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olm.errors import ConfigError, OlmError, did_you_mean

DONE = ("finished", "pruned")
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
# Overrides that say how a job runs or where it reports, not what it trains: a resumed job may add or change them.
HOW_A_JOB_RUNS = ("resume", "hydra.output_subdir", "sweep.", "logger", "trainer.enable_progress_bar", "paths.")


class JobFailed(OlmError):
    """A job of a multirun ended with an error it has already reported (``error: ...``); the sweep goes on."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):  # crosses process boundaries (parallel launchers) with its exit code
        return JobFailed, (self.code, self.message)


@contextlib.contextmanager
def one_line():
    """Inside a sweeper: an OlmError (a sweep dir holding another sweep, a stored study with other directions) ends
    the command as ``error: <one line>``, exit 2 (1 for a fault of the run), as olm-train's own checks do."""
    import sys

    try:
        yield
    except ConfigError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(2)
    except JobFailed:
        raise
    except OlmError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(1)


# -- resuming a multirun ----------------------------------------------------------------------------------------------
@dataclass
class JobPlan:
    index: int
    overrides: list[str]
    state: str  # "new", "resume", "restart" (stopped before a checkpoint), "finished", "pruned"


def _what(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(HOW_A_JOB_RUNS))


def plan_job(index: int, overrides: list[str], job_dir: Path) -> JobPlan:
    """What re-running job ``index`` of a sweep means, from what its dir holds."""
    from olm.checkpoint import latest_checkpoint
    from olm.train.outcome import read_summary
    from olm.train.resume import checkpoint_step

    recorded = job_dir / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        return JobPlan(index, list(overrides), "new")
    import yaml

    before = yaml.safe_load(recorded.read_text()) or []
    if _what(before) != _what(overrides):
        raise ConfigError(f"hydra.sweep.dir: job {index} ({job_dir}) was run with {' '.join(_what(before))}, not "
                          f"{' '.join(_what(overrides))}; the sweep changed: give it a new hydra.sweep.dir")
    status = read_summary(job_dir).get("status")
    if status in DONE:
        return JobPlan(index, list(overrides), status)
    if latest_checkpoint(job_dir) is None:
        return JobPlan(index, list(overrides), "restart")
    step = checkpoint_step(job_dir)
    return JobPlan(index, [*overrides, "resume=auto", f"hydra.output_subdir=.hydra/resume-{step}"], "resume")


def job_dirs(hydra_context, config, jobs: list[list[str]], start: int) -> list[Path]:
    """The output dir of each job as Hydra's launcher will make it (``hydra.sweep.dir/hydra.sweep.subdir``)."""
    from omegaconf import OmegaConf, open_dict

    dirs = []
    for i, overrides in enumerate(jobs):
        job = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(job):
            job.hydra.job.num = start + i
        sweep = OmegaConf.to_container(job.hydra.sweep, resolve=True)
        dirs.append(Path(str(sweep["dir"])) / str(sweep["subdir"]))
    return dirs


def segments(plans: list[JobPlan]) -> list[list[JobPlan]]:
    """The jobs to launch, in runs of consecutive indices (a launcher numbers the jobs of a call consecutively)."""
    out: list[list[JobPlan]] = []
    for plan in plans:
        if plan.state in DONE:
            continue
        if out and out[-1][-1].index == plan.index - 1:
            out[-1].append(plan)
        else:
            out.append([plan])
    return out


def failure(ret) -> str | None:
    """A job's error line when it failed (olm's one line, or the exception's first line), else None. A bug's
    exception is raised again, with its traceback."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.FAILED:
        return None
    exc = ret._return_value
    if isinstance(exc, (OlmError, KeyboardInterrupt)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise exc


def end_of_sweep(failed: list[tuple[int, str]], total: int) -> None:
    """After every job ran: one line per failed job and exit 1, or nothing."""
    import sys

    if not failed:
        return
    for index, message in failed:
        print(f"error: job {index}: {message}", file=sys.stderr, flush=True)
    print(f"error: {len(failed)} of {total} jobs failed (the others finished); re-run the same command with the same "
          "hydra.sweep.dir to retry them", file=sys.stderr, flush=True)
    sys.exit(1)


# -- Optuna -----------------------------------------------------------------------------------------------------------
def search_space(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """hydra-optuna-sweeper's syntax as Optuna distributions: ``interval(a, b)`` (floats; ``tag(int, ...)``:
    integers), ``tag(log, interval(...))``, ``choice(...)`` and ``range(start, stop[, step])``; a plain value is
    fixed for every trial. Returns ({key: distribution}, fixed overrides)."""
    import optuna.distributions as d
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    parser = OverridesParser.create()
    space, fixed = {}, []
    for key, value in params.items():
        try:
            override, = parser.parse_overrides([f"{key}={value}"])
        except Exception as exc:
            raise ConfigError(f"hydra.sweeper.params.{key}={value!r} cannot be parsed: {str(exc).splitlines()[0]}")
        sweep = override.value()
        log = "log" in getattr(sweep, "tags", set())
        if isinstance(sweep, IntervalSweep):
            low, high = sweep.start, sweep.end
            if low >= high:
                raise ConfigError(f"hydra.sweeper.params.{key}={value}: the interval is empty (start >= end)")
            if "int" in getattr(sweep, "tags", set()):  # tag(int, interval(1, 8)): integers (Hydra reads floats)
                space[key] = d.IntDistribution(int(low), int(high), log=log)
            else:
                space[key] = d.FloatDistribution(float(low), float(high), log=log)
        elif isinstance(sweep, RangeSweep):
            values = list(override.sweep_iterator())
            if not values:
                raise ConfigError(f"hydra.sweeper.params.{key}={value}: the range is empty")
            space[key] = d.CategoricalDistribution(values)
        elif isinstance(sweep, ChoiceSweep):
            space[key] = d.CategoricalDistribution(list(override.sweep_iterator()))
        else:
            fixed.append(f"{key}={value}")
    return space, fixed


def make_sampler(name: str, seed: int | None, options: dict, space: dict):
    import optuna

    if name not in SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler={name!r} is not known" + did_you_mean(name, SAMPLERS))
    options = dict(options or {})
    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "cmaes": optuna.samplers.CmaEsSampler}
    if name in classes:
        try:
            return classes[name](seed=seed, **options)
        except TypeError as exc:
            raise ConfigError(f"hydra.sweeper.sampler_options={options}: {exc} (hydra.sweeper.sampler={name})") from None
    grid = {}
    for key, dist in space.items():
        if not isinstance(dist, optuna.distributions.CategoricalDistribution):
            raise ConfigError(f"hydra.sweeper.params.{key}: the grid sampler takes choice() or range(), not an "
                              "interval")
        grid[key] = list(dist.choices)
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(name: str, options: dict):
    import optuna

    if name not in PRUNERS:
        raise ConfigError(f"hydra.sweeper.pruner={name!r} is not known" + did_you_mean(name, PRUNERS))
    options = dict(options or {})
    classes = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    try:
        return classes[name](**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"hydra.sweeper.pruner_options={options}: {exc} (hydra.sweeper.pruner={name})") from None


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The study's storage: any Optuna URL, or SQLite in the sweep dir by default."""
    return storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def open_storage(url: str):
    """An Optuna storage; SQLite waits for a lock instead of failing when parallel jobs report at once."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        if url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        if url.endswith((".log", ".jsonl")) or url.startswith("journal:"):
            path = url.removeprefix("journal:")
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        return optuna.storages.RDBStorage(url)
    except Exception as exc:
        raise ConfigError(f"hydra.sweeper.storage={url!r} cannot be opened: {str(exc).splitlines()[0]}") from None


def load_trial(storage: str, study_name: str, number: int):
    """Trial ``number`` of a stored study, with the study's own pruner (stored by the sweeper), in a job's process."""
    import optuna

    storage_ = open_storage(storage)
    study = optuna.load_study(study_name=study_name, storage=storage_)
    pruner = study.user_attrs.get(PRUNER_ATTR) or {"name": "none", "options": {}}
    study = optuna.load_study(study_name=study_name, storage=storage_,
                              pruner=make_pruner(pruner["name"], pruner["options"]))
    trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == number)
    return optuna.trial.Trial(study, trial_id)


# -- jobs side by side ------------------------------------------------------------------------------------------------
SLOTS_ENV = "OLM_JOB_SLOTS"
_held: list = []  # this worker's slot: its lock file stays open (and locked) for the worker's life


def pin_to_slot() -> None:
    """In a worker of olm's parallel launcher, take a free slot (a GPU group and one of its ``jobs_per_gpu``
    places, or a share of the CPU cores) and keep it for the worker's life: CUDA_VISIBLE_DEVICES and the CPU
    threads are set before anything touches CUDA. Does nothing outside the parallel launcher."""
    spec = os.environ.get(SLOTS_ENV)
    if not spec or _held:
        return
    spec = json.loads(spec)
    directory = Path(spec["dir"])
    directory.mkdir(parents=True, exist_ok=True)
    for slot, devices in enumerate(spec["slots"]):
        handle = open(directory / f"slot-{slot}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _held.append(handle)
        if devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        os.environ["OLM_CONCURRENT_JOBS"] = str(len(spec["slots"]))
        return
    raise OlmError(f"all {len(spec['slots'])} job slots of {directory} are taken: another sweep uses this machine")


PRUNER_ATTR = "olm_pruner"


def finished_trials(study) -> int:
    """The trials that count towards ``n_trials``: complete, pruned or failed (not those left running)."""
    import optuna

    state = optuna.trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.FAIL)))


@dataclass
class OptunaSetup:
    study: Any
    url: str
    space: dict
    fixed: list[str]
    objectives: list[str]
    sweeper: Any

    def trial_overrides(self, params: dict, number: int) -> list[str]:
        values = [f"{key}={_override_value(value)}" for key, value in params.items()]
        return [*values, f"sweep.study={self.sweeper.study_name}", f"sweep.storage={self.url}", f"sweep.trial={number}"]

    def tell(self, number: int, ret, job_dir: Path) -> list[tuple[int, str]]:
        """Tell the study how trial ``number`` ended, from its job's summary.json; returns [(number, error)] when
        it failed."""
        import optuna

        from olm.train.outcome import read_summary

        state = optuna.trial.TrialState
        message = failure(ret) if ret is not None else None
        summary = read_summary(job_dir)
        if message is None and summary.get("status") == "pruned":
            self.study.tell(number, state=state.PRUNED)
            return []
        values = [summary.get(o) for o in self.objectives]
        if message is None and summary.get("status") == "finished" and all(_finite(v) for v in values):
            self.study.tell(number, values if len(values) > 1 else values[0])
            return []
        if message is None:
            missing = [o for o, v in zip(self.objectives, values) if not _finite(v)]
            message = f"summary.json of {job_dir} has no value for {', '.join(missing) or 'the objectives'}"
        self.study.tell(number, state=state.FAIL)
        return [(number, message)]

    def write_results(self, sweep_dir: Path) -> None:
        """optimization_results.yaml: the best trial (or the Pareto front of a multi-objective study)."""
        from omegaconf import OmegaConf

        study = self.study
        if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
            return
        if len(self.objectives) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_trial": best.number, "best_params": dict(best.params),
                       "best_value": best.value}
        else:
            results = {"name": "optuna", "objectives": self.objectives,
                       "best_trials": [{"trial": t.number, "params": dict(t.params), "values": list(t.values)}
                                       for t in study.best_trials]}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


def _finite(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _override_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def check_optuna(sweeper) -> tuple[dict, list[str], list[str]]:
    """The Optuna sweeper's settings checked (one line each, naming the key); returns (space, fixed, directions)."""
    if not isinstance(sweeper.get("n_trials"), int) or sweeper.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={sweeper.get('n_trials')!r} must be a positive integer")
    if not isinstance(sweeper.get("n_jobs"), int) or sweeper.n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={sweeper.get('n_jobs')!r} must be a positive integer (trials "
                          "proposed at a time)")
    objectives = list(sweeper.get("objectives") or ["val_loss"])
    directions = sweeper.get("direction") or "minimize"
    directions = [directions] * len(objectives) if isinstance(directions, str) else list(directions)
    if len(directions) != len(objectives) or any(d not in ("minimize", "maximize") for d in directions):
        raise ConfigError(f"hydra.sweeper.direction={directions!r} must be minimize or maximize, one per objective "
                          f"({', '.join(objectives)})")
    if len(objectives) > 1 and sweeper.get("pruner", "none") != "none":
        raise ConfigError(f"hydra.sweeper.pruner={sweeper.pruner!r}: Optuna prunes single-objective studies only; "
                          f"with objectives {objectives} use pruner=none")
    if sweeper.get("pruner", "none") != "none" and (objectives != ["val_loss"] or directions != ["minimize"]):
        raise ConfigError(f"hydra.sweeper.pruner={sweeper.pruner!r}: jobs report their val loss at each validation, "
                          f"so pruning needs objectives=[val_loss] with direction=minimize (have {objectives}, "
                          f"{directions}); use pruner=none")
    space, fixed = search_space(dict(sweeper.get("params") or {}))
    make_sampler(sweeper.get("sampler", "tpe"), sweeper.get("seed"), dict(sweeper.get("sampler_options") or {}),
                 space)
    make_pruner(sweeper.get("pruner", "none"), dict(sweeper.get("pruner_options") or {}))
    if sweeper.get("storage"):
        open_storage(str(sweeper.storage))
    return space, fixed, directions


def optuna_setup(sweeper, arguments: list[str], sweep_dir: Path) -> OptunaSetup:
    """The study of an Optuna sweep (created, or loaded to continue it) and what each trial's job gets."""
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    params = dict(sweeper.params)
    fixed_args = []
    for override in OverridesParser.create().parse_overrides(arguments):
        if override.is_sweep_override():  # the command line's sweep replaces the search space's
            params[override.get_key_element()] = override.input_line.split("=", 1)[1]
        else:
            fixed_args.append(override.input_line)
    settings = OmegaConf.create({
        "n_trials": sweeper.n_trials, "n_jobs": sweeper.n_jobs, "objectives": sweeper.objectives,
        "direction": sweeper.direction, "pruner": sweeper.pruner, "params": params, "sampler": sweeper.sampler,
        "seed": sweeper.seed, "sampler_options": sweeper.sampler_options, "pruner_options": sweeper.pruner_options,
        "storage": sweeper.storage})
    space, fixed, directions = check_optuna(settings)
    url = storage_url(sweeper.storage, sweep_dir)
    sampler = make_sampler(sweeper.sampler, sweeper.seed, sweeper.sampler_options, space)
    pruner = make_pruner(sweeper.pruner, sweeper.pruner_options)
    try:
        study = optuna.create_study(study_name=sweeper.study_name, storage=open_storage(url), sampler=sampler,
                                    pruner=pruner, directions=directions, load_if_exists=True)
    except ValueError as exc:  # e.g. the stored study has other directions
        raise ConfigError(f"hydra.sweeper.study_name={sweeper.study_name!r} in {url}: {exc}") from None
    if study.trials and sweeper.seed is not None:
        # A continued study: a sampler seeded as at the start would propose the first trials' values again.
        study.sampler = make_sampler(sweeper.sampler, sweeper.seed + len(study.trials), sweeper.sampler_options, space)
    # The trials' jobs load the study and ask its pruner: they build the same one from here.
    study.set_user_attr(PRUNER_ATTR, {"name": sweeper.pruner, "options": dict(sweeper.pruner_options or {})})
    return OptunaSetup(study, url, space, [*fixed_args, *fixed], list(sweeper.objectives), sweeper)


def job_slots(jobs_per_gpu: int, gpus: list[int] | None, gpus_per_job: int | None, jobs: int | None,
              devices: Any, accelerator: str) -> list[list[int] | None]:
    """The slots of olm's parallel launcher: each a list of GPU indices (one job's CUDA_VISIBLE_DEVICES), or None
    for a CPU job (hydra_plugins/olm_plugins/launcher.py)."""
    for key, value in (("jobs_per_gpu", jobs_per_gpu), ("gpus_per_job", gpus_per_job), ("jobs", jobs)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"hydra.launcher.{key}={value!r} must be a positive integer")
    if gpus is None and accelerator != "cpu":
        import torch

        gpus = list(range(torch.cuda.device_count()))
    if accelerator == "cpu" or not gpus:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return [None] * (jobs or cores)
    per_job = gpus_per_job or (devices if isinstance(devices, int) and devices > 0 else 1)
    if per_job > len(gpus):
        raise ConfigError(f"hydra.launcher.gpus_per_job={per_job} (trainer.devices) is more than the "
                          f"{len(gpus)} GPUs of hydra.launcher.gpus={gpus}")
    groups = [gpus[i:i + per_job] for i in range(0, len(gpus) - per_job + 1, per_job)]
    # Interleaved (g0, g1, ..., g0, g1, ...): workers take the first free slot, so the GPUs fill evenly.
    slots = [group for _ in range(jobs_per_gpu) for group in groups]
    return slots[:jobs] if jobs else slots
