"""olm's SLURM launcher (``hydra/launcher=slurm``): hydra-submitit-launcher's, with two changes.

- submitit's requeue signal (``USR2``, ``signal_delay_s`` before the time limit) stops olm as a SIGTERM does, at a
  step that all ranks agree on, and submitit's own handler (checkpoint hook, ``scontrol requeue``,
  ``max_num_timeout``) runs only once the job has stopped. Run inside the signal handler, as submitit does by
  default, it would end the process in the middle of a step, with ``summary.json`` saying ``failed``.
- Without SLURM accounting, every poll of the jobs' states warns ``Bypassing sacct error``; it is shown once.

The requeued job calls the launcher again with the same job (submitit's checkpoint hook resubmits the same
arguments); it finds its own checkpoint and continues from it (olm.train.slurm).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

SACCT_NOISE = "Bypassing sacct error"


class _Once(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if SACCT_NOISE not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = f"{record.getMessage()} (shown once: the jobs' states then come from their result files)"
        record.args = ()
        return True


def quiet_sacct() -> None:
    logger = logging.getLogger("submitit")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


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
        logging.getLogger("olm").info("signal %s: stopping to be requeued", signal.Signals(signum).name)
        training(signal.SIGTERM, frame)  # Lightning's handler, also olm's: all ranks stop at the next check

    def requeue(self) -> None:
        if callable(self.submitit_handler):
            self.submitit_handler(self.signum, None)  # exits (rank 0 after requeueing, the other ranks return)


class OlmSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx: int):
        quiet_sacct()
        return super().launch(job_overrides, initial_job_idx)

    def __call__(self, *args: Any, **kwargs: Any):
        deferred = _DeferredRequeue()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            if deferred.received:
                deferred.requeue()
