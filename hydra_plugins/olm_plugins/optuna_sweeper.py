"""olm's Optuna sweeper (Optuna >= 4): ``hydra/sweeper=optuna``, as ``hparams_search=optuna`` selects it.

- Search space: hydra-optuna-sweeper's syntax in ``hydra.sweeper.params`` (``interval()``, ``tag(log, ...)``,
  ``choice()``, ``range()``; a plain value is fixed); a sweep given on the command line replaces the same key's.
- Samplers ``tpe``, ``random``, ``grid``, ``cmaes``, seeded by ``seed``; pruners ``none``, ``median``,
  ``successive_halving``, ``hyperband`` (``sampler_options`` / ``pruner_options`` go to their constructors).
- A persistent study: ``storage`` is any Optuna URL, SQLite in the sweep dir by default, so re-running the same
  command on the same ``hydra.sweep.dir`` continues the study up to ``n_trials``: a trial a killed sweep left
  running is run again in its own job dir (continuing from its checkpoint) and counted once.
- Each trial is one job; its job dir is ``<sweep dir>/<trial number>``. The job reports its val loss at every
  validation (olm.train.callbacks.OptunaPruning); a pruned job stops there, its summary says ``pruned``, exit 0. The
  trial's value is read from the job's ``summary.json`` (``objectives``, ``val_loss`` by default); a failed job is a
  failed trial and the search goes on.
- Several objectives (``objectives: [val_loss, tokens_per_sec]`` with ``direction: [minimize, maximize]``) make a
  multi-objective study (Pareto front in optimization_results.yaml); Optuna cannot prune those.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper

log = logging.getLogger("olm")


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: str = "tpe", seed: Optional[int] = None, sampler_options: Any = None,
                 pruner: str = "none", pruner_options: Any = None, direction: Any = "minimize",
                 objectives: Any = ("val_loss",), study_name: str = "olm", storage: Optional[str] = None,
                 n_trials: int = 20, n_jobs: int = 1, params: Any = None):
        from omegaconf import OmegaConf

        plain = (lambda v: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
        self.sampler, self.seed, self.sampler_options = sampler, seed, dict(plain(sampler_options) or {})
        self.pruner, self.pruner_options = pruner, dict(plain(pruner_options) or {})
        self.direction, self.objectives = plain(direction), list(plain(objectives) or ["val_loss"])
        self.study_name, self.storage, self.n_trials, self.n_jobs = study_name, storage, n_trials, n_jobs
        self.params = {str(k): str(v) for k, v in (plain(params) or {}).items()}
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        from olm.train.sweeps import one_line

        with one_line():
            self._sweep(arguments)

    def _sweep(self, arguments: List[str]) -> None:
        import optuna
        from omegaconf import OmegaConf

        from olm.train import sweeps

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        setup = sweeps.optuna_setup(self, arguments, sweep_dir)
        study = setup.study
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        log.info("Optuna %s study %r in %s: sampler %s, pruner %s, %d trials", optuna.__version__, self.study_name,
                 setup.url, type(study.sampler).__name__, type(study.pruner).__name__, self.n_trials)
        failed = []
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            log.info("trial %d was left running by a stopped sweep: taking it up again", trial.number)
            job = [*setup.fixed, *setup.trial_overrides(trial.params, trial.number)]
            plan = sweeps.plan_job(trial.number, job, sweep_dir / str(trial.number))
            ret = None  # its job ended before the sweep could tell the study: its summary says how
            if plan.state not in sweeps.DONE:
                ret, = self.launcher.launch([plan.overrides], initial_job_idx=trial.number)
            failed += setup.tell(trial.number, ret, sweep_dir / str(trial.number))
        while True:
            done = sweeps.finished_trials(study)
            if done >= self.n_trials:
                break
            trials = [study.ask(setup.space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            jobs = [[*setup.fixed, *setup.trial_overrides(t.params, t.number)] for t in trials]
            results = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, results):
                failed += setup.tell(trial.number, ret, sweep_dir / str(trial.number))
        setup.write_results(sweep_dir)
        sweeps.end_of_sweep(failed, self.n_trials)
