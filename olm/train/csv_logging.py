"""metrics.csv in the run dir that survives a resume: earlier rows are kept, rows past the checkpoint dropped."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_until_step: int | None) -> None:
        self._keep_until_step = keep_until_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here. On resume, keep the rows the checkpoint already covers
        # (their "step" is the optimizer step minus one) and drop the ones that will be trained again.
        if not os.path.isfile(self.metrics_file_path):
            return
        if self._keep_until_step is None:
            os.remove(self.metrics_file_path)
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        rows = [r for r in rows if r.get("step", "") != "" and int(float(r["step"])) < self._keep_until_step]
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)
        self.metrics_keys = keys


class RunCSVLogger(CSVLogger):
    """CSVLogger writing ``<run_dir>/metrics.csv``; ``resume_step`` (the checkpoint's global step) keeps history."""

    def __init__(self, run_dir: str, resume_step: int | None = None):
        super().__init__(save_dir=run_dir, name="", version="")
        self._resume_step = resume_step

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # Flush buffered rows with every checkpoint: after a crash or kill -9, metrics.csv holds every step the
        # checkpoint covers (Lightning alone flushes every 100 steps), so a resumed run's history has no gap.
        self.save()

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._resume_step)
        return self._experiment
