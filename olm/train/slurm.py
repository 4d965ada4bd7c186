"""SLURM and torchrun: restarted jobs, and what a SLURM job asks for (``hydra/launcher=slurm``).

A restarted job continues its own run. SLURM counts the starts of a job in ``SLURM_RESTART_COUNT`` (absent or
0 at the first start, 1 after the first requeue) whatever requeued it: ``scontrol requeue`` on preemption, a
node failure with ``--requeue``, or submitit's own requeue before the time limit (``max_num_timeout``).
torchrun's elastic agent counts its restarts of the workers in ``TORCHELASTIC_RESTART_COUNT``. So the count,
not submitit's checkpoint hook, tells olm that a job is a restart: the hook runs only for submitit's own
requeue, never when SLURM requeues a job by itself, and never under torchrun. A restart on a run dir holding a
checkpoint resumes it as ``resume=auto`` would (olm.train.resume); a first start there is refused
(olm.train.resume.refuse_fresh_start).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from olm.errors import ConfigError

RESTART_COUNTS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")
# What a restarted job must share with the run it continues: what it trains, and how.
SAME_ON_RESTART = ("model", "data", "optim", "scheduler", "seed")


def restart() -> str | None:
    """``NAME=N`` when this process belongs to a restarted SLURM job or torchrun worker group, else None."""
    for name in RESTART_COUNTS:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return f"{name}={value}"
    return None


# -- what a SLURM job asks for (conf/hydra/launcher/slurm.yaml) ---------------------------------------------
GPU_ACCELERATORS = ("gpu", "cuda")


def tasks_per_node(*, _root_) -> int:
    """``${olm.slurm_tasks_per_node:}``: a task per device of a node (Lightning's SLURM environment)."""
    devices = _root_.trainer.devices
    if isinstance(devices, int) and devices >= 1:
        return devices
    if OmegaConf.is_list(devices):
        return len(devices)
    raise ConfigError(f"trainer.devices={devices!r}: under hydra/launcher=slurm it is the number of tasks "
                      "per node, a number >= 1 (e.g. trainer.devices=8)")


def gpus_per_node(*, _root_) -> int | None:
    """``${olm.slurm_gpus_per_node:}``: a GPU per task on a GPU trainer, none on a CPU one."""
    accelerator = str(_root_.trainer.accelerator)
    if accelerator == "cpu":
        return None
    if accelerator in GPU_ACCELERATORS:
        return tasks_per_node(_root_=_root_)
    raise ConfigError(f"trainer.accelerator={accelerator!r}: under hydra/launcher=slurm the job asks for "
                      "GPUs or not, so say which: trainer.accelerator=gpu or cpu (e.g. trainer=ddp, "
                      "trainer=ddp_cpu)")


def cpus_per_task(*, _root_) -> int:
    """``${olm.slurm_cpus_per_task:}``: the training process's threads (``cpu_threads``, 1 when unset; on a
    GPU the host thread) plus one core per data loader worker (``data.num_workers``)."""
    threads = _root_.cpu_threads if str(_root_.trainer.accelerator) == "cpu" else None
    return int(threads or 1) + int(_root_.data.num_workers)


def resolvers() -> tuple[tuple[str, Any], ...]:
    return (("olm.slurm_tasks_per_node", tasks_per_node), ("olm.slurm_gpus_per_node", gpus_per_node),
            ("olm.slurm_cpus_per_task", cpus_per_task))
