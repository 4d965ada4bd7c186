"""olm's parallel launcher (``hydra/launcher=parallel``): a sweep's jobs side by side on one machine, on Hydra's
joblib launcher.

Joblib (its loky backend) keeps a pool of worker processes and hands each the next job as soon as it is free, so a
sweep of uneven jobs keeps the machine full, and a worker pays Python's and torch's start-up once for all the jobs
it runs. Each worker takes one slot for its life (olm.train.sweeps.pin_to_slot), before anything touches CUDA:

- GPUs: a slot is a group of ``gpus_per_job`` GPUs (a DDP job's ``trainer.devices``; 1 otherwise) and one of its
  ``jobs_per_gpu`` places; the worker's jobs see only those GPUs (CUDA_VISIBLE_DEVICES). 8 GPUs, jobs_per_gpu=2:
  16 jobs at a time; trainer.devices=2: 4 groups, 8 jobs at a time.
- No GPU: ``jobs`` slots (default: one per core), each job with the cores divided among the jobs running at once.

submitit's local executor starts every job at once on the same GPUs; Ray needs a cluster to run: joblib is the
engine that queues jobs onto a fixed number of workers with nothing else to run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class ParallelLauncher(JoblibLauncher):
    def __init__(self, jobs_per_gpu: int = 1, gpus: Optional[Sequence[int]] = None,
                 gpus_per_job: Optional[int] = None, jobs: Optional[int] = None, **joblib: Any) -> None:
        super().__init__(**joblib)
        self.jobs_per_gpu, self.gpus, self.gpus_per_job, self.jobs = jobs_per_gpu, gpus, gpus_per_job, jobs

    def slots(self) -> list:
        from olm.train.sweeps import job_slots

        devices = self.config.trainer.get("devices") if "trainer" in self.config else None
        return job_slots(self.jobs_per_gpu, None if self.gpus is None else list(self.gpus), self.gpus_per_job,
                         self.jobs, devices, str(self.config.trainer.get("accelerator", "auto")))

    def launch(self, job_overrides, initial_job_idx: int):
        from olm.train.sweeps import SLOTS_ENV

        slots = self.slots()
        folder = Path(str(self.config.hydra.sweep.dir)) / ".slots"
        # The workers inherit this when joblib starts them; it stays set for the sweep's life (the pool is reused).
        os.environ[SLOTS_ENV] = json.dumps({"dir": str(folder.resolve()), "slots": slots})
        self.joblib["n_jobs"] = len(slots)
        self.joblib.setdefault("batch_size", 1)
        return super().launch(job_overrides, initial_job_idx)
