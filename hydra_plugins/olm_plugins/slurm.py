"""olm's SLURM launcher (``hydra/launcher=slurm``): hydra-submitit-launcher's, with two changes.

- submitit's requeue signal (``USR2``, ``signal_delay_s`` before the time limit) stops olm as a SIGTERM does,
  at a step that all ranks agree on, and submitit's own handler (checkpoint hook, ``scontrol requeue``,
  ``max_num_timeout``) runs only once the job has stopped. Run inside the signal handler, as submitit does by
  default, it would end the process in the middle of a step, with ``summary.json`` saying ``failed``.
- Without SLURM accounting, every poll of the jobs' states warns ``Bypassing sacct error``: olm says it once.

The requeued job calls the launcher again with the same job (submitit's checkpoint hook resubmits the same
arguments); it finds its own checkpoint and continues from it (olm.train.slurm).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger("olm")


def without_accounting() -> None:
    """On a cluster without accounting, sacct fails at every poll of the jobs' states, and submitit then warns
    ``Bypassing sacct error`` (and sacct prints its own error) each time: say it once, and stop asking. The
    jobs' states come from the result files they write, as they do after a failed sacct."""
    import subprocess

    from submitit.slurm.slurm import SlurmJob

    try:
        subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        log.info("SLURM accounting is off (sacct fails): the jobs' states come from their result files")
        SlurmJob.watcher._make_command = lambda: None


class _DeferredRequeue:
    """Holds submitit's requeue handler until the job has stopped (module docstring)."""

    def __init__(self) -> None:
        import submitit

        self.signum = submitit.JobEnvironment()._usr_sig()
        self.submitit_handler = signal.getsignal(self.signum)
        self.received = False
        signal.signal(self.signum, self.on_signal)

    def on_signal(self, signum: int, frame: Any = None) -> None:
        self.received = True
        training = signal.getsignal(signal.SIGTERM)
        if type(training).__name__ != "_HandlersCompose":  # not training (yet): nothing to lose by going now
            self.requeue()
        log.info("signal %s: stopping to be requeued", signal.Signals(signum).name)
        training(signal.SIGTERM, frame)  # Lightning's handler, also olm's: all ranks stop at the next check

    def requeue(self) -> None:
        if callable(self.submitit_handler):
            self.submitit_handler(self.signum, None)  # rank 0 requeues and exits; the other ranks return


class OlmSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx: int):
        without_accounting()
        return super().launch(job_overrides, initial_job_idx)

    def __call__(self, *args: Any, **kwargs: Any):
        deferred = _DeferredRequeue()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            if deferred.received:
                deferred.requeue()
