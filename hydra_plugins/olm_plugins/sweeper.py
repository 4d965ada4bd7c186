"""olm's grid sweeper: Hydra's basic sweeper with seeds as an axis of its own, resumable, and going on past a
failed job.

- ``seeds=N`` (an experiment's or the command line's) runs every variant of the grid N times, with ``seed`` taking
  the values seed, seed+1, ..., seed+N-1: one job per (variant, seed), the seed varying fastest.
- Re-running a multirun on the same ``hydra.sweep.dir`` skips the jobs that finished, continues those that stopped
  after a checkpoint and restarts the others (olm.train.sweeps).
- A job that fails is reported in one line and the sweep goes on; the command then exits 1, listing the failures.

Everything else is Hydra's basic sweeper (``hydra.sweeper.params``, the command line's sweeps, ``max_batch_size``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

log = logging.getLogger("olm")


class OlmSweeper(BasicSweeper):
    def sweep(self, arguments: List[str]) -> Any:
        from olm.train.compose import with_seeds
        from olm.train.sweeps import one_line

        assert self.config is not None
        with one_line():
            return self._run(with_seeds(int(self.config.seeds), int(self.config.seed), list(arguments),
                                        dict(self.params or {})))

    def launch_batch(self, batch, initial_job_idx: int):
        """The batch's jobs that are not done yet, each as it should run again (olm.train.sweeps.plan_job)."""
        from olm.train import sweeps

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        fresh = not any(p.is_dir() for p in sweep_dir.iterdir()) if sweep_dir.is_dir() else True
        if fresh:
            plans = [sweeps.JobPlan(initial_job_idx + i, list(job), "new") for i, job in enumerate(batch)]
        else:
            dirs = sweeps.job_dirs(self.hydra_context, self.config, [list(j) for j in batch], initial_job_idx)
            plans = [sweeps.plan_job(initial_job_idx + i, list(job), d) for i, (job, d) in enumerate(zip(batch, dirs))]
            said = {"finished": "finished, skipped", "pruned": "pruned, skipped",
                    "resume": "continuing from their checkpoint", "restart": "restarting (stopped before a checkpoint)"}
            for state, what in said.items():
                jobs = [str(p.index) for p in plans if p.state == state]
                if jobs:
                    log.info("%s: jobs %s %s", sweep_dir, ", ".join(jobs), what)
        results = []
        for segment in sweeps.segments(plans):
            results += zip(segment, self.launcher.launch([p.overrides for p in segment],
                                                         initial_job_idx=segment[0].index))
        return results

    def _run(self, arguments: List[str]) -> Any:  # Hydra's loop, with launch_batch and failures collected
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        from olm.train import sweeps

        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params_conf), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, failed, total, initial_job_idx = [], [], 0, 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launch_batch(batch, initial_job_idx)
            for plan, ret in results:
                message = sweeps.failure(ret)
                if message is not None:
                    failed.append((plan.index, message))
            returns.append([ret for _, ret in results])
            total += len(batch)
            initial_job_idx += len(batch)
        sweeps.end_of_sweep(failed, total)
        return returns
