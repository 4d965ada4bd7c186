"""An Optuna sweep as ``olm compare`` reads it: the study's trials (state, value, parameters, the step a pruned
trial reached), its best trial and each parameter's importance, from the study's own storage.

The jobs of olm's Optuna sweeper carry ``sweep.study``, ``sweep.storage`` and ``sweep.trial`` in their config; the
storage is opened read-only (a report never writes into a sweep): ``study.db`` beside the jobs (also in a sweep dir
copied elsewhere), else the URL the jobs stored in. Without a readable storage the trials come from the run dirs and
importances are left out. Optuna is imported only here, and only for an Optuna sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olm.compare.runs import Run, _load_yaml, is_number

# Importances come from Optuna's default evaluator, PED-ANOVA: deterministic (no seed to fix, unlike fANOVA's random
# forest) and free of scikit-learn, which fANOVA needs and olm does not depend on. It compares the parameters of the
# best trials (at least 2) with those of all complete trials, so it needs one more than that.
MIN_IMPORTANCE_TRIALS = 3
# Below this many complete trials the best ones are too few to say much: on a planted study where only the learning
# rate matters, PED-ANOVA gave it 0.52 of the importance at 4 complete trials, 0.54 at 7, 0.81 at 11, 0.99 at 17.
ROUGH_IMPORTANCE_TRIALS = 20
STATES = {"finished": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}  # a run's status -> Optuna's trial state
WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass
class Trial:
    number: int
    state: str  # Optuna's TrialState name: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    values: list[float] | None
    params: dict[str, Any]
    last_step: int | None = None  # the last step the trial reported a value at (where a pruned trial stopped)
    last_reported: float | None = None
    run: Run | None = None

    @property
    def id(self) -> str:
        return f"t{self.number}"

    @property
    def state_word(self) -> str:
        return WORDS.get(self.state, self.state.lower())


@dataclass
class OptunaStudy:
    name: str
    storage: str | None  # None: the storage could not be read, the trials come from the run dirs
    objectives: list[str]
    directions: list[str]
    trials: list[Trial]
    sampler: str | None = None
    pruner: str | None = None
    best: list[Trial] = field(default_factory=list)  # the best trial, or the Pareto front of several objectives
    importances: dict[str, dict[str, float]] = field(default_factory=dict)  # objective -> {param: importance}
    importance_note: str = ""
    storage_note: str = ""

    @property
    def params(self) -> list[str]:
        return list(dict.fromkeys(k for t in self.trials for k in t.params))

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)


def identity(runs: list[Run]) -> tuple[str, str] | None:
    """(storage URL, study name) when every run is a trial of one Optuna study, else None."""
    keys = {(str(r.config.get("sweep.storage")), str(r.config.get("sweep.study"))) for r in runs}
    if len(keys) != 1 or any(r.config.get("sweep.trial") is None or not r.config.get("sweep.storage") for r in runs):
        return None
    return next(iter(keys))


def trial_number(run: Run) -> int | None:
    value = run.config.get("sweep.trial")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load(runs: list[Run]) -> OptunaStudy | None:
    """The Optuna study whose trials ``runs`` are (None when they are not trials of one study)."""
    found = identity(runs)
    if found is None:
        return None
    url, name = found
    sweeper = _sweeper_config(runs)
    by_number = {trial_number(r): r for r in runs}
    try:
        opened, storage = _open(url, name, runs)
    except _Unreadable as exc:
        study = _from_runs(name, sweeper, by_number)
        study.storage_note = (f"The study's storage ({exc}) cannot be read: the trials come from their run dirs, "
                              "and parameter importances need the storage.")
        return study
    study = OptunaStudy(name, storage, list(sweeper.get("objectives") or ["val_loss"]),
                        [d.name.lower() for d in opened.directions], [], sweeper.get("sampler"), sweeper.get("pruner"))
    if len(study.objectives) != len(study.directions):  # the sweep's record and its study disagree: name by index
        study.objectives = [f"objective {i}" for i in range(len(study.directions))]
    for frozen in opened.get_trials(deepcopy=False):
        steps = sorted(frozen.intermediate_values)
        complete = frozen.state.name == "COMPLETE"  # Optuna keeps a pruned trial's last report as its value
        study.trials.append(Trial(frozen.number, frozen.state.name, list(frozen.values) if complete else None,
                                  dict(frozen.params), steps[-1] if steps else None,
                                  frozen.intermediate_values[steps[-1]] if steps else None,
                                  by_number.get(frozen.number)))
    _best(study, opened)
    _importances(study, opened)
    return study


class _Unreadable(Exception):
    pass


def _open(url: str, name: str, runs: list[Run]):
    """The stored study, read-only: SQLite beside the runs (a sweep dir copied elsewhere keeps its own), else where
    the jobs stored it; other URLs as given."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    candidates = [url]
    if url.startswith("sqlite:///"):  # the study.db beside these runs is theirs, even in a copied sweep dir
        candidates = [str(p) for p in dict.fromkeys(r.path.parent / "study.db" for r in runs)]
        candidates.append(url.removeprefix("sqlite:///"))
        candidates = [p for p in candidates if Path(p).is_file()]
        if not candidates:
            raise _Unreadable(f"{url}: no such file, nor a study.db beside the trials' run dirs")
    where = candidates[0]
    try:
        if url.startswith("sqlite:///"):
            storage = optuna.storages.RDBStorage(f"sqlite:///file:{Path(where).resolve()}?mode=ro&uri=true")
            where = f"sqlite:///{Path(where).resolve()}"
        elif url.startswith("journal:") or url.endswith((".log", ".jsonl")):
            path = url.removeprefix("journal:")
            if not Path(path).is_file():
                raise _Unreadable(f"{url}: no such file")
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        else:
            storage = optuna.storages.RDBStorage(url)
        return optuna.load_study(study_name=name, storage=storage), where
    except _Unreadable:
        raise
    except Exception as exc:  # unreachable server, not a study database, no study of that name
        raise _Unreadable(f"{where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _sweeper_config(runs: list[Run]) -> dict[str, Any]:
    """The sweep's hydra.sweeper settings from its multirun.yaml (empty when the sweep dir has none)."""
    for run in runs:
        record = _load_yaml(run.path.parent / "multirun.yaml")
        if isinstance(record, dict):
            sweeper = (record.get("hydra") or {}).get("sweeper")
            if isinstance(sweeper, dict):
                return sweeper
    return {}


def _from_runs(name: str, sweeper: dict[str, Any], by_number: dict[int, Run]) -> OptunaStudy:
    objectives = list(sweeper.get("objectives") or ["val_loss"])
    directions = sweeper.get("direction") or "minimize"
    directions = [directions] * len(objectives) if isinstance(directions, str) else list(directions)
    study = OptunaStudy(name, None, objectives, directions, [], sweeper.get("sampler"), sweeper.get("pruner"))
    space = [str(k) for k in (sweeper.get("params") or {})]
    for number, run in sorted(by_number.items()):
        values = [run.summary.get(o) for o in objectives]
        state = STATES.get(run.status, "RUNNING")
        params = {k: v for k, v in run.overrides.items() if k in space}
        study.trials.append(Trial(number, state, [float(v) for v in values] if all(map(is_number, values)) and
                                  state == "COMPLETE" else None, params, run.summary.get("steps"),
                                  run.last_logged(), run))
    complete = [t for t in study.trials if t.values]
    if len(objectives) == 1 and complete:
        sign = 1 if directions[0] == "minimize" else -1
        study.best = [min(complete, key=lambda t: sign * t.values[0])]
    return study


def _best(study: OptunaStudy, opened) -> None:
    if not any(t.state == "COMPLETE" for t in study.trials):
        return
    numbers = [opened.best_trial.number] if len(study.directions) == 1 else [t.number for t in opened.best_trials]
    study.best = [t for t in study.trials if t.number in numbers]


def _importances(study: OptunaStudy, opened) -> None:
    """Each parameter's importance from Optuna's get_param_importances (PED-ANOVA), per objective."""
    import warnings

    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    complete = study.count("COMPLETE")
    if complete < MIN_IMPORTANCE_TRIALS:
        study.importance_note = (f"Parameter importance needs at least {MIN_IMPORTANCE_TRIALS} complete trials (the "
                                 f"best of them compared with all); this study has {complete}.")
        return
    for i, objective in enumerate(study.objectives):
        # PED-ANOVA asks what it takes to reach low values of a target: a maximised objective is negated
        sign = -1.0 if study.directions[i] == "maximize" else 1.0
        target = None if len(study.objectives) == 1 else (lambda t, i=i, sign=sign: sign * t.values[i])
        try:
            with warnings.catch_warnings():  # its notes on targets and few trials: the report says its own
                warnings.simplefilter("ignore")
                found = get_param_importances(opened, evaluator=PedAnovaImportanceEvaluator(), target=target)
        except (ValueError, RuntimeError) as exc:  # e.g. no parameter shared by every complete trial
            study.importance_note = f"Optuna could not compute parameter importances: {exc}"
            study.importances.clear()
            return
        study.importances[objective] = {k: float(v) for k, v in found.items()}
    study.importance_note = (f"Optuna's get_param_importances (its default evaluator, PED-ANOVA: how far each "
                             f"parameter's values in the best 10% of trials are from its values in all of them) over "
                             f"the {complete} complete trials; pruned and failed trials have no final value and are "
                             "left out. Importances sum to 1.")
    if complete < ROUGH_IMPORTANCE_TRIALS:
        study.importance_note += (f" With fewer than {ROUGH_IMPORTANCE_TRIALS} complete trials they are rough: "
                                  "read them as a ranking to check, not as measured shares.")
